"""The compiled Triton kernels on a CUDA GPU (run by ``bench/gpu.sh``; skipped on CPU-only machines).

Run with ``TRITON_INTERPRET=0 python -m pytest tests/test_cuda.py``: the rest of the suite runs the
kernels through the interpreter, which cannot share a process with compiled kernels.
"""

import pytest
import torch

from conftest import TOLERANCES, reference_lora
from lorafast import FusedLoRALinear, kernels, lora_linear
from lorafast.backend import resolve_backend
from lorafast.dropout import draw_seed
from lorafast.kernels.fused_lora_matmul import fused_lora_matmul_tuned
from lorafast.profiling import saved_activation_bytes

pytestmark = pytest.mark.skipif(
    kernels.INTERPRETED or not torch.cuda.is_available(),
    reason="needs a CUDA GPU and compiled Triton kernels (TRITON_INTERPRET=0)",
)

SHAPES = [(37, 70, 50, 3), (1000, 768, 3072, 8), (8192, 4096, 4096, 16)]


@pytest.fixture(autouse=True)
def one_config_per_kernel(monkeypatch):
    """Correctness does not need autotuning; it would compile every config for every shape."""
    monkeypatch.setenv("LORAFAST_AUTOTUNE", "0")


def _inputs(n, d_in, d_out, r, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device="cuda") * scale).to(dtype)
    return (
        make(n, d_in),
        make(d_out, d_in, scale=d_in**-0.5),
        make(d_out),
        make(r, d_in, scale=d_in**-0.5),
        make(d_out, r),
    )


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference_on_cuda(shape, dtype, dropout_p):
    n, d_in, d_out, r = shape
    x, w, b, a, bb = _inputs(n, d_in, d_out, r, dtype)
    x, a, bb = (t.requires_grad_() for t in (x, a, bb))
    torch.manual_seed(5)
    y = lora_linear(x, w, b, a, bb, 2.0, dropout_p=dropout_p, training=True)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb), gy)
    torch.manual_seed(5)
    keep = kernels.dropout_keep_mask(draw_seed(), (n, d_in), dropout_p, "cuda") if dropout_p else None
    ref = [t.detach().float().requires_grad_() for t in (x, a, bb)]
    y_ref = reference_lora(ref[0], w.float(), b.float(), ref[1], ref[2], 2.0, keep=keep, p=dropout_p)
    grads_ref = torch.autograd.grad(y_ref, ref, gy.float())
    atol, rtol = TOLERANCES[torch.float16 if dtype == torch.float32 else dtype]  # fp32 may run as tf32
    for got, want in zip((y, *grads), (y_ref, *grads_ref)):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.float(), want, atol=atol * scale, rtol=rtol)


@pytest.mark.parametrize("config", fused_lora_matmul_tuned.configs, ids=str)
def test_every_config_compiles_and_is_correct(config):
    x, w, b, a, bb = _inputs(300, 520, 260, 24, torch.bfloat16)
    y, xa = kernels.fused_lora_forward(x, w, b, a, bb, 1.5, config=config)
    xa_want = x.float() @ a.float().T
    want = x.float() @ w.float().T + 1.5 * xa_want @ bb.float().T + b.float()
    torch.testing.assert_close(xa.float(), xa_want, atol=5e-2 * xa_want.abs().max().item(), rtol=2e-2)
    torch.testing.assert_close(y.float(), want, atol=5e-2 * want.abs().max().item(), rtol=2e-2)


def test_autotuned_kernels_are_correct(monkeypatch):
    monkeypatch.setenv("LORAFAST_AUTOTUNE", "1")
    x, w, b, a, bb = _inputs(2048, 1024, 1024, 16, torch.bfloat16)
    y = lora_linear(x, w, b, a, bb, 2.0)
    want = x.float() @ w.float().T + 2.0 * (x.float() @ a.float().T) @ bb.float().T + b.float()
    torch.testing.assert_close(y.float(), want, atol=5e-2 * want.abs().max().item(), rtol=2e-2)


def test_auto_backend_is_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("LORAFAST_BACKEND", raising=False)
    assert resolve_backend(torch.device("cuda"), torch.bfloat16) == "triton"


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_saved_bytes_on_cuda(dropout):
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer = FusedLoRALinear(1024, 1024, r=16, dropout=dropout, device="cuda", dtype=torch.bfloat16).train()
    saved = saved_activation_bytes(lambda: layer(x), exclude=list(layer.parameters()))
    assert saved <= x.numel() * x.element_size() + 4096 * 16 * x.element_size()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(37, 70, 50), (4096, 4096, 4096)])
def test_mixed_adapter_kernels_match_the_torch_path_on_cuda(shape, dtype, monkeypatch):
    """The compiled segment kernels against the PyTorch mixed path, on unsorted ids with base-only rows."""
    from lorafast import multi_lora_linear

    n, d_in, d_out = shape
    g = torch.Generator(device="cuda").manual_seed(3)
    make = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device="cuda") * scale).to(dtype)
    x, w, b = make(n, d_in), make(d_out, d_in, scale=d_in**-0.5), make(d_out)
    lora_A, lora_B = make(8, 16, d_in, scale=d_in**-0.5), make(8, d_out, 16)
    ids = torch.randint(-1, 8, (n,), generator=g, device="cuda")
    gy = make(n, d_out)
    results = []
    for backend, to in (("triton", dtype), ("torch", torch.float32)):  # reference: fp32 on the rounded inputs
        monkeypatch.setenv("LORAFAST_BACKEND", backend)
        leaves = [t.detach().to(to).requires_grad_() for t in (x, lora_A, lora_B)]
        scalings = [2.0, 0.5, 1.0, 3.0, 1.5, 2.5, 0.25, 4.0]
        y = multi_lora_linear(leaves[0], w.to(to), b.to(to), leaves[1], leaves[2], scalings, ids)
        results.append((y, *torch.autograd.grad(y, leaves, gy.to(to))))
    atol, rtol = TOLERANCES[torch.float16 if dtype == torch.float32 else dtype]  # fp32 may run as tf32
    for got, want in zip(*results):
        assert got.dtype == dtype
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.float(), want, atol=atol * scale, rtol=rtol)
