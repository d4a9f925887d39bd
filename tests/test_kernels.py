"""Each Triton kernel, through Triton's interpreter, for every config its autotuner can pick."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_close_scaled, make_inputs, require_interpreter
from lorafast import kernels
from lorafast.kernels.dropout_xa import dropout_xa_tuned
from lorafast.kernels.fused_lora_matmul import fused_lora_matmul_tuned
from lorafast.kernels.launch import dot_precision, prune_for_rank, rank_block
from lorafast.kernels.lora_weight_grad import SMALL_TILES, lora_weight_grad_tuned

require_interpreter()

INTERPRETER_ONLY = ["test_kernels.py", "test_gemm_paths.py", "test_multi_kernels.py", "test_multi_gemm_paths.py"]

# Odd sizes (not multiples of any block) and ranks that are not powers of two.
SHAPES = [(37, 70, 50, 3), (130, 200, 150, 40)]
GEMM_CONFIGS = fused_lora_matmul_tuned.configs
ids = lambda c: "-".join(f"{k}{v}" for k, v in c.kwargs.items()) + f"-w{c.num_warps}-s{c.num_stages}"


@pytest.mark.parametrize("config", GEMM_CONFIGS, ids=ids)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_forward_every_config(config, shape, bias):
    n, d_in, d_out, r = shape
    x, w, b, a, bb = make_inputs((n,), d_in, d_out, r, bias=bias)
    y, xa = kernels.fused_lora_forward(x, w, b, a, bb, 1.7, config=config)
    xa_ref = x.double() @ a.double().T
    y_ref = x.double() @ w.double().T + 1.7 * xa_ref @ bb.double().T + (0 if b is None else b.double())
    assert_close_scaled(xa, xa_ref)
    assert_close_scaled(y, y_ref)


@pytest.mark.parametrize("config", GEMM_CONFIGS, ids=ids)
def test_fused_forward_with_given_xa(config):
    x, w, b, a, bb = make_inputs((37,), 70, 50, 3)
    xa = torch.randn(37, 3)
    y, xa_out = kernels.fused_lora_forward(x, w, b, a, bb, 0.5, xa=xa, config=config)
    assert xa_out is xa
    assert_close_scaled(y, x.double() @ w.double().T + 0.5 * xa.double() @ bb.double().T + b.double())


@pytest.mark.parametrize("config", GEMM_CONFIGS, ids=ids)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_fused_dx_every_config(config, shape, dropout_p):
    n, d_in, d_out, r = shape
    _, w, _, a, bb = make_inputs((n,), d_in, d_out, r)
    gy = torch.randn(n, d_out)
    dx, g = kernels.fused_lora_dx(gy, w, a, bb, 1.7, dropout_p, seed=99, config=config)
    keep = kernels.dropout_keep_mask(99, (n, d_in), dropout_p, "cpu").double() if dropout_p else 1.0
    g_ref = gy.double() @ bb.double()
    dx_ref = gy.double() @ w.double() + keep * (1.7 / (1 - dropout_p)) * (g_ref @ a.double())
    assert_close_scaled(g, g_ref)
    assert_close_scaled(dx, dx_ref)


@pytest.mark.parametrize("config", GEMM_CONFIGS, ids=ids)
@pytest.mark.parametrize("bias,dropout_p", [(True, 0.25), (False, 0.0)])
def test_dora_epilogue_every_config_over_several_column_tiles(config, bias, dropout_p):
    """DoRA's column scale g and bias in the fused GEMM's epilogue: N spans at least two whole column tiles of
    every config plus a ragged last one, so each tile must read g at its own columns."""
    block_n = max(c.kwargs["BLOCK_N"] for c in GEMM_CONFIGS)
    n, d_in, d_out, r = 20, 24, 2 * block_n + 37, 3
    x, w, b, a, bb = make_inputs((n,), d_in, d_out, r, bias=bias)
    col_scale = torch.rand(d_out, generator=torch.Generator().manual_seed(1)) + 0.5
    y, xa = kernels.dora_forward(x, w, b, a, bb, 1.3, dropout_p, 17, col_scale, config=config)
    keep = kernels.dropout_keep_mask(17, (n, d_in), dropout_p, "cpu").double() if dropout_p else 1.0
    xa_ref = (x.double() * keep / (1 - dropout_p)) @ a.double().T
    z_ref = x.double() @ w.double().T + 1.3 * xa_ref @ bb.double().T
    assert_close_scaled(xa, xa_ref)
    assert_close_scaled(y, col_scale.double() * z_ref + (0 if b is None else b.double()))


@pytest.mark.parametrize("config", dropout_xa_tuned.configs, ids=ids)
@pytest.mark.parametrize("shape", SHAPES)
def test_dropout_xa_every_config(config, shape):
    n, d_in, _, r = shape
    x, _, _, a, _ = make_inputs((n,), d_in, 8, r)
    xa = kernels.dropout_xa(x, a, 0.3, seed=5, config=config)
    keep = kernels.dropout_keep_mask(5, (n, d_in), 0.3, "cpu").double()
    assert_close_scaled(xa, (x.double() * keep / 0.7) @ a.double().T)


@pytest.mark.parametrize("config", lora_weight_grad_tuned.configs, ids=ids)
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_weight_grad_every_config(config, split, dropout_p):
    u, v = torch.randn(131, 70), torch.randn(131, 5)
    c = kernels.lora_weight_grad(u, v, 0.8, dropout_p, seed=3, split=split, config=config)
    keep = kernels.dropout_keep_mask(3, (131, 70), dropout_p, "cpu").double() if dropout_p else 1.0
    assert_close_scaled(c, 0.8 * (u.double() * keep).T @ v.double())
    ct = kernels.lora_weight_grad(u, v, 0.8, dropout_p, seed=3, split=split, config=config, transpose=True)
    assert ct.shape == (5, 70) and ct.is_contiguous()
    torch.testing.assert_close(ct, c.T)  # the same sums, written transposed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_half_precision(dtype):
    """xa, y, g = dY·B and dX against float64 math on the same rounded inputs: none of the references reuses one of
    the kernel's own intermediates (xa, g), so an error in one shows up where it is made."""
    x, w, b, a, bb = make_inputs((37,), 70, 50, 3, dtype=dtype)
    x64, w64, b64, a64, bb64 = (t.double() for t in (x, w, b, a, bb))
    y, xa = kernels.fused_lora_forward(x, w, b, a, bb, 2.0)
    assert y.dtype == dtype and xa.dtype == dtype
    xa_ref = x64 @ a64.T
    assert_close_scaled(xa, xa_ref, dtype)
    assert_close_scaled(y, x64 @ w64.T + 2.0 * xa_ref @ bb64.T + b64, dtype)
    gy = torch.randn(37, 50).to(dtype)
    dx, g = kernels.fused_lora_dx(gy, w, a, bb, 2.0)
    assert dx.dtype == dtype
    g_ref = gy.double() @ bb64
    assert_close_scaled(g, g_ref, dtype)
    assert_close_scaled(dx, gy.double() @ w64 + 2.0 * g_ref @ a64, dtype)


def test_strided_inputs():
    """Transposed weights and a column slice of x: the launchers pass strides, never copy."""
    x_full = torch.randn(45, 80)
    x = x_full[:, 5:75]  # (45, 70), row stride 80
    w = torch.randn(70, 50).T  # (50, 70), column-major
    a = torch.randn(70, 3).T
    bb = torch.randn(3, 50).T
    y, _ = kernels.fused_lora_forward(x, w, None, a, bb, 2.0)
    assert_close_scaled(y, x.double() @ w.double().T + 2.0 * (x.double() @ a.double().T) @ bb.double().T)


@pytest.mark.parametrize("r", [1, 3, 16, 17, 100, 256])
def test_every_rank_up_to_256(r):
    x, w, b, a, bb = make_inputs((20,), 260, 270, r)
    y, _ = kernels.fused_lora_forward(x, w, b, a, bb, 1.0)
    assert_close_scaled(y, x.double() @ w.double().T + (x.double() @ a.double().T) @ bb.double().T + b.double())


def test_rank_padding_and_limits():
    assert [rank_block(r) for r in (1, 3, 16, 17, 40, 256)] == [16, 16, 16, 32, 64, 256]
    with pytest.raises(ValueError, match="rank r=257"):
        rank_block(257)


def test_large_ranks_prune_to_tiles_that_fit():
    kept = prune_for_rank(GEMM_CONFIGS, {"R_PAD": 256})
    assert kept and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128 for c in kept)
    bf16 = prune_for_rank(GEMM_CONFIGS, {"R_PAD": 16, "u_ptr": torch.empty(0, dtype=torch.bfloat16)})
    area = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
    assert bf16 == [c for c in GEMM_CONFIGS if c.num_warps == 4 or area(c) > 128 * 128]
    masked = prune_for_rank(GEMM_CONFIGS, {"R_PAD": 16, "u_ptr": torch.empty(0, dtype=torch.bfloat16), "DROPOUT": True})
    assert [c for c in masked if area(c) == 128 * 128] == [
        c for c in GEMM_CONFIGS if area(c) == 128 * 128 and c.num_warps == 8
    ]


def test_short_inputs_prune_to_small_tiles():
    bf16 = torch.empty(0, dtype=torch.bfloat16)
    kept = prune_for_rank(GEMM_CONFIGS, {"R_PAD": 16, "u_ptr": bf16, "M_BUCKET": 32, "N": 100})
    assert kept and all(c.kwargs["BLOCK_M"] == 64 and c.kwargs["BLOCK_N"] <= 128 for c in kept)
    big = prune_for_rank(GEMM_CONFIGS, {"R_PAD": 16, "u_ptr": bf16, "M_BUCKET": 8192, "N": 4096})
    assert big == prune_for_rank(GEMM_CONFIGS, {"R_PAD": 16, "u_ptr": bf16})


def test_skinny_kernels_take_small_fp32_tiles():
    configs = lora_weight_grad_tuned.configs
    prune = lora_weight_grad_tuned.early_config_prune
    assert prune(configs, {"u_ptr": torch.empty(0, dtype=torch.bfloat16)}) == SMALL_TILES.split(configs)[0]
    kept = prune(configs, {"u_ptr": torch.empty(0)})
    assert kept and all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_P"] <= 64 for c in kept)


def test_fp32_tiles_fit_shared_memory_and_registers():
    kept = prune_for_rank(GEMM_CONFIGS, {"R_PAD": 16, "u_ptr": torch.empty(0)})
    assert len(kept) >= 2
    for c in kept:
        kw = c.kwargs
        assert c.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * 4 <= 227 * 1024
        assert kw["BLOCK_K"] == 32 and (kw["BLOCK_M"] * kw["BLOCK_N"] < 64 * 128 or c.num_warps == 8)


def test_dropout_mask_is_a_function_of_seed_and_position():
    m1 = kernels.dropout_keep_mask(7, (50, 90), 0.4, "cpu")
    assert torch.equal(m1, kernels.dropout_keep_mask(7, (50, 90), 0.4, "cpu"))
    assert not torch.equal(m1, kernels.dropout_keep_mask(8, (50, 90), 0.4, "cpu"))
    # Row m of a taller input has the same mask: positions, not tiling, decide.
    assert torch.equal(m1, kernels.dropout_keep_mask(7, (80, 90), 0.4, "cpu")[:50])


def _philox4x32_10(counter, key):
    """Philox-4x32-10 (Salmon et al., 2011) in numpy: counter (4, n) and key (2,) uint32 -> (4, n)."""
    mask32 = np.uint64(0xFFFFFFFF)
    c = [np.asarray(x, dtype=np.uint64) for x in counter]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        prod_b, prod_a = np.uint64(0xCD9E8D57) * c[2], np.uint64(0xD2511F53) * c[0]
        c = [
            (prod_b >> np.uint64(32)) ^ c[1] ^ k0,
            prod_b & mask32,
            (prod_a >> np.uint64(32)) ^ c[3] ^ k1,
            prod_a & mask32,
        ]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask32, (k1 + np.uint64(0xBB67AE85)) & mask32
    return c


def test_dropout_mask_matches_its_definition():
    """keep(m, k) = philox(seed; k // 4, m, 0, 0)[k % 4] >= p·2³²: one Philox call per four columns."""
    seed, p, rows, cols = 0x1234_5678_9ABC, 0.3, 5, 24
    m, k = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    zeros = np.zeros(m.size, dtype=np.uint64)
    outputs = _philox4x32_10((k.ravel() // 4, m.ravel(), zeros, zeros), (seed & 0xFFFFFFFF, seed >> 32))
    chosen = np.choose(k.ravel() % 4, outputs).reshape(rows, cols)
    threshold = int(np.float32(p) * np.float32(2.0**32))
    expected = torch.from_numpy(chosen >= threshold)
    assert torch.equal(kernels.dropout_keep_mask(seed, (rows, cols), p, "cpu"), expected)


@pytest.mark.parametrize("api", ["legacy", "fp32_precision"])
def test_fp32_dot_precision_follows_torch_tf32_permission(api):
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
    try:
        for allowed, expected in ((True, "tf32"), (False, "ieee")):
            if api == "legacy":
                matmul.allow_tf32 = allowed
            elif hasattr(matmul, "fp32_precision"):
                matmul.fp32_precision = "tf32" if allowed else "ieee"
            else:
                pytest.skip("this torch has no fp32_precision API")
            assert dot_precision(torch.float32) == expected
            assert dot_precision(torch.bfloat16) == "ieee"  # 16-bit products are exact in fp32
    finally:
        if hasattr(matmul, "fp32_precision"):
            matmul.fp32_precision = saved
        else:
            matmul.allow_tf32 = saved


def test_launcher_errors():
    x, w, b, a, bb = make_inputs((8,), 32, 24, 4)
    with pytest.raises(ValueError, match=r"weight has shape \(24, 31\), expected \(24, 32\)"):
        kernels.fused_lora_forward(x, w[:, :31], b, a, bb, 1.0)
    with pytest.raises(ValueError, match=r"lora_B is torch\.float16 but the input is torch\.float32"):
        kernels.fused_lora_forward(x, w, b, a, bb.half(), 1.0)
    with pytest.raises(ValueError, match="x must be 2-D"):
        kernels.fused_lora_forward(x[None], w, b, a, bb, 1.0)
    with pytest.raises(ValueError, match="float64"):
        kernels.fused_lora_forward(x.double(), w.double(), b.double(), a.double(), bb.double(), 1.0)
    with pytest.raises(ValueError, match=r"dropout probability 1.0 must be in \(0, 1\)"):
        kernels.dropout_xa(x, a, 1.0, seed=0)


def test_exported_triton_interpret_0_errors_instead_of_skipping():
    """``TRITON_INTERPRET=0`` (as bench/gpu.sh exports) makes every interpreter-only module a collection error
    naming the variable: pytest exits non-zero, nothing is skipped silently."""
    tests = Path(__file__).parent
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *INTERPRETER_ONLY],
        cwd=tests, env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == pytest.ExitCode.INTERRUPTED, run.stdout[-2000:]
    assert f"{len(INTERPRETER_ONLY)} errors during collection" in run.stdout, run.stdout[-2000:]
    errors = {}  # module -> its collection error's text (the short summary may repeat it in full where CI=true)
    for section in run.stdout.split("ERROR collecting ")[1:]:
        path, _, text = section.partition("\n")
        errors[Path(path.strip(" _")).name] = text.split("______", 1)[0]
    for module in INTERPRETER_ONLY:
        assert "TRITON_INTERPRET='0': this module tests the Triton kernels" in errors.get(module, ""), module
    assert "skipped" not in run.stdout
