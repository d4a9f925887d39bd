"""torch.compile of a small model built from FusedLoRALinear runs on CPU and matches eager."""

import inspect
import subprocess
import sys

import pytest
import torch
from torch import nn

from lorafast import FusedLoRALinear
from lorafast.kernels import lora_linear as kernel_lora_linear
from lorafast.kernels import multi_lora_linear as kernel_multi_lora_linear
from lorafast.multi_function import apply_multi_lora


def _model(dropout=0.0, use_dora=False):
    torch.manual_seed(0)
    options = {"dropout": dropout, "use_dora": use_dora}
    model = nn.Sequential(FusedLoRALinear(16, 32, r=4, **options), nn.GELU(), FusedLoRALinear(32, 8, r=2, **options))
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.lora_B, std=0.5)
    return model


def _forward_backward(model, x):
    torch.manual_seed(1)  # the same dropout seeds for eager and compiled
    x = x.detach().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


@pytest.mark.parametrize(
    "backend,mode,dropout",
    [("torch", "train", 0.0), ("torch", "eval", 0.2), ("torch", "train", 0.2), ("triton", "train", 0.2)],
)
def test_compiled_model_matches_eager(backend, mode, dropout, monkeypatch):
    """The PyTorch path is traced into the graph; the Triton launchers run as operators inside it."""
    monkeypatch.setenv("LORAFAST_BACKEND", backend)
    model = _model(dropout).train(mode == "train")
    x = torch.randn(3, 5, 16)
    eager = _forward_backward(model, x)
    compiled = _forward_backward(torch.compile(model), x)
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-4, rtol=1e-4)
    for got, want in zip(compiled[2], eager[2]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "backend,mode,dropout",
    [("torch", "train", 0.0), ("torch", "eval", 0.2), ("torch", "train", 0.1), ("triton", "train", 0.0),
     ("triton", "eval", 0.2), ("triton", "train", 0.1)],
)  # fmt: skip
def test_compiled_model_has_no_graph_break(backend, mode, dropout, monkeypatch):
    """fullgraph=True: a LoRA layer adds no graph break. Training with dropout, both paths draw their
    seeds inside the graph (``lorafast::draw_seed``) from torch's default generator, so the masks are
    eager's; the PyTorch path draws its NumPy mask inside the graph too (``lorafast::keep_mask``)."""
    monkeypatch.setenv("LORAFAST_BACKEND", backend)
    torch._dynamo.reset()
    model = _model(dropout).train(mode == "train")
    x = torch.randn(3, 5, 16)
    eager = _forward_backward(model, x)
    compiled = _forward_backward(torch.compile(model, fullgraph=True), x)
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-4, rtol=1e-4)
    assert len(compiled[2]) == len(eager[2]) == 4
    for got, want in zip(compiled[2], eager[2]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "backend,mode,dropout",
    [("torch", "train", 0.0), ("torch", "eval", 0.2), ("torch", "train", 0.1), ("triton", "train", 0.0),
     ("triton", "train", 0.1)],
)  # fmt: skip
def test_compiled_dora_model_has_no_graph_break(backend, mode, dropout, monkeypatch):
    """fullgraph=True over DoRA layers: the base norms are computed in the graph, the Triton forward runs as
    ``lorafast::dora_forward`` and m's gradient (data-dependent where m = 0) as ``lorafast::dora_magnitude_grad``;
    outputs and the gradients of x, A, B and m match eager, also for a zero magnitude entry."""
    monkeypatch.setenv("LORAFAST_BACKEND", backend)
    torch._dynamo.reset()
    model = _model(dropout, use_dora=True).train(mode == "train")
    with torch.no_grad():
        model[0].lora_magnitude[3] = 0.0  # its gradient needs the pre-scale output recomputed on that column
    x = torch.randn(3, 5, 16)
    eager = _forward_backward(model, x)
    compiled = _forward_backward(torch.compile(model, fullgraph=True), x)
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-4, rtol=1e-4)
    assert len(compiled[2]) == len(eager[2]) == 6
    assert eager[2][2][3] != 0  # dm of the zeroed entry
    for got, want in zip(compiled[2], eager[2]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _mixed_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 40, 16)
    weight, bias = torch.randn(24, 16), torch.randn(24)
    lora_A = torch.randn(3, 4, 16).requires_grad_()
    lora_B = torch.randn(3, 24, 4).requires_grad_()
    rows = torch.arange(80) % 4 - 1  # adapters 0..2 and the base layer (−1), interleaved
    return x, weight, bias, lora_A, lora_B, torch.tensor([0.5, 1.0, 2.0]), rows


def _mixed_forward_backward(call, x, weight, bias, lora_A, lora_B, scalings, rows, dropout):
    torch.manual_seed(1)  # the same dropout seeds for eager and compiled
    x = x.detach().requires_grad_()
    out = call(x, weight, bias, lora_A, lora_B, scalings, rows, dropout)
    out.square().sum().backward()
    grads = (x.grad, lora_A.grad.clone(), lora_B.grad.clone())
    lora_A.grad = lora_B.grad = None
    return out.detach(), *grads


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_mixed_adapter_call_has_no_graph_break(backend, monkeypatch):
    """fullgraph=True over a mixed-adapter call: the Triton launchers run as the operators
    ``lorafast::multi_lora_forward`` / ``multi_lora_backward``; outputs and gradients match eager."""
    monkeypatch.setenv("LORAFAST_BACKEND", backend)
    torch._dynamo.reset()
    inputs = _mixed_inputs()
    eager = _mixed_forward_backward(apply_multi_lora, *inputs, None)
    compiled = _mixed_forward_backward(torch.compile(apply_multi_lora, fullgraph=True), *inputs, None)
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_import_does_not_load_dynamo():
    """``import lorafast`` leaves torch._dynamo unloaded (importing it takes seconds); torch.compile loads it."""
    code = "import sys, lorafast; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_mixed_adapter_dropout_matches_eager(backend, monkeypatch):
    """Under dropout the seed comes from torch's generator: compiled masks are eager's. Both paths draw it
    inside the graph (fullgraph=True), the PyTorch path its per-row masks too (``lorafast::keep_mask``)."""
    monkeypatch.setenv("LORAFAST_BACKEND", backend)
    torch._dynamo.reset()
    inputs = _mixed_inputs()
    dropout = torch.tensor([0.0, 0.3, 0.5])
    eager = _mixed_forward_backward(apply_multi_lora, *inputs, dropout)
    compiled = _mixed_forward_backward(torch.compile(apply_multi_lora, fullgraph=True), *inputs, dropout)
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


class _TwoCallsOfOneLayer(nn.Module):
    """The same LoRA layer twice on the same input, then a second layer: three dropout draws."""

    def __init__(self):
        super().__init__()
        self.shared, self.other = _model(0.5)[0], FusedLoRALinear(32, 32, r=2, dropout=0.5)
        nn.init.normal_(self.other.lora_B, std=0.5)

    def forward(self, x):
        return self.shared(x), self.shared(x), self.other(self.shared(x))


def _record_seeds(monkeypatch, module):
    """The dropout seeds the kernels run with, in call order (``_forward`` receives every one)."""
    seeds, forward = [], module._forward
    signature = inspect.signature(forward)

    def spy(*args):
        seeds.append(int(signature.bind(*args).arguments["seed"]))
        return forward(*args)

    monkeypatch.setattr(module, "_forward", spy)
    return seeds


def test_compiled_calls_draw_distinct_seeds(monkeypatch):
    """fullgraph=True: every LoRA call in the graph draws its own seed — the compiler neither merges
    identical draws (one layer twice on one input) nor reorders them — and the same seeds as eager."""
    monkeypatch.setenv("LORAFAST_BACKEND", "triton")
    torch._dynamo.reset()
    model, x = _TwoCallsOfOneLayer().train(), torch.randn(3, 5, 16)
    seeds = _record_seeds(monkeypatch, kernel_lora_linear)
    outputs = {}
    for name, run in (("eager", model), ("compiled", torch.compile(model, fullgraph=True))):
        torch.manual_seed(1)
        outputs[name] = [y.detach() for y in run(x)]
    eager_seeds, compiled_seeds = seeds[:4], seeds[4:]
    assert len(set(compiled_seeds)) == 4
    assert compiled_seeds == eager_seeds
    first, second, _ = outputs["compiled"]
    assert not torch.allclose(first, second)  # two masks on one input
    for got, want in zip(outputs["compiled"], outputs["eager"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_compiled_mixed_adapter_calls_draw_distinct_seeds(monkeypatch):
    """Two mixed-adapter calls on one input in one graph draw two seeds, eager's."""
    monkeypatch.setenv("LORAFAST_BACKEND", "triton")
    torch._dynamo.reset()
    x, weight, bias, lora_A, lora_B, scalings, rows = _mixed_inputs()
    dropout = torch.tensor([0.2, 0.3, 0.5])

    def twice(x):
        return [apply_multi_lora(x, weight, bias, lora_A, lora_B, scalings, rows, dropout) for _ in range(2)]

    seeds = _record_seeds(monkeypatch, kernel_multi_lora_linear)
    outputs = {}
    with torch.no_grad():
        for name, run in (("eager", twice), ("compiled", torch.compile(twice, fullgraph=True))):
            torch.manual_seed(1)
            outputs[name] = run(x)
    assert seeds[2:] == seeds[:2] and seeds[0] != seeds[1]
    assert not torch.allclose(*outputs["compiled"])
    for got, want in zip(outputs["compiled"], outputs["eager"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
