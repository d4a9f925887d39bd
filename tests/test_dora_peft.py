"""DoRA against PEFT: patch_peft runs PEFT's DoRA layers with PEFT's results, DoRA adapters load both ways."""

import copy
import json
from functools import partial

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from test_dora import central_differences
from tiny_models import MODELS, TASK_TYPES, lm_batch

import lorafast
from conftest import assert_close_scaled
from lorafast import apply_lora, load_adapter, lora_layers, patch_peft, save_adapter
from lorafast.adapter import CONFIG_NAME, WEIGHTS_NAME
from lorafast.dropout import draw_seed, keep_mask
from lorafast.peft_patch import patched_layer_count

KINDS = ["bart", "llama"]
_close = partial(assert_close_scaled, rel=1e-5)


def _peft_dora(kind, r=8, dropout=0.0):
    """A PEFT DoRA model of ``kind`` with random B and magnitudes away from their init (g ≠ 1)."""
    torch.manual_seed(1)
    config = LoraConfig(
        r=r, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False,
        use_dora=True, task_type=TASK_TYPES[kind], fan_in_fan_out=kind == "gpt2",
    )  # fmt: skip
    model = get_peft_model(MODELS[kind](), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.2 * torch.randn(param.shape))
    return model


def _adapter_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def dora_calls(monkeypatch):
    calls = {"n": 0}
    real = lorafast.dora.dora_linear  # what lorafast.base_linear runs for a DoRA adapter over a dense base

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(lorafast.dora, "dora_linear", counted)
    return calls


@pytest.mark.parametrize("kind", [*KINDS, "gpt2"])  # GPT-2: Conv1D, fan_in_fan_out
def test_patched_dora_logits_and_gradients_equal_peft(kind, dora_calls):
    peft_model = _peft_dora(kind)
    layers = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_magnitude_vector"))
    patched = patch_peft(copy.deepcopy(peft_model))
    assert patched_layer_count(patched) == layers > 0
    batch = lm_batch(kind)
    outs = []
    for model in (peft_model.eval(), patched.eval()):  # eval: the models' own dropout off
        out = model(**batch)
        out.loss.backward()
        outs.append(out)
    assert dora_calls["n"] == layers
    _close(outs[1].logits, outs[0].logits)
    want, got = _adapter_grads(peft_model), _adapter_grads(patched)
    assert want.keys() == got.keys() and len(want) == 3 * layers  # A, B and m of every layer
    for name in want:
        _close(got[name], want[name])


def test_patched_dora_layer_with_dropout_has_the_gradients_of_central_differences(dora_calls):
    """float64, dropout 0.3, a patched PEFT DoRA layer: dX, dA, dB, dm equal central differences of the function
    lorafast computes (its mask from the seed; the norm held constant, as PEFT's detached norm is)."""
    torch.manual_seed(0)
    config = LoraConfig(
        r=2, lora_alpha=3, lora_dropout=0.3, target_modules=["0"], init_lora_weights=False, use_dora=True
    )
    model = patch_peft(get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 5)).double(), config))
    layer = model.base_model.model[0].train()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    weight, bias, s = layer.base_layer.weight.detach(), layer.base_layer.bias.detach(), layer.scaling["default"]
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    y = layer(x)
    assert dora_calls["n"] == 1
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, b, m), grad)
    torch.manual_seed(3)
    keep = keep_mask(draw_seed(), x.shape, 0.3)
    norm = torch.linalg.vector_norm(weight + s * b @ a, dim=1).detach()

    def loss(x, a, b, m):
        return ((m / norm * (x @ weight.t() + s * ((x * keep / 0.7) @ a.t()) @ b.t()) + bias) * grad).sum()

    for want_grad, numeric in zip(got, central_differences(loss, (x, a, b, m)), strict=True):
        torch.testing.assert_close(want_grad, numeric, atol=1e-7, rtol=1e-6)


def test_patched_dora_merge_and_unmerge_are_peft_s():
    peft_model = _peft_dora("llama")
    patched = patch_peft(copy.deepcopy(peft_model))
    batch = lm_batch("llama")
    with torch.no_grad():
        want = peft_model.eval()(**batch).logits
        patched.eval().merge_adapter()
        _close(patched(**batch).logits, want)
        patched.unmerge_adapter()
        _close(patched(**batch).logits, want)


def _trained_lorafast_dora(kind):
    model = apply_lora(MODELS[kind](), target_modules=["q_proj", "v_proj"], r=8, alpha=16, use_dora=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
            layer.lora_magnitude.mul_(1.0 + 0.2 * torch.randn(layer.lora_magnitude.shape, generator=g))
    return model


def _logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


@pytest.mark.parametrize("kind", KINDS)
def test_lorafast_dora_adapter_loads_in_peft_and_back(kind, tmp_path):
    model = _trained_lorafast_dora(kind)
    save_adapter(model, tmp_path / "ours", task_type=TASK_TYPES[kind])
    config = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert config["use_dora"] is True
    keys = load_file(tmp_path / "ours" / WEIGHTS_NAME).keys()
    assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == len(dict(lora_layers(model)))
    batch = lm_batch(kind)
    peft_model = PeftModel.from_pretrained(MODELS[kind](), tmp_path / "ours")
    torch.testing.assert_close(_logits(peft_model, batch), _logits(model, batch), atol=1e-5, rtol=1e-5)
    peft_model.save_pretrained(tmp_path / "peft")
    back = load_adapter(MODELS[kind](), tmp_path / "peft")
    assert all(layer.use_dora for _, layer in lora_layers(back))
    torch.testing.assert_close(_logits(back, batch), _logits(model, batch), atol=1e-5, rtol=1e-5)


def test_peft_dora_adapter_loads_in_lorafast(tmp_path):
    peft_model = _peft_dora("bart")
    peft_model.save_pretrained(tmp_path)
    model = load_adapter(MODELS["bart"](), tmp_path)
    batch = lm_batch("bart")
    torch.testing.assert_close(_logits(model, batch), _logits(peft_model, batch), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="use_dora=True but LoRA layers"):
        load_adapter(apply_lora(MODELS["bart"](), target_modules="all-linear", r=8), tmp_path)
