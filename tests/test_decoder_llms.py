"""Decoder LLMs (Llama-style with GQA, GPT-2) and BART with lorafast: PEFT's targets, results and files."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import MODELS, lm_batch

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
            assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99
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
