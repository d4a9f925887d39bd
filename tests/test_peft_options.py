"""PEFT's use_rslora, rank_pattern and alpha_pattern: in apply_lora/add_adapter with PEFT's meaning, and in PEFT
adapter files both ways (PEFT's saved adapter loads into lorafast, lorafast's saved adapter loads into PEFT)."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import MODELS, lm_batch

import lorafast
from conftest import assert_close_scaled
from lorafast import add_adapter, apply_lora, load_adapter, lora_layers, multi_lora_layers, save_adapter
from lorafast.adapter import CONFIG_NAME

TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]
# PEFT's key matching: a pattern is a regular expression matched at the end of the module name after a ".";
# "layers.1.self_attn.k_proj" names one module, "v_proj" every v_proj, "down_proj" every down_proj.
OPTIONS = [
    {"use_rslora": True},
    {"rank_pattern": {"layers.1.self_attn.k_proj": 2, "v_proj": 6}, "alpha_pattern": {"down_proj": 3.0}},
    {"use_rslora": True, "rank_pattern": {"q_proj": 12}, "alpha_pattern": {r"layers\.0\.self_attn\.v_proj": 5}},
]
IDS = ["rslora", "patterns", "rslora-patterns"]


def _close(actual, expected):
    assert_close_scaled(actual, expected, rel=1e-5)


def _assert_settings(got, want):
    assert got.keys() == want.keys()
    for name, (r, scaling) in want.items():
        assert got[name][0] == r and got[name][1] == pytest.approx(scaling, rel=1e-12), name


def _logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def _peft(options):
    torch.manual_seed(2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **options)
    return get_peft_model(MODELS["llama"](), config)


def _peft_settings(peft_model):
    """{module name: (r, scaling)} of PEFT's LoRA layers."""
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): (m.r["default"], m.scaling["default"])
        for name, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})
    }


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_apply_lora_and_add_adapter_give_peft_ranks_and_scalings(options):
    want = _peft_settings(_peft(options))
    single = apply_lora(MODELS["llama"](), TARGETS, r=4, alpha=8, **options)
    got = {name: (layer.r, layer.scaling) for name, layer in lora_layers(single)}
    _assert_settings(got, want)
    named = add_adapter(MODELS["llama"](), "one", TARGETS, r=4, alpha=8, **options)
    got = {name: (layer.ranks()["one"], layer.scaling("one")) for name, layer in multi_lora_layers(named)}
    _assert_settings(got, want)
    assert len({r for r, _ in want.values()}) > 1 or options.get("use_rslora")


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
@pytest.mark.parametrize("adapter_name", [None, "loaded"])
def test_peft_adapter_loads_into_lorafast_and_back(tmp_path, options, adapter_name):
    peft_model = _peft(options)
    peft_model.save_pretrained(tmp_path / "peft")
    batch = lm_batch("llama")
    batch.pop("labels")
    want = _logits(peft_model, batch)
    ours = load_adapter(MODELS["llama"](), tmp_path / "peft", adapter_name=adapter_name)
    _close(_logits(ours, batch), want)
    save_adapter(ours, tmp_path / "ours", task_type="CAUSAL_LM", adapter_name=adapter_name)
    config = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert config["use_rslora"] == options.get("use_rslora", False)
    assert bool(config["rank_pattern"]) == bool(options.get("rank_pattern"))
    back = PeftModel.from_pretrained(MODELS["llama"](), tmp_path / "ours")
    _assert_settings(_peft_settings(back), _peft_settings(peft_model))
    _close(_logits(back, batch), want)
    # the patched PEFT model (PEFT's own scaling) and lorafast's merged model agree too
    _close(_logits(lorafast.patch_peft(back), batch), want)
    if adapter_name is not None:
        lorafast.set_adapter(ours, adapter_name)
    assert_close_scaled(_logits(lorafast.merge_lora(ours), batch), want, rel=1e-4)


def test_loading_into_existing_layers_takes_the_adapters_alphas_and_scaling_rule(tmp_path):
    options = {"use_rslora": True, "alpha_pattern": {"down_proj": 3.0}}
    peft_model = _peft(options)
    peft_model.save_pretrained(tmp_path)
    model = apply_lora(MODELS["llama"](), TARGETS, r=4, alpha=1)
    load_adapter(model, tmp_path)
    got = {name: (layer.r, layer.scaling) for name, layer in lora_layers(model)}
    _assert_settings(got, _peft_settings(peft_model))


def test_bad_patterns_are_named(tmp_path):
    with pytest.raises(ValueError, match="rank r=0 must be at least 1"):
        apply_lora(MODELS["llama"](), TARGETS, rank_pattern={"q_proj": 0})
    with pytest.raises(ValueError, match="alpha_pattern key '\\(' is not a regular expression"):
        add_adapter(MODELS["llama"](), "a", TARGETS, alpha_pattern={"(": 2})
    _peft({}).save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "rank_pattern": {"q_proj": 8}}))
    with pytest.raises(ValueError, match=r"says r=8 for model\.layers\.0\.self_attn\.q_proj"):
        load_adapter(MODELS["llama"](), tmp_path)
