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


MULTI_KERNELS = {name for name in KERNELS if name.startswith("multi_")}


@pytest.mark.parametrize(
    "dtype,rank,case,kernels",
    [
        ("bf16", "16", "", KERNELS),  # every kernel; the script covers fp32 and more ranks
        ("fp32", "64", "multi", MULTI_KERNELS),  # the mixed-adapter kernels' 4-byte tiles beside a rank-64 accumulator
    ],
)
def test_widest_tiles_spill_no_more_than_the_tutorial_matmul(dtype, rank, case, kernels):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    command = [sys.executable, str(ROOT / "bench" / "kernel_report.py"), "--widest", "--dtype", dtype, "--rank", rank]
    out = subprocess.run([*command, "--kernel", case], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| ") and "_kernel" in line]
    assert {row[2].strip() for row in rows} == kernels, out.stderr[-3000:]
    assert {row[1].strip().endswith("dropout") for row in rows} == {True, False}  # with and without dropout
    assert out.returncode == 0, out.stdout
