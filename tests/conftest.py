"""Shared fixtures: Triton runs through its interpreter so the real kernels are tested on CPU."""

import os

# Must be set before triton.jit decorates lorafast's kernels (when lorafast.kernels is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import lorafast.dropout
import lorafast.kernels

BACKENDS = ["torch", "triton"]

# The compiled kernels' tests need a GPU (bench/gpu.sh runs them); CPU runs do not collect them.
collect_ignore = [] if torch.cuda.is_available() else ["test_cuda.py"]

# (dtype, atol, rtol) against an fp32/fp64 reference computed from the same rounded inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run the test once per backend, selected the way users select it."""
    monkeypatch.setenv("LORAFAST_BACKEND", request.param)
    return request.param


def reference_lora(x, weight, bias, lora_A, lora_B, scaling, keep=None, p=0.0):
    """Naive LoRA linear under plain autograd: ``x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ``."""
    dropped = x if keep is None else x * keep.to(x.dtype) / (1.0 - p)
    y = x @ weight.T + scaling * (dropped @ lora_A.T) @ lora_B.T
    return y if bias is None else y + bias


def keep_mask(backend, seed, shape, p):
    """The dropout keep mask that ``backend`` derives from ``seed`` for a ``(rows, cols)`` input."""
    if backend == "triton":
        return lorafast.kernels.dropout_keep_mask(seed, shape, p, device="cpu")
    return lorafast.dropout.keep_mask(seed, shape, p)


def make_inputs(n_shape, in_f, out_f, r, dtype=torch.float32, bias=True, seed=0):
    """x ``(*n_shape, in_f)`` and frozen W, b with O(1) outputs, plus non-zero A and B."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*n_shape, in_f, generator=g)
    weight = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    b = torch.randn(out_f, generator=g) if bias else None
    lora_A = torch.randn(r, in_f, generator=g) / in_f**0.5
    lora_B = torch.randn(out_f, r, generator=g) / r**0.5
    to = lambda t: None if t is None else t.to(dtype)
    return to(x), to(weight), to(b), to(lora_A), to(lora_B)
