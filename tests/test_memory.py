"""Activation memory kept for backward: x once, plus x·Aᵀ (n×r), with or without dropout."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lorafast import FusedLoRALinear
from lorafast.profiling import saved_activation_bytes

N, D_IN, D_OUT, R = 96, 80, 64, 8


def _saved(module, x):
    return saved_activation_bytes(lambda: module(x), exclude=list(module.parameters()))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_saved_bytes_within_budget(backend, dropout):
    x = torch.randn(4, N // 4, D_IN, requires_grad=True)
    base = nn.Linear(D_IN, D_OUT)
    frozen_bytes = _saved(base.requires_grad_(False), x)
    layer = FusedLoRALinear.from_linear(base, r=R, dropout=dropout).train()
    budget = frozen_bytes + x.numel() * x.element_size() + N * R * x.element_size()
    assert _saved(layer, x) <= budget


def test_peft_with_dropout_keeps_more_than_the_budget():
    """The measurement discriminates: PEFT keeps a dropped copy of x (and its mask)."""
    x = torch.randn(N, D_IN, requires_grad=True)
    config = LoraConfig(r=R, lora_alpha=16, lora_dropout=0.1, target_modules=["0"])
    peft_layer = get_peft_model(nn.Sequential(nn.Linear(D_IN, D_OUT)), config).base_model.model[0].train()
    assert _saved(peft_layer, x) >= 2 * x.numel() * x.element_size()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_layers_sharing_an_input_keep_it_once(backend, dropout):
    """q and v projections of one attention block read the same x: it is stored once."""
    x = torch.randn(N, D_IN, requires_grad=True)
    q = FusedLoRALinear(D_IN, D_OUT, r=R, dropout=dropout).train()
    v = FusedLoRALinear(D_IN, D_OUT, r=R, dropout=dropout).train()
    params = [*q.parameters(), *v.parameters()]
    saved = saved_activation_bytes(lambda: (q(x), v(x)), exclude=params)
    assert saved <= x.numel() * x.element_size() + 2 * N * R * x.element_size()


def test_saved_x_is_the_callers_tensor(backend):
    x = torch.randn(N, D_IN, requires_grad=True)
    layer = FusedLoRALinear(D_IN, D_OUT, r=R, dropout=0.1).train()
    storages = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: storages.append(t.untyped_storage().data_ptr()) or t, lambda t: t
    ):
        layer(x)
    assert x.untyped_storage().data_ptr() in storages
