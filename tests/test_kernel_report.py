"""The kernels' widest tiles, compiled offline for the H100/H200 (sm_90a), spill no more than the
Triton tutorial matmul at the same tile and fit its shared memory, and the fused GEMM's main loop issues the
tutorial's wgmma and cp.async counts; the hardest launches keep a config that fits an RTX card's shared memory and
build for ROCm (``bench/kernel_report.py``, ``--arch``)."""

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
    for row in rows:
        if row[2].strip() == "fused_lora_matmul_kernel" and dtype == "bf16":  # main loop: ours | the tutorial's
            assert row[9].strip() == row[12].strip() != "0 / 0", row


def test_main_loop_counts_take_the_innermost_loop_with_the_most_wgmma():
    sys.path.insert(0, str(ROOT / "bench"))
    from kernel_report import main_loop_counts

    ptx = """
    wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {...};
$L__BB0_1:
    cp.async.cg.shared.global [%r1], [%rd1], 16;
$L__BB0_2:
    cp.async.cg.shared.global [%r2], [%rd2], 16;
    cp.async.commit_group;
    wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...};
    wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...};
    @%p1 bra 	$L__BB0_2;
    wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {...};
    @%p2 bra $L__BB0_1;
$L__BB0_3:
    wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {...};
    bra.uni $L__BB0_4;
$L__BB0_4:
    ret;
"""
    assert main_loop_counts(ptx) == (2, 1)  # the inner loop; the outer one, prologue and forward branch excluded
    assert main_loop_counts("wgmma.mma_async;\nret;") == (0, 0)


def test_arch_report_keeps_a_fitting_config_on_an_rtx_card_and_passes_rocms_front_end():
    """The quick arch report's hardest launches at rank 256 (the shrink with dropout in bf16 and fp32, the fused
    GEMM, the cuBLAS composite's epilogue) on sm_86's 99 KiB, and their front end for gfx90a (MI200)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(ROOT / "bench" / "kernel_report.py"), "--arch", "sm_86", "gfx90a", "--quick"]
    command += ["--dtype", "bf16", "--dtype", "fp32", "--kernel", "forward, dropout"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    rows = [[cell.strip() for cell in line.split("|")] for line in out.stdout.splitlines() if "_kernel |" in line]
    kernels = {"dropout_xa_kernel", "fused_lora_matmul_kernel"}
    for arch in ("sm_86", "gfx90a"):
        assert {(row[2], row[3]) for row in rows if row[6] == arch} == {
            (k, d) for k in kernels for d in ("bf16", "fp32")
        }
    assert all(row[9] == "ok" and int(row[8]) >= 1 for row in rows if row[6] == "sm_86"), out.stdout
    assert all(row[9] == "ok" for row in rows if row[6] == "gfx90a"), out.stdout
    assert any("[cuBLAS]" in row[1] for row in rows)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_arch_rows_fit_by_the_compiled_shared_memory():
    sys.path.insert(0, str(ROOT / "bench"))
    from kernel_report import ArchRow

    small, large = triton.Config({"BLOCK_M": 32}), triton.Config({"BLOCK_M": 64})
    row = ArchRow("case", "k", "bf16", 256, "", "sm_86", 99 * 1024, ((large, 100 * 1024), (small, 40 * 1024)))
    assert row.fitting == [small] and row.ok
    assert not ArchRow("case", "k", "bf16", 256, "", "sm_86", 99 * 1024, ((large, 100 * 1024),)).ok
    assert not ArchRow("case", "k", "bf16", 256, "", "sm_86", 99 * 1024, ()).ok  # the prune kept nothing
    assert ArchRow("case", "k", "bf16", 256, "", "gfx90a", 64 * 1024, ((large, 100 * 1024),)).ok  # LDS not checked
    assert not ArchRow("case", "k", "bf16", 256, "", "gfx90a", 64 * 1024, ((large, None),), "CompilationError").ok
