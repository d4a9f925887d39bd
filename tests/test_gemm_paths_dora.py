"""DoRA's forward GEMM goes through ``gemm_choice`` (op ``"dora_forward"``): both paths (the fused kernel with g in
its epilogue; cuBLAS beside the K = 0 epilogue kernel, then g and b in one pass) give the float64 DoRA output and
gradients, ``LORAFAST_GEMM`` forces either, and ``auto`` measures and remembers the choice."""

import pytest
import torch

from conftest import assert_close_scaled, make_inputs
from lorafast import kernels
from lorafast.dora import dora_linear
from lorafast.kernels import dora_linear as dora_kernels
from lorafast.kernels import gemm_choice

pytestmark = pytest.mark.skipif(not kernels.INTERPRETED, reason="kernel tests run in Triton's interpreter")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("LORAFAST_BACKEND", "triton")


def dora_reference(x, w, b, a, bb, m, s):
    """y of DoRA in float64 autograd (the norm detached), leaves x, a, bb, m."""
    norm = (w.double() + s * bb.detach() @ a.detach()).norm(dim=1)
    return (m / norm) * (x @ w.double().T + s * (x @ a.T) @ bb.T) + b.double()


def spy(monkeypatch, name):
    calls = []
    original = getattr(dora_kernels, name)
    monkeypatch.setattr(dora_kernels, name, lambda *a, **k: calls.append(name) or original(*a, **k))
    return calls


@pytest.mark.parametrize("path", gemm_choice.PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_forward_on_both_gemm_paths_matches_float64(path, dtype, monkeypatch):
    monkeypatch.setenv("LORAFAST_GEMM", path)
    composite = spy(monkeypatch, "cublas_dora_matmul")
    x, w, b, a, bb = make_inputs((29,), 40, 36, 4, dtype=dtype)
    m = torch.rand(36, generator=torch.Generator().manual_seed(2)).add_(0.5)
    leaves = [t.clone().requires_grad_() for t in (x, a, bb, m)]
    y = dora_linear(leaves[0], w, b, *leaves[1:], 1.5)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(y, leaves, grad_y)
    assert len(composite) == (path == "cublas")
    ref = [t.detach().double().requires_grad_() for t in (x, a, bb, m)]
    y_ref = dora_reference(ref[0], w, b, *ref[1:], 1.5)
    for got, want in zip((y, *grads), (y_ref, *torch.autograd.grad(y_ref, ref, grad_y.double()))):
        assert_close_scaled(got, want, rel=TOLERANCE[dtype])


def test_dora_forward_choice_is_measured_and_remembered(monkeypatch, tmp_path):
    """auto's measuring path (CPU timings stand in): both candidates timed once under op "dora_forward"."""
    monkeypatch.delenv("LORAFAST_GEMM", raising=False)
    monkeypatch.setattr(gemm_choice, "MEASURED_DEVICE_TYPES", {"cuda", "cpu"})
    timed = []
    seconds = {"cublas_dora_matmul": 1.0}

    def timer(fn):
        before = len(composite)
        fn()
        timed.append("cublas" if len(composite) > before else "triton")
        return seconds.get("cublas_dora_matmul" if timed[-1] == "cublas" else "", 2.0)

    composite = spy(monkeypatch, "cublas_dora_matmul")
    chooser = gemm_choice.GemmChooser(tmp_path / "choices.json", timer)
    monkeypatch.setattr(gemm_choice, "_CHOOSER", chooser)
    x, w, b, a, bb = make_inputs((29,), 40, 36, 4)
    m = torch.rand(36).add_(0.5)
    for _ in range(2):
        dora_linear(x, w, b, a, bb, m, 1.5)
    assert sorted(timed) == ["cublas", "triton"]
    [key] = [k for k in chooser.choices if k.startswith("dora_forward|")]
    assert chooser.choices[key]["path"] == "cublas"
