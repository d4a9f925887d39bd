"""FSDP2 (fully_shard) over 2 CPU processes (gloo): the loss curve and adapters of one process."""

from pathlib import Path

import pytest
import torch
from fsdp_worker import STEPS, build_model, make_batch, train

from conftest import run_torchrun

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.mark.slow
def test_fully_shard_two_processes_match_one(tmp_path):
    out = tmp_path / "fsdp.pt"
    run_torchrun([str(WORKER), str(out)])
    saved = torch.load(out)

    model = build_model()
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert saved["local_frozen"] <= frozen // 2 + 64  # each rank holds half of the frozen base
    losses = train(model, [make_batch(step) for step in range(STEPS)])
    torch.testing.assert_close(torch.tensor(saved["losses"]), torch.tensor(losses), atol=1e-5, rtol=1e-5)
    factors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert saved["factors"].keys() == factors.keys() and len(factors) == 2 * 14
    for name, param in factors.items():
        torch.testing.assert_close(saved["factors"][name], param.detach(), atol=1e-5, rtol=1e-4, msg=name)
