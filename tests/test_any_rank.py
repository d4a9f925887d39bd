"""Any rank r >= 1, as PEFT: r above min(in_features, out_features) works in every entry point, with PEFT's numbers."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import lorafast
from conftest import assert_close_scaled, reference_lora
from lorafast import FusedLoRALinear, adapter_ids, add_adapter, apply_lora, load_adapter, lora_layers, save_adapter
from lorafast.peft_patch import patched_layer_count

# (in_features, out_features, r): r = 8 on a 10 -> 2 head, r = 16 on a 10 -> 20 layer (both above min(in, out)).
SHAPES = [(10, 2, 8), (10, 20, 16)]
TOL = 1e-6


def _close(actual, expected):
    assert_close_scaled(actual, expected, rel=TOL)


class _Net(nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.proj(x)


def _net(in_features, out_features, seed=0):
    torch.manual_seed(seed)
    return _Net(in_features, out_features)


def _peft(in_features, out_features, r, seed=0):
    """A PEFT model with non-zero B, so the adapter changes the output."""
    config = LoraConfig(r=r, lora_alpha=2 * r + 3, target_modules=["proj"], init_lora_weights=False)
    model = get_peft_model(_net(in_features, out_features, seed), config)
    return model


def _forward_backward(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.pow(2).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize(("in_f", "out_f", "r"), SHAPES)
def test_layer_forward_and_gradients_equal_the_float64_reference(backend, in_f, out_f, r):
    layer = FusedLoRALinear(in_f, out_f, r=r, alpha=2 * r + 3)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, in_f, requires_grad=True)
    layer(x).pow(2).sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    a64, b64 = (p.detach().double().requires_grad_(True) for p in (layer.lora_A, layer.lora_B))
    want = reference_lora(x64, layer.weight.double(), layer.bias.double(), a64, b64, layer.scaling)
    want.pow(2).sum().backward()
    _close(layer(x), want)
    for got, ref in ((x.grad, x64.grad), (layer.lora_A.grad, a64.grad), (layer.lora_B.grad, b64.grad)):
        _close(got, ref)


@pytest.mark.parametrize(("in_f", "out_f", "r"), SHAPES)
def test_apply_lora_and_patch_peft_equal_peft(in_f, out_f, r):
    peft_model = _peft(in_f, out_f, r)
    patched = lorafast.patch_peft(copy.deepcopy(peft_model))
    assert patched_layer_count(patched) == 1
    ours = apply_lora(_net(in_f, out_f), ["proj"], r=r, alpha=2 * r + 3)
    peft_layer = peft_model.base_model.model.proj
    with torch.no_grad():
        ours.proj.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.proj.lora_B.copy_(peft_layer.lora_B["default"].weight)
    x = torch.randn(4, in_f)
    want, want_dx = _forward_backward(peft_model, x)
    for model, layer in ((patched, patched.base_model.model.proj), (ours, ours.proj)):
        got, dx = _forward_backward(model, x)
        _close(got, want)
        _close(dx, want_dx)
        if isinstance(layer, FusedLoRALinear):
            grads = (layer.lora_A.grad, layer.lora_B.grad)
        else:
            grads = (layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad)
        _close(grads[0], peft_layer.lora_A["default"].weight.grad)
        _close(grads[1], peft_layer.lora_B["default"].weight.grad)


@pytest.mark.parametrize(("in_f", "out_f", "r"), SHAPES)
def test_peft_adapter_loads_saves_and_merges(tmp_path, in_f, out_f, r):
    peft_model = _peft(in_f, out_f, r)
    peft_model.save_pretrained(tmp_path / "peft")
    x = torch.randn(6, in_f)
    want, want_dx = _forward_backward(peft_model, x)
    ours = load_adapter(_net(in_f, out_f), tmp_path / "peft")
    assert ours.proj.r == r
    got, dx = _forward_backward(ours, x)
    _close(got, want)
    _close(dx, want_dx)
    peft_layer = peft_model.base_model.model.proj
    _close(ours.proj.lora_A.grad, peft_layer.lora_A["default"].weight.grad)
    _close(ours.proj.lora_B.grad, peft_layer.lora_B["default"].weight.grad)
    save_adapter(ours, tmp_path / "ours")
    back = PeftModel.from_pretrained(_net(in_f, out_f), tmp_path / "ours")
    with torch.no_grad():
        _close(back(x), want)
        lorafast.merge_lora(ours)
        assert type(ours.proj) is nn.Linear
        _close(ours(x), want)


@pytest.mark.parametrize(("in_f", "out_f", "r"), SHAPES)
def test_named_adapters_and_mixed_batch_accept_large_ranks(backend, tmp_path, in_f, out_f, r):
    model = add_adapter(_net(in_f, out_f), "big", ["proj"], r=r, alpha=2 * r + 3)
    add_adapter(model, "small", ["proj"], r=1, alpha=2)
    layer = model.proj
    with torch.no_grad():
        for name in ("big", "small"):
            layer.lora_B[name].normal_()
    x = torch.randn(3, 2, in_f)
    with adapter_ids(model, ["big", None, "small"]):
        got = model(x)
    for row, name in enumerate(["big", None, "small"]):
        want = layer.weight @ x[row].T + layer.bias[:, None]
        if name is not None:
            want = want + layer.scaling(name) * layer.lora_B[name] @ (layer.lora_A[name] @ x[row].T)
        _close(got[row], want.T.detach())
    save_adapter(model, tmp_path / "big", adapter_name="big")
    peft_model = PeftModel.from_pretrained(_net(in_f, out_f), tmp_path / "big")
    lorafast.set_adapter(model, "big")
    with torch.no_grad():
        _close(model(x), peft_model(x))
    assert next(lora_layers(load_adapter(_net(in_f, out_f), tmp_path / "big")))[1].r == r


def test_auto_backend_takes_the_pytorch_path_above_the_kernels_rank_range(monkeypatch):
    from lorafast.backend import resolve_backend
    from lorafast.kernels import MAX_RANK

    monkeypatch.delenv("LORAFAST_BACKEND", raising=False)
    # decided before any CUDA call, so this runs without a GPU
    assert resolve_backend(torch.device("cuda"), torch.float16, rank=MAX_RANK + 1) == "torch"
    layer = FusedLoRALinear(8, 4, r=MAX_RANK + 1)  # the PyTorch path on CPU: any rank
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 8)
    want = reference_lora(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    _close(layer(x).detach(), want.detach())
