"""apply_lora / remove_lora / merge_lora on transformers models (small BART, random weights)."""

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration

import lorafast
from conftest import summarization_batches, tiny_bart
from lorafast import FusedLoRALinear, apply_lora, lora_layers, merge_lora, parameter_counts, remove_lora


def _with_trained_adapters(model, seed=1):
    """Give every B non-zero values, as after training, so the adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
    return model


@pytest.fixture
def batch(tokenizer):
    return summarization_batches(tokenizer, 1)[0]


def test_apply_lora_targets_query_and_value_by_default():
    model = tiny_bart()
    weights = {n: m.weight for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    assert apply_lora(model) is model
    layers = dict(lora_layers(model))
    assert set(layers) == set(weights) and len(layers) == 2 * (2 + 2 + 2)  # enc self, dec self, dec cross
    for name, layer in layers.items():
        assert layer.weight is weights[name]  # shared, not copied
        assert (layer.r, layer.alpha, layer.dropout) == (8, 16, 0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{f}" for n in layers for f in "AB"}


def test_targets_by_suffix_and_by_regex():
    model = apply_lora(tiny_bart(), target_modules=["fc1", "k_proj"], r=2)
    names = {n for n, _ in lora_layers(model)}
    assert names and all(n.endswith(("fc1", "k_proj")) for n in names)
    model = apply_lora(tiny_bart(), target_modules=r"model\.encoder\..*\.(q_proj|out_proj)", r=2)
    names = {n for n, _ in lora_layers(model)}
    assert names == {f"model.encoder.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "out_proj")}


def test_bart_base_shapes_parameter_counts():
    """The paper's storage claim: BART-base shapes, r=8 on q and v."""
    config = BartConfig(
        vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
        decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
    )  # fmt: skip
    with torch.device("meta"):
        model = BartForConditionalGeneration(config)
    total_before = parameter_counts(model).total
    counts = parameter_counts(apply_lora(model, r=8))
    assert counts.trainable == 442_368
    assert counts.total == total_before + 442_368
    assert 139.4e6 < total_before < 140.4e6  # "about 139.9M" (tied embeddings counted once)
    assert str(counts).startswith("trainable params: 442,368 || all params: ")


def test_remove_lora_restores_the_original_model(batch):
    model = tiny_bart()
    reference = copy.deepcopy(model).eval()
    _with_trained_adapters(apply_lora(model)).eval()
    next(iter(lora_layers(model)))[1].merge()  # a merged layer is unmerged on the way out
    remove_lora(model)
    assert next(lora_layers(model), None) is None
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj")))
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)
    assert model.state_dict().keys() == reference.state_dict().keys()


def test_merge_then_save_pretrained_loads_in_plain_transformers(batch, tmp_path):
    model = _with_trained_adapters(apply_lora(tiny_bart())).eval()
    with torch.no_grad():
        expected = model(**batch).logits
    merged = merge_lora(model)
    assert next(lora_layers(merged), None) is None
    merged.save_pretrained(tmp_path)
    plain = BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, FusedLoRALinear) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        # and the adapters did change the model: the base alone differs
        assert not torch.allclose(tiny_bart()(**batch).logits, expected, atol=1e-3)


def test_generate_equals_the_merged_model(batch):
    model = _with_trained_adapters(apply_lora(tiny_bart())).eval()
    merged = merge_lora(copy.deepcopy(model))
    kwargs = {"max_new_tokens": 8, "num_beams": 2, "do_sample": False}
    out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    want = merged.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    assert torch.equal(out, want)


def test_gradient_checkpointing_gives_the_same_gradients(batch):
    """Recomputation must regenerate the same LoRA dropout masks (checkpointing restores the RNG)."""
    model = apply_lora(tiny_bart(), dropout=0.3)
    _with_trained_adapters(model).train()
    checkpointed = copy.deepcopy(model)
    with warnings.catch_warnings():  # transformers 5 renames it activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        checkpointed.gradient_checkpointing_enable()
    grads, calls = [], []
    for m in (model, checkpointed):
        layer = next(lora_layers(m))[1]
        count = []
        handle = layer.register_forward_hook(lambda *_, count=count: count.append(1))
        torch.manual_seed(7)
        m(**batch).loss.backward()
        handle.remove()
        calls.append(len(count))
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert calls == [1, 2]  # the checkpointed model really recomputed the layer in backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_autocast_bf16_training_step(batch):
    model = apply_lora(tiny_bart()).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    for _, layer in lora_layers(model):
        assert layer.lora_B.grad is not None and layer.lora_B.grad.dtype == torch.float32


def test_lora_state_dict_holds_only_the_factors():
    model = apply_lora(tiny_bart(), r=4)
    state = lorafast.lora_state_dict(model)
    assert len(state) == 2 * 12
    assert all(k.endswith((".lora_A", ".lora_B")) for k in state)
    assert state["model.encoder.layers.0.self_attn.q_proj.lora_A"].shape == (4, 64)


def test_apply_errors():
    model = tiny_bart()
    with pytest.raises(ValueError, match=r"target_modules \['qproj'\] match no module.*'q_proj'"):
        apply_lora(model, target_modules=["q_proj", "qproj"])
    with pytest.raises(
        ValueError, match=r"'model\.encoder\.layers\.0\.self_attn' is a BartAttention, not an nn\.Linear"
    ):
        apply_lora(model, target_modules=["self_attn"])
    with pytest.raises(ValueError, match="must be a regular expression or non-empty names"):
        apply_lora(model, target_modules=[])
    assert next(lora_layers(model), None) is None  # nothing was changed by the failed calls
    assert all(p.requires_grad for p in model.parameters())
    apply_lora(model)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model)
    with pytest.raises(ValueError, match="rank r=0 must be at least 1"):
        apply_lora(tiny_bart(), r=0)
