"""Several named adapters in one BART model: mixed batches, generate(), PEFT adapters by name."""

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import peft_saved_adapters

from conftest import summarization_batches, tiny_bart
from lorafast import (
    MultiLoRALinear,
    adapter_ids,
    add_adapter,
    apply_lora,
    list_adapters,
    load_adapter,
    multi_lora_layers,
    parameter_counts,
    remove_adapter,
    save_adapter,
    set_adapter,
)

NAMES = ("medical", "legal", "news")


@pytest.fixture
def batch(tokenizer):
    return summarization_batches(tokenizer, 1, batch_size=5, source_len=48, target_len=16)[0]


def _subset(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


def three_adapter_bart(ranks=(4, 8, 2), dropout=(0.0, 0.0, 0.0)):
    """tiny BART with adapters of different ranks on q,v, B randomised so each changes the output."""
    model = tiny_bart()
    g = torch.Generator().manual_seed(2)
    for name, r, p in zip(NAMES, ranks, dropout):
        add_adapter(model, name, r=r, alpha=2 * r + 1, dropout=p)
    with torch.no_grad():
        for _, layer in multi_lora_layers(model):
            for name in NAMES:
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.3)
    return model


def test_add_list_select_remove_adapters():
    model = three_adapter_bart()
    assert list_adapters(model) == list(NAMES)
    layers = dict(multi_lora_layers(model))
    assert len(layers) == 12  # q,v of encoder self-, decoder self- and cross-attention
    assert all(n.endswith(("q_proj", "v_proj")) for n in layers)
    assert all(layer.active_adapter == "medical" for layer in layers.values())  # the first, as in PEFT
    counts = parameter_counts(model)
    assert counts.trainable == sum(12 * (r * 64 + 64 * r) for r in (4, 8, 2))  # in = out = 64
    set_adapter(model, "legal")
    assert all(layer.active_adapter == "legal" for layer in layers.values())
    remove_adapter(model, "legal")
    assert list_adapters(model) == ["medical", "news"]
    assert all(layer.active_adapter is None for layer in layers.values())
    for name in ("medical", "news"):
        remove_adapter(model, name)
    assert list_adapters(model) == [] and not any(isinstance(m, MultiLoRALinear) for m in model.modules())
    assert isinstance(model.model.encoder.layers[0].self_attn.q_proj, torch.nn.Linear)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)], indirect=True)
def test_mixed_batch_equals_each_adapter_alone_logits_and_gradients(batch, backend):
    model = three_adapter_bart()
    ids = ["legal", None, "medical", "legal", "news"]
    with adapter_ids(model, ids):
        out = model(**batch)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
    loss.backward()
    mixed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for name in (*NAMES, None):
        rows = [i for i, a in enumerate(ids) if a == name]
        model.zero_grad()
        set_adapter(model, name)
        alone = model(**_subset(batch, rows))
        torch.testing.assert_close(out.logits[rows], alone.logits, atol=1e-5, rtol=1e-5)
        if name is None:
            continue
        loss = torch.nn.functional.cross_entropy(
            alone.logits.flatten(0, 1), batch["labels"][rows].flatten(), reduction="sum"
        )
        loss.backward()
        for pname, p in model.named_parameters():
            if f".{name}" in pname:
                torch.testing.assert_close(mixed_grads[pname], p.grad, atol=1e-5, rtol=1e-4)
    assert mixed_grads  # every adapter got gradients, news from one row, medical from one


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_mixed_ids_equals_per_adapter_generate(batch, num_beams):
    model = three_adapter_bart().eval()
    ids = torch.tensor([2, 0, -1, 0, 1])
    kwargs = dict(max_new_tokens=8, num_beams=num_beams, do_sample=False)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with adapter_ids(model, ids):
        mixed = model.generate(**inputs, **kwargs)
    assert all(layer.row_adapters is None for _, layer in multi_lora_layers(model))  # context left clean
    for k in (-1, 0, 1, 2):
        rows = (ids == k).nonzero().flatten()
        set_adapter(model, None if k < 0 else NAMES[k])
        alone = model.generate(**_subset(inputs, rows), **kwargs)
        width = alone.shape[1]
        torch.testing.assert_close(mixed[rows, :width], alone)
        assert (mixed[rows, width:] == model.config.pad_token_id).all()


def _peft_adapter_dirs(tmp_path):
    """Two adapters trained-looking (random B) and saved by PEFT itself, different ranks."""
    configs = {
        name: LoraConfig(r=r, lora_alpha=3 * r, target_modules=["q_proj", "v_proj"])
        for name, r in (("first", 4), ("second", 6))
    }
    return peft_saved_adapters(tmp_path, tiny_bart, configs, seed=10)


def test_peft_adapters_by_name_equal_peft(batch, tmp_path):
    dirs = _peft_adapter_dirs(tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_bart(), dirs["first"], adapter_name="first")
    peft_model.load_adapter(dirs["second"], adapter_name="second")
    peft_model.eval()
    model = tiny_bart().eval()
    for name, directory in dirs.items():
        load_adapter(model, directory, adapter_name=name)
    assert list_adapters(model) == ["first", "second"]
    with torch.no_grad():
        for name in dirs:
            peft_model.set_adapter(name)
            set_adapter(model, name)
            torch.testing.assert_close(model(**batch).logits, peft_model(**batch).logits, atol=1e-5, rtol=1e-5)
        # PEFT's own mixed-batch inference is the reference for a mixed batch
        names = ["second", "__base__", "first", "first", "second"]
        want = peft_model(**batch, adapter_names=names).logits
        with adapter_ids(model, [None if n == "__base__" else n for n in names]):
            got = model(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    save_adapter(model, tmp_path / "second_again", adapter_name="second")
    reloaded = PeftModel.from_pretrained(tiny_bart(), tmp_path / "second_again").eval()
    set_adapter(model, "second")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-5)


def test_errors(tmp_path):
    model = three_adapter_bart()
    with pytest.raises(ValueError, match="already has an adapter named 'legal'"):
        add_adapter(model, "legal")
    with pytest.raises(ValueError, match="targets different modules"):
        add_adapter(model, "other", target_modules=["q_proj", "k_proj"])
    with pytest.raises(ValueError, match="no adapter named 'missing'"):
        set_adapter(model, "missing")
    with pytest.raises(ValueError, match="no adapter named 'missing'"):
        with adapter_ids(model, ["medical", "missing"]):
            pass
    with pytest.raises(ValueError, match=r"in \[-1, 3\)"):
        with adapter_ids(model, torch.tensor([0, 3])):
            pass
    with pytest.raises(ValueError, match="do not fit an input"):
        with adapter_ids(model, ["medical", "legal"]), torch.no_grad():
            model(input_ids=torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="named adapters"):
        apply_lora(model)
    with pytest.raises(ValueError, match="single-adapter LoRA layers"):
        add_adapter(apply_lora(tiny_bart()), "a")
    with pytest.raises(ValueError, match="no named adapters"):
        set_adapter(tiny_bart(), "a")
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        save_adapter(model, tmp_path, adapter_name="nope")
    # an adapter of another target set, and of wrong shapes, is refused before the model changes
    other = get_peft_model(tiny_bart(), LoraConfig(r=4, target_modules=["k_proj"]))
    other.save_pretrained(tmp_path / "k")
    with pytest.raises(ValueError, match="targets different modules"):
        load_adapter(model, tmp_path / "k", adapter_name="k")
    assert list_adapters(model) == list(NAMES)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)], indirect=True)
def test_gradient_checkpointing_inside_the_block_gives_the_same_gradients(batch, backend):
    """Recomputation regenerates the same per-adapter dropout masks (checkpointing restores the RNG)."""
    ids = ["news", "legal", None, "medical", "legal"]
    grads = []
    for checkpointing in (False, True):
        model = three_adapter_bart(dropout=(0.1, 0.0, 0.2)).train()
        torch.manual_seed(0)
        if checkpointing:
            with warnings.catch_warnings():  # transformers 5 renames it activation_checkpointing_enable
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable()
        with adapter_ids(model, ids):
            model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


def test_merge_the_active_adapter_remove_all_and_state_dict(batch):
    from lorafast import lora_state_dict, merge_lora, remove_lora

    model = three_adapter_bart().eval()
    keys = lora_state_dict(model)
    assert len(keys) == 12 * 2 * 3 and all(k.rsplit(".", 1)[1] in NAMES for k in keys)
    set_adapter(model, None)
    with pytest.raises(ValueError, match="no single active one"):
        merge_lora(model)
    set_adapter(model, "legal")
    with torch.no_grad():
        want = model(**batch).logits
        merged = merge_lora(model)
        assert not any(isinstance(m, MultiLoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(**batch).logits, want, atol=1e-5, rtol=1e-5)
    model = three_adapter_bart().eval()
    with torch.no_grad():
        base = tiny_bart().eval()(**batch).logits
        torch.testing.assert_close(remove_lora(model)(**batch).logits, base)
    assert list_adapters(model) == []
