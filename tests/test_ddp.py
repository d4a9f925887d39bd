"""DistributedDataParallel over 2 CPU processes (gloo) gives the adapter gradients of one process."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from ddp_worker import build_model, make_batch

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_processes_match_one_on_the_whole_batch(tmp_path):
    out = tmp_path / "grads.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAFAST_BACKEND": "torch"}
    # A session of its own, so that a hang kills the launcher and both ranks, not the launcher alone.
    launcher = subprocess.Popen(
        [*command, str(WORKER), str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = launcher.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        output, _ = launcher.communicate()
    assert launcher.returncode == 0, output[-3000:]
    saved = torch.load(out)

    model = build_model()
    model(**make_batch()).loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert saved["trainable"] == sum(g.numel() for g in expected.values())
    assert saved["grads"].keys() == expected.keys() and all(k.endswith(("lora_A", "lora_B")) for k in expected)
    for name, grad in expected.items():
        torch.testing.assert_close(saved["grads"][name], grad, atol=1e-6, rtol=1e-5, msg=name)
