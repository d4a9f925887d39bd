"""Same A, B, alpha and r as Hugging Face PEFT's LoRA Linear: same outputs and gradients."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lorafast import FusedLoRALinear


def _peft_and_lorafast(d_in, d_out, r, alpha, dropout, bias=True):
    base = nn.Linear(d_in, d_out, bias=bias)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["0"])
    peft_layer = get_peft_model(nn.Sequential(base), config).base_model.model[0]
    ours = FusedLoRALinear.from_linear(base, r=r, alpha=alpha, dropout=dropout)
    with torch.no_grad():
        ours.lora_B.normal_(std=0.3)
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B)
    return peft_layer, ours


def _out_and_grads(layer, lora_params, x, grad_y):
    x = x.detach().requires_grad_()
    y = layer(x)
    return (y, *torch.autograd.grad(y, (x, *lora_params), grad_y))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("r,alpha", [(1, 1), (8, 16), (5, 32)])
def test_outputs_and_gradients_match_peft(backend, r, alpha, bias):
    torch.manual_seed(0)
    peft_layer, ours = _peft_and_lorafast(48, 40, r, alpha, 0.0, bias)
    x = torch.randn(3, 17, 48)
    gy = torch.randn(3, 17, 40)
    got = _out_and_grads(ours, (ours.lora_A, ours.lora_B), x, gy)
    want = _out_and_grads(peft_layer, (peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight), x, gy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5 * max(1, w.abs().max().item()), rtol=1e-5)
    assert ours.scaling == peft_layer.scaling["default"]


def test_eval_mode_with_dropout_matches_peft(backend):
    torch.manual_seed(0)
    peft_layer, ours = _peft_and_lorafast(32, 24, 4, 8, 0.3)
    x = torch.randn(9, 32)
    torch.testing.assert_close(ours.eval()(x), peft_layer.eval()(x), atol=1e-5, rtol=1e-5)


def test_merged_weight_matches_peft_merge():
    torch.manual_seed(0)
    peft_layer, ours = _peft_and_lorafast(32, 24, 4, 8, 0.0)
    torch.testing.assert_close(ours.get_delta_weight(), peft_layer.get_delta_weight("default"))
