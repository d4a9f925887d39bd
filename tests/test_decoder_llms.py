"""Decoder LLMs (Llama-style with GQA, GPT-2) and BART with lorafast: PEFT's targets, results and files."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import MODELS

import lorafast


def _lora_module_names(model):
    return {name.removeprefix("base_model.model.").rpartition(".lora_A")[0] for name, _ in model.named_modules()
            if name.endswith(".lora_A")}  # fmt: skip


@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_all_linear_selects_what_peft_selects(kind):
    peft_model = get_peft_model(MODELS[kind](), LoraConfig(r=4, target_modules="all-linear"))
    ours = lorafast.apply_lora(MODELS[kind](), target_modules="all-linear", r=4)
    named = lorafast.add_adapter(MODELS[kind](), "a", target_modules="ALL-LINEAR", r=4)
    want = _lora_module_names(peft_model)
    assert {name for name, _ in lorafast.lora_layers(ours)} == want
    assert {name for name, _ in lorafast.multi_lora_layers(named)} == want
    assert "lm_head" not in want and len(want) == (
        2 * 7 if kind == "llama" else 2 * 6 + 2 * 10
    )  # per layer: 7; BART 6 and 10
    trainable = peft_model.get_nb_trainable_parameters()[0]
    assert lorafast.parameter_counts(ours).trainable == lorafast.parameter_counts(named).trainable == trainable


def test_all_linear_on_a_model_without_linear_layers_is_refused():
    with pytest.raises(ValueError, match="all-linear' found no linear layer"):
        lorafast.apply_lora(torch.nn.Sequential(torch.nn.Embedding(4, 4)), target_modules="all-linear")
