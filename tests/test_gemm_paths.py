"""The two GEMM paths (fused Triton kernel; cuBLAS beside the K = 0 epilogue kernel) through the interpreter:
the same outputs and gradients as a float64 reference, with and without dropout, whichever ``LORAFAST_GEMM`` forces."""

import pytest
import torch

from conftest import assert_close_scaled, make_inputs, reference_lora, require_interpreter
from lorafast import kernels, lora_linear
from lorafast.dropout import draw_seed
from lorafast.kernels import gemm_choice
from lorafast.kernels.fused_lora_matmul import cublas_lora_matmul, fused_lora_matmul

require_interpreter()

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("LORAFAST_BACKEND", "triton")


@pytest.mark.parametrize("path", gemm_choice.PATHS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_paths_match_float64(path, dropout_p, dtype, monkeypatch):
    monkeypatch.setenv("LORAFAST_GEMM", path)
    n, d_in, d_out, r = 45, 70, 50, 5
    x, w, b, a, bb = make_inputs((n,), d_in, d_out, r, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, a, bb)]
    torch.manual_seed(3)
    y = lora_linear(leaves[0], w, b, leaves[1], leaves[2], 1.5, dropout_p=dropout_p, training=True)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(y, leaves, grad_y)
    torch.manual_seed(3)
    keep = kernels.dropout_keep_mask(draw_seed(), (n, d_in), dropout_p, "cpu") if dropout_p else None
    ref = [t.detach().double().requires_grad_() for t in (x, a, bb)]
    y_ref = reference_lora(ref[0], w.double(), b.double(), ref[1], ref[2], 1.5, keep=keep, p=dropout_p)
    grads_ref = torch.autograd.grad(y_ref, ref, grad_y.double())
    for got, want in zip((y, *grads), (y_ref, *grads_ref)):
        assert got.dtype == dtype
        assert_close_scaled(got, want, rel=TOLERANCE[dtype])


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_cublas_candidate_equals_the_fused_kernel(dropout_p):
    """The K = 0 epilogue plus addmm is the fused kernel's C, mask included; a transposed V (the forward's W0ᵀ)."""
    x, w, b, _, bb = make_inputs((37,), 70, 50, 3)
    up = torch.randn(37, 3)
    fused = fused_lora_matmul(x, w.t(), up, bb.t(), b, 1.5, dropout_p, 7, None)
    composite = cublas_lora_matmul(x, w.t(), up, bb.t(), b, 1.5, dropout_p, 7)
    torch.testing.assert_close(composite, fused, atol=1e-5, rtol=1e-5)
    other_seed = cublas_lora_matmul(x, w.t(), up, bb.t(), b, 1.5, dropout_p, 8)
    assert torch.equal(other_seed, composite) == (dropout_p == 0.0)  # the mask follows the seed


def test_auto_takes_the_triton_kernel_in_the_interpreter(monkeypatch):
    """Interpreter timings mean nothing: no candidate is timed, nothing is recorded."""
    monkeypatch.delenv("LORAFAST_GEMM", raising=False)
    called = []
    key = gemm_choice.GemmKey("forward", 64, 50, 70, 16, "float32", True, False, "cpu")
    path = gemm_choice.choose_path(key, {"triton": lambda: called.append(1), "cublas": lambda: called.append(2)},
                                   torch.device("cpu"))  # fmt: skip
    assert path == "triton" and called == []
