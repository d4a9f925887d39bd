"""Decoder LLMs (Llama-style with GQA, GPT-2) and BART with lorafast: PEFT's targets, results and files."""

import copy
import json
from functools import partial

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import MODELS, TASK_TYPES, lm_batch

import lorafast
from conftest import assert_close_scaled, relative_error


def _lora_module_names(model):
    return {name.removeprefix("base_model.model.").rpartition(".lora_A")[0] for name, _ in model.named_modules()
            if name.endswith(".lora_A")}  # fmt: skip


@pytest.mark.parametrize("kind", MODELS)
def test_all_linear_selects_what_peft_selects(kind):
    config = LoraConfig(r=4, target_modules="all-linear", fan_in_fan_out=kind == "gpt2")
    peft_model = get_peft_model(MODELS[kind](), config)
    ours = lorafast.apply_lora(MODELS[kind](), target_modules="all-linear", r=4)
    want = _lora_module_names(peft_model)
    assert {name for name, _ in lorafast.lora_layers(ours)} == want
    per_layer = {"llama": 7, "gpt2": 4, "bart": 8}[kind]  # BART: 6 a layer in the encoder, 10 in the decoder
    assert "lm_head" not in want and len(want) == 2 * per_layer + (2 * 8 if kind == "bart" else 0)
    trainable = peft_model.get_nb_trainable_parameters()[0]
    assert lorafast.parameter_counts(ours).trainable == trainable
    if kind != "gpt2":  # named adapters (MultiLoRALinear) take nn.Linear layers only
        named = lorafast.add_adapter(MODELS[kind](), "a", target_modules="ALL-LINEAR", r=4)
        assert {name for name, _ in lorafast.multi_lora_layers(named)} == want
        assert lorafast.parameter_counts(named).trainable == trainable


def test_all_linear_on_a_model_without_linear_layers_is_refused():
    with pytest.raises(ValueError, match="all-linear' found no linear layer"):
        lorafast.apply_lora(torch.nn.Sequential(torch.nn.Embedding(4, 4)), target_modules="all-linear")


def test_fp32_factors_on_a_bf16_model_get_fp32_gradients_and_small_updates():
    model = lorafast.apply_lora(MODELS["llama"]().to(torch.bfloat16), target_modules="all-linear", r=4)
    layers = dict(lorafast.lora_layers(model))
    assert all(m.lora_A.dtype == m.lora_B.dtype == torch.float32 and m.weight.dtype == torch.bfloat16
               for m in layers.values())  # fmt: skip
    with torch.no_grad():
        for m in layers.values():
            m.lora_B.normal_(std=0.1)
    batch = lm_batch("llama")
    out = model(**batch)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    reference = copy.deepcopy(model).float()  # the same factors, everything in fp32
    ref_out = reference(**batch)
    ref_out.loss.backward()
    torch.testing.assert_close(out.logits.float(), ref_out.logits, atol=5e-2, rtol=5e-2)
    for name, m in layers.items():
        ref = dict(reference.named_modules())[name]
        assert m.lora_A.grad.dtype == torch.float32
        for got, want in ((m.lora_A.grad, ref.lora_A.grad), (m.lora_B.grad, ref.lora_B.grad)):
            assert relative_error(got, want) < 0.15  # bf16 model vs fp32: up to 0.06 seen
    before = {n: m.lora_A.detach().clone() for n, m in layers.items()}
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5).step()
    # an update of ~1e-5 is lost in a bf16 factor (resolution ~4e-3 relative) but kept in fp32
    assert all(not torch.equal(m.lora_A, before[n]) for n, m in layers.items())


def test_adapter_dtype_chooses_the_factor_dtype_and_peft_loads_fp32_factors(tmp_path):
    half = lorafast.apply_lora(MODELS["llama"]().to(torch.bfloat16), r=4, adapter_dtype=torch.bfloat16)
    assert {m.lora_A.dtype for _, m in lorafast.lora_layers(half)} == {torch.bfloat16}
    ours = lorafast.apply_lora(MODELS["llama"]().to(torch.bfloat16), target_modules=("q_proj", "down_proj"), r=4)
    with torch.no_grad():
        for _, m in lorafast.lora_layers(ours):
            m.lora_B.normal_(std=0.1)
    lorafast.save_adapter(ours, tmp_path, task_type="CAUSAL_LM")
    peft_model = PeftModel.from_pretrained(MODELS["llama"]().to(torch.bfloat16), tmp_path)
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {torch.float32}
    batch = lm_batch("llama")
    with torch.no_grad():
        want = peft_model.eval()(**batch).logits
        got = ours.eval()(**batch).logits
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    with pytest.raises(ValueError, match="adapter_dtype must be a floating torch"):
        lorafast.apply_lora(MODELS["llama"](), adapter_dtype="bf16")


def _peft_model(kind, targets="all-linear", seed=1):
    """A PEFT model with non-zero B, so that its adapters change the outputs."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=12, target_modules=targets, init_lora_weights=False,
                        fan_in_fan_out=kind == "gpt2", task_type=TASK_TYPES[kind])  # fmt: skip
    return get_peft_model(MODELS[kind](), config)


def _out_and_lora_grads(model, batch):
    out = model(**batch)
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if "lora_" in name:  # PEFT: <module>.lora_A.default.weight, lorafast: <module>.lora_A
            module = name.removeprefix("base_model.model.").split(".lora_")[0]
            grads[module, "A" if ".lora_A" in name else "B"] = p.grad
    return out.logits, grads


_close = partial(assert_close_scaled, rel=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_decoder_equals_peft_with_adapters_loaded_both_ways(kind, tmp_path):
    peft_model = _peft_model(kind)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = lorafast.load_adapter(MODELS[kind](), tmp_path / "peft")
    if kind == "gpt2":
        assert all(layer.fan_in_fan_out for _, layer in lorafast.lora_layers(ours))
    batch = lm_batch(kind)
    want_logits, want_grads = _out_and_lora_grads(peft_model, batch)
    got_logits, got_grads = _out_and_lora_grads(ours, batch)
    _close(got_logits, want_logits)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == 2 * (14 if kind == "llama" else 8)
    for key in want_grads:
        _close(got_grads[key], want_grads[key])
    lorafast.save_adapter(ours, tmp_path / "ours", task_type=TASK_TYPES[kind])
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (kind == "gpt2")
    again = PeftModel.from_pretrained(MODELS[kind](), tmp_path / "ours")
    with torch.no_grad():
        _close(again.eval()(**batch).logits, ours.eval()(**batch).logits)


def test_gpt2_conv1d_merge_unmerge_and_merge_lora(tmp_path):
    model = lorafast.load_adapter(MODELS["gpt2"](), _saved(_peft_model("gpt2"), tmp_path))
    batch = lm_batch("gpt2")
    batch.pop("labels")
    layer = model.transformer.h[0].attn.c_attn
    assert layer.weight.shape == (32, 96) and layer.base_weight().shape == (96, 32)  # Conv1D's (in, out), no copy
    assert layer.base_weight().data_ptr() == layer.weight.data_ptr()
    weight = layer.weight.detach().clone()
    with torch.no_grad():
        want = model.eval()(**batch).logits
        layer.merge()
        torch.testing.assert_close(model(**batch).logits, want, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer.weight, weight, atol=1e-6, rtol=0)
        merged = lorafast.merge_lora(model)
        conv1d = type(MODELS["gpt2"]().transformer.h[0].attn.c_attn)
        assert type(merged.transformer.h[0].attn.c_attn) is conv1d and next(lorafast.lora_layers(merged), None) is None
        torch.testing.assert_close(merged(**batch).logits, want, atol=1e-5, rtol=1e-5)
    restored = lorafast.remove_lora(lorafast.load_adapter(MODELS["gpt2"](), tmp_path))
    assert type(restored.transformer.h[1].mlp.c_fc) is conv1d
    for key, value in MODELS["gpt2"]().state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def _saved(peft_model, directory):
    peft_model.save_pretrained(directory)
    return directory


def test_llama_generate_gradient_checkpointing_and_bf16_autocast(tmp_path):
    model = lorafast.load_adapter(MODELS["llama"](), _saved(_peft_model("llama"), tmp_path))
    batch = lm_batch("llama")
    labels = batch.pop("labels")
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        got = model.eval().generate(**batch, **kwargs)
        want = lorafast.merge_lora(copy.deepcopy(model)).generate(**batch, **kwargs)
    assert torch.equal(got, want) and got.shape[1] == batch["input_ids"].shape[1] + 5
    model.train()
    _, want_grads = _out_and_lora_grads(model, {**batch, "labels": labels})
    model.zero_grad()
    model.activation_checkpointing_enable({"use_reentrant": False})
    _, got_grads = _out_and_lora_grads(model, {**batch, "labels": labels})
    for key in want_grads:
        _close(got_grads[key], want_grads[key])
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, labels=labels)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    grads = [p.grad for _, layer in lorafast.lora_layers(model) for p in (layer.lora_A, layer.lora_B)]
    assert len(grads) == 28 and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
