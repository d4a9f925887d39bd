"""Adapters in PEFT's format, round trips with the real PEFT library both ways."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from conftest import summarization_batches, tiny_bart
from lorafast import apply_lora, load_adapter, lora_layers, read_adapter, save_adapter
from lorafast.adapter import CONFIG_NAME, WEIGHTS_NAME


@pytest.fixture
def batch(tokenizer):
    return summarization_batches(tokenizer, 1)[0]


def _logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def _trained_lorafast(target_modules=("q_proj", "v_proj"), r=8, alpha=16):
    model = apply_lora(tiny_bart(), target_modules=target_modules, r=r, alpha=alpha)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
    return model


def _trained_peft(config):
    model = get_peft_model(tiny_bart(), config)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize(
    "targets,expected_config",
    [
        (("q_proj", "v_proj"), ["q_proj", "v_proj"]),
        (r"model\.decoder\..*\.(fc1|k_proj)", None),  # a subset: saved as an exact-name pattern
    ],
)
def test_lorafast_adapter_loads_in_peft(batch, tmp_path, targets, expected_config):
    model = _trained_lorafast(targets, r=4, alpha=12)
    save_adapter(model, tmp_path, task_type="SEQ_2_SEQ_LM")
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 12)
    if expected_config is not None:
        assert config["target_modules"] == expected_config

    peft_model = PeftModel.from_pretrained(tiny_bart(), tmp_path)
    peft_layers = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert {n.removeprefix("base_model.model.") for n in peft_layers} == {n for n, _ in lora_layers(model)}
    torch.testing.assert_close(_logits(peft_model, batch), _logits(model, batch), atol=1e-5, rtol=1e-5)


def test_peft_adapter_loads_in_lorafast(batch, tmp_path):
    peft_model = _trained_peft(LoraConfig(r=6, lora_alpha=24, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path)
    # into a model without LoRA: the layers are created from the adapter
    fresh = load_adapter(tiny_bart(), tmp_path)
    layers = dict(lora_layers(fresh))
    assert len(layers) == 12 and all((x.r, x.alpha, x.dropout) == (6, 24, 0.1) for x in layers.values())
    torch.testing.assert_close(_logits(fresh, batch), _logits(peft_model, batch), atol=1e-5, rtol=1e-5)
    # into a model that already has LoRA on the same modules (its alpha is replaced)
    prepared = apply_lora(tiny_bart(), r=6, alpha=1)
    load_adapter(prepared, tmp_path)
    torch.testing.assert_close(_logits(prepared, batch), _logits(peft_model, batch), atol=1e-5, rtol=1e-5)


def test_round_trip_through_both_libraries(batch, tmp_path):
    model = _trained_lorafast()
    save_adapter(model, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(tiny_bart(), tmp_path / "a")
    peft_model.save_pretrained(tmp_path / "b")
    back = load_adapter(tiny_bart(), tmp_path / "b")
    torch.testing.assert_close(_logits(back, batch), _logits(model, batch), atol=1e-5, rtol=1e-5)


def test_saved_adapter_is_small(tmp_path):
    model = _trained_lorafast()
    save_adapter(model, tmp_path)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    size = (tmp_path / WEIGHTS_NAME).stat().st_size
    assert trainable * 4 <= size < trainable * 4 + 10_000  # the factors in fp32 plus a small header


@pytest.mark.parametrize(
    "option,value",
    [("lora_bias", True)],
)
def test_unsupported_peft_options_are_named(tmp_path, option, value):
    peft_model = _trained_peft(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **{option: value}))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"PEFT option {option}="):
        load_adapter(tiny_bart(), tmp_path)


def test_adapter_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no adapter_config\.json"):
        load_adapter(tiny_bart(), tmp_path)
    save_adapter(_trained_lorafast(), tmp_path / "ok")
    # targets that do not fit the model
    with pytest.raises(ValueError, match="cover different modules"):
        load_adapter(apply_lora(tiny_bart(), target_modules=["k_proj"]), tmp_path / "ok")
    with pytest.raises(ValueError, match=r"lora_A of .* has shape \(8, 64\) in the adapter but \(4, 64\)"):
        load_adapter(apply_lora(tiny_bart(), r=4), tmp_path / "ok")
    from transformers import BartConfig, BartForConditionalGeneration

    wider = BartForConditionalGeneration(BartConfig(vocab_size=1000, d_model=96, encoder_layers=2, decoder_layers=2))
    with pytest.raises(ValueError, match="shape"):
        load_adapter(wider, tmp_path / "ok")
    # corrupt files
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_adapter(bad)
    (bad / CONFIG_NAME).write_text((tmp_path / "ok" / CONFIG_NAME).read_text())
    with pytest.raises(FileNotFoundError, match=r"no adapter_model\.safetensors"):
        read_adapter(bad)
    (bad / WEIGHTS_NAME).write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="could not be read as safetensors"):
        read_adapter(bad)
    state = load_file(tmp_path / "ok" / WEIGHTS_NAME)
    save_file({k: v for k, v in state.items() if "lora_B" not in k or "layers.0" not in k}, bad / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="lacks lora_A or lora_B"):
        read_adapter(bad)
    config = json.loads((tmp_path / "ok" / CONFIG_NAME).read_text())
    (bad / CONFIG_NAME).write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="'IA3' adapter; lorafast loads LoRA adapters only"):
        read_adapter(bad)


def test_save_needs_lora_layers(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(tiny_bart(), tmp_path)
    model = _trained_lorafast()
    next(lora_layers(model))[1].dropout = 0.1
    with pytest.raises(ValueError, match=r"differ in \(dropout, use_rslora\)"):
        save_adapter(model, tmp_path)
    next(lora_layers(model))[1].dropout, next(lora_layers(model))[1].use_rslora = 0.0, True
    with pytest.raises(ValueError, match=r"differ in \(dropout, use_rslora\)"):
        save_adapter(model, tmp_path)


def test_loading_into_merged_layers_is_refused(tmp_path):
    model = _trained_lorafast()
    save_adapter(model, tmp_path)
    next(lora_layers(model))[1].merge()
    with pytest.raises(ValueError, match="are merged; unmerge"):
        load_adapter(copy.deepcopy(model), tmp_path)
