"""Bad input fails before any work, with an error that names the problem."""

import pytest
import torch
from torch import nn

from conftest import make_inputs
from lorafast import FusedLoRALinear, lora_linear


@pytest.fixture
def inputs():
    return make_inputs((6,), 16, 12, 4)


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda x, w, b, a, bb: (x[:, :15], w, b, a, bb),
            r"x has shape \(6, 15\); its last dimension must be in_features = 16",
        ),
        (lambda x, w, b, a, bb: (x, w[None], b, a, bb), "weight must be 2-D"),
        (lambda x, w, b, a, bb: (x, w, b[:5], a, bb), r"bias must have shape \(12,\)"),
        (lambda x, w, b, a, bb: (x, w, b, a[:, :8], bb), r"lora_A must have shape \(r, in_features=16\)"),
        (lambda x, w, b, a, bb: (x, w, b, a, bb[:, :3]), r"lora_B must have shape \(out_features, r\) = \(12, 4\)"),
        (lambda x, w, b, a, bb: (x, w, b, torch.randn(0, 16), torch.randn(12, 0)), "r=0 must be at least 1"),
        (
            lambda x, w, b, a, bb: (x.half(), w, b, a, bb),
            "dtype mismatch: x is torch.float16 but weight is torch.float32",
        ),
        (
            lambda x, w, b, a, bb: (x, w, b, a, bb.double()),
            "dtype mismatch: x is torch.float32 but lora_B is torch.float64",
        ),
        (lambda x, w, b, a, bb: (x.long(), w.long(), b, a, bb), "x must be a floating tensor"),
        (lambda x, w, b, a, bb: (x, w, b, a, bb.to("meta")), "device mismatch: x is on cpu but lora_B is on meta"),
        (lambda x, w, b, a, bb: (x.numpy(), w, b, a, bb), "x must be a torch.Tensor"),
    ],
)
def test_bad_tensors(backend, inputs, change, message):
    with pytest.raises(ValueError, match=message):
        lora_linear(*change(*inputs), 2.0)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, "0.1", True])
def test_bad_dropout(inputs, p):
    with pytest.raises(ValueError, match="dropout probability must be a number in"):
        lora_linear(*inputs, 2.0, dropout_p=p, training=True)
    with pytest.raises(ValueError, match="dropout probability must be a number in"):
        FusedLoRALinear(16, 12, dropout=p)


@pytest.mark.parametrize("scaling", [float("nan"), float("inf"), "2", None])
def test_bad_scaling(inputs, scaling):
    with pytest.raises(ValueError, match=r"scaling .* must be a finite number"):
        lora_linear(*inputs, scaling)


@pytest.mark.parametrize("r", [0, -1, 2.5])
def test_bad_rank_in_layer(r):
    with pytest.raises(ValueError, match="rank r"):
        FusedLoRALinear(16, 12, r=r)
    with pytest.raises(ValueError, match="rank r"):
        FusedLoRALinear.from_linear(nn.Linear(16, 12), r=r)


def test_from_linear_needs_a_linear():
    with pytest.raises(ValueError, match=r"from_linear expects an nn\.Linear, got Conv1d"):
        FusedLoRALinear.from_linear(nn.Conv1d(4, 4, 1))


def test_trainable_base_weight_is_refused(inputs):
    x, w, b, a, bb = inputs
    with pytest.raises(ValueError, match=r"weight requires grad.*freeze it"):
        lora_linear(x, w.requires_grad_(), b, a, bb, 2.0)
    with pytest.raises(ValueError, match="bias requires grad"):
        lora_linear(x, w.detach(), b.requires_grad_(), a, bb, 2.0)
    with torch.no_grad():  # inference never computes a gradient: allowed
        lora_linear(x, w, b, a, bb, 2.0)


def test_unknown_backend(inputs, monkeypatch):
    monkeypatch.setenv("LORAFAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="LORAFAST_BACKEND='cuda' is not one of auto, triton, torch"):
        lora_linear(*inputs, 2.0)


def test_triton_backend_rejects_float64(inputs, monkeypatch):
    monkeypatch.setenv("LORAFAST_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"the Triton kernels support .* not torch\.float64.*LORAFAST_BACKEND=torch"):
        lora_linear(*(t.double() for t in inputs), 2.0)


def test_cuda_tensors_without_a_usable_triton(monkeypatch):
    """auto picks the kernels for CUDA tensors; without Triton that is an error, not a silent fallback."""
    from lorafast import backend

    monkeypatch.delenv("LORAFAST_BACKEND", raising=False)
    monkeypatch.setattr(backend, "_kernels_or_error", lambda: (None, "Triton could not be imported (no module)"))
    with pytest.raises(ValueError, match=r"Triton backend is needed for cuda tensors but Triton could not be imported"):
        backend.resolve_backend(torch.device("cuda"), torch.bfloat16)
    monkeypatch.setenv("LORAFAST_BACKEND", "torch")
    assert backend.resolve_backend(torch.device("cuda"), torch.bfloat16) == "torch"


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    from lorafast import backend

    class Compiled:
        INTERPRETED = False
        SUPPORTED_DTYPES = (torch.float32,)

    monkeypatch.setenv("LORAFAST_BACKEND", "triton")
    monkeypatch.setattr(backend, "_kernels_or_error", lambda: (Compiled, None))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        backend.resolve_backend(torch.device("cpu"), torch.float32)
