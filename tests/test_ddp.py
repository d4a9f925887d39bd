"""DistributedDataParallel over 2 CPU processes (gloo) gives the adapter gradients of one process."""

from pathlib import Path

import torch
from ddp_worker import build_model, make_batch

from conftest import run_torchrun

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_processes_match_one_on_the_whole_batch(tmp_path):
    out = tmp_path / "grads.pt"
    run_torchrun([str(WORKER), str(out)])
    saved = torch.load(out)

    model = build_model()
    model(**make_batch()).loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert saved["trainable"] == sum(g.numel() for g in expected.values())
    assert saved["grads"].keys() == expected.keys() and all(k.endswith(("lora_A", "lora_B")) for k in expected)
    for name, grad in expected.items():
        torch.testing.assert_close(saved["grads"][name], grad, atol=1e-6, rtol=1e-5, msg=name)
