"""The kernels' widest tiles, compiled offline for the H100/H200 (sm_90a), spill no more than the
Triton tutorial matmul at the same tile and fit its shared memory (``bench/kernel_report.py``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[1]
PTXAS_DIR = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
KERNELS = {
    "dropout_xa_kernel",
    "fused_lora_matmul_kernel",
    "lora_weight_grad_kernel",
    "multi_dropout_xa_kernel",
    "multi_lora_matmul_kernel",
    "multi_lora_weight_grad_kernel",
}

pytestmark = pytest.mark.skipif(
    not any((PTXAS_DIR / name).is_file() for name in ("ptxas-blackwell", "ptxas")),
    reason="Triton's bundled ptxas is absent",
)


def test_widest_tiles_spill_no_more_than_the_tutorial_matmul():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    # bf16 at rank 16 keeps this to about a minute; the script covers fp32 and more ranks.
    command = [sys.executable, str(ROOT / "bench" / "kernel_report.py"), "--widest", "--dtype", "bf16", "--rank", "16"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| ") and "_kernel" in line]
    assert {row[2].strip() for row in rows} == KERNELS, out.stderr[-3000:]
    assert {row[1].strip().endswith("dropout") for row in rows} == {True, False}  # with and without dropout
    assert out.returncode == 0, out.stdout
