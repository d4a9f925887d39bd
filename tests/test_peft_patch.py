"""patch_peft: PEFT models run lorafast's fused LoRA on PEFT's own parameters, with PEFT's results."""

import copy
import importlib
import logging
import pickle
from functools import partial

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import MODELS, TASK_TYPES, lm_batch

import lorafast
from conftest import assert_close_scaled, relative_error
from lorafast import patch_peft, unpatch_peft
from lorafast.peft_patch import patched_layer_count

_close = partial(assert_close_scaled, rel=1e-5)


def _peft(kind, r=4, alpha=8, targets="all-linear", adapter="default", model=None, **options):
    """A PEFT model of ``kind`` with non-zero B (init_lora_weights=False), so the adapters matter."""
    torch.manual_seed(1)
    options.setdefault("fan_in_fan_out", kind == "gpt2")  # GPT-2's Conv1D weights are (in, out)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, task_type=TASK_TYPES[kind], **options
    )
    if model is not None:
        model.add_adapter(adapter, config)
        return model
    return get_peft_model(MODELS[kind](), config, adapter_name=adapter)


def _pair(kind, **options):
    """(unpatched PEFT model, patched deep copy of it)."""
    peft_model = _peft(kind, **options)
    return peft_model, patch_peft(copy.deepcopy(peft_model))


def _lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of lorafast's fused functions made by patched layers."""
    calls = {"lora_linear": 0, "multi_lora_linear": 0}
    owners = {"lora_linear": lorafast.base_linear, "multi_lora_linear": lorafast.peft_patch}  # where each is called
    for name, owner in owners.items():
        real = getattr(owner, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("kind", MODELS)
def test_patched_logits_and_lora_gradients_equal_peft(kind, fused_calls, caplog):
    peft_model = _peft(kind)
    layers = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
    with caplog.at_level(logging.INFO, logger="lorafast.peft_patch"):
        patched = patch_peft(copy.deepcopy(peft_model))
    assert patched_layer_count(patched) == layers > 0
    assert f"{layers} of {layers} PEFT LoRA layers" in caplog.text
    assert patched.state_dict().keys() == peft_model.state_dict().keys()
    batch = lm_batch(kind)
    losses = []
    for model in (peft_model, patched):
        out = model(**batch)
        out.loss.backward()
        losses.append(out)
    assert fused_calls["lora_linear"] == layers  # every LoRA layer ran fused, once
    _close(losses[1].logits, losses[0].logits)
    want, got = _lora_grads(peft_model), _lora_grads(patched)
    assert want.keys() == got.keys() and len(want) == 2 * layers
    for name in want:
        _close(got[name], want[name])


@pytest.mark.parametrize("kind", MODELS)
def test_adamw_loss_curve_and_saved_adapter_equal_peft(kind, tmp_path):
    peft_model, patched = _pair(kind)
    curves = []
    for model in (peft_model, patched):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        curve = []
        for step in range(10):
            loss = model(**lm_batch(kind, seed=step)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(loss.item())
        curves.append(torch.tensor(curve, dtype=torch.float64))
    _close(curves[1], curves[0])
    assert curves[0][-1] < curves[0][0]
    peft_model.save_pretrained(tmp_path / "peft")
    patched.save_pretrained(tmp_path / "patched")
    want = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    got = load_file(tmp_path / "patched" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        _close(got[key], want[key], rel=1e-4)  # same training: the same factors up to AdamW-amplified rounding
    # byte-identical tensors when the same weights are saved patched and unpatched
    unpatch_peft(copy.deepcopy(patched)).save_pretrained(tmp_path / "unpatched")
    again = load_file(tmp_path / "unpatched" / "adapter_model.safetensors")
    assert all(torch.equal(again[k], got[k]) for k in got)
    loaded = patch_peft(PeftModel.from_pretrained(MODELS[kind](), tmp_path / "patched"))
    batch = lm_batch(kind, seed=20)
    with torch.no_grad():
        _close(loaded.eval()(**batch).logits, patched.eval()(**batch).logits)


def test_set_adapter_disable_adapter_and_merge_follow_peft(fused_calls):
    peft_model = _peft("llama", adapter="one")
    _peft("llama", r=2, alpha=6, model=peft_model, adapter="two")
    patched = patch_peft(copy.deepcopy(peft_model)).eval()
    peft_model.eval()
    batch = lm_batch("llama")
    batch.pop("labels")

    def both():
        with torch.no_grad():
            return peft_model(**batch).logits, patched(**batch).logits

    for name in ("two", "one"):
        peft_model.set_adapter(name)
        patched.set_adapter(name)
        want, got = both()
        _close(got, want)
    with peft_model.disable_adapter(), patched.disable_adapter():
        want, got = both()
        _close(got, want)
        calls = fused_calls["lora_linear"]
    peft_model.merge_adapter()
    patched.merge_adapter()
    want, got = both()
    _close(got, want, rel=1e-4)  # merged weights: fp32 rounding of W + s·B·A
    assert fused_calls["lora_linear"] == calls  # merged and disabled layers ran the base layer only
    peft_model.unmerge_adapter()
    patched.unmerge_adapter()
    want, got = both()
    _close(got, want, rel=1e-4)
    assert fused_calls["lora_linear"] > calls


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mixed_batch_adapter_names_equals_peft(kind, fused_calls):
    peft_model = _peft(kind, adapter="one")
    _peft(kind, r=2, alpha=6, model=peft_model, adapter="two")
    patched = patch_peft(copy.deepcopy(peft_model))
    batch = lm_batch(kind, batch=4)
    names = ["two", "__base__", "one", "two"]
    with torch.no_grad():  # PEFT allows adapter_names in eval mode only
        outs = [model.eval()(**batch, adapter_names=names).logits for model in (peft_model, patched)]
    assert fused_calls["multi_lora_linear"] > 0 and fused_calls["lora_linear"] == 0
    _close(outs[1], outs[0])
    with torch.no_grad():
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            _close(outs[1][1], base(**batch).logits[1])  # "__base__": the base model


def test_generate_and_gradient_checkpointing_equal_peft():
    peft_model, patched = _pair("llama")
    batch = lm_batch("llama")
    labels = batch.pop("labels")
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = peft_model.eval().generate(**batch, **kwargs)
        got = patched.eval().generate(**batch, **kwargs)
    assert torch.equal(got, want) and got.shape[1] == batch["input_ids"].shape[1] + 5
    grads = []
    for model in (peft_model.train(), patched.train()):
        model.activation_checkpointing_enable({"use_reentrant": False})
        model(**batch, labels=labels).loss.backward()
        grads.append(_lora_grads(model))
    for name in grads[0]:
        _close(grads[1][name], grads[0][name])


def test_unsupported_layers_keep_peft_forward_and_are_counted(caplog, fused_calls):
    biased = _peft("llama", targets=["q_proj", "v_proj"], lora_bias=True, adapter="biased")
    with caplog.at_level(logging.INFO, logger="lorafast.peft_patch"):
        patch_peft(biased)
    assert patched_layer_count(biased) == 0
    assert "0 of 4 PEFT LoRA layers" in caplog.text and "4 (lora_bias)" in caplog.text
    embed = _peft("llama", targets=["q_proj", "embed_tokens"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lorafast.peft_patch"):
        patch_peft(embed)
    assert "2 of 3 PEFT LoRA layers" in caplog.text and "1 (lora.Embedding)" in caplog.text
    embed(**lm_batch("llama"))
    assert fused_calls["lora_linear"] == 2


def test_unpatch_restores_peft_and_errors():
    from peft.tuners.lora.layer import Linear

    peft_model = _peft("llama")
    patch_peft(peft_model)
    assert patched_layer_count(peft_model) == 14
    unpatch_peft(peft_model)
    assert patched_layer_count(peft_model) == 0
    assert type(peft_model.base_model.model.model.layers[0].self_attn.q_proj) is Linear
    with pytest.raises(ValueError, match="holds no PEFT LoRA layer"):
        patch_peft(MODELS["llama"]())
    with pytest.raises(TypeError, match=r"expects a peft\.PeftModel"):
        patch_peft("model")


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=False),  # LoRA on no linear layer
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),  # another tuner
    ],
    ids=["lora-embedding-only", "ia3"],
)
def test_a_model_peft_accepts_with_nothing_to_patch_warns_and_keeps_peft(config, caplog, fused_calls):
    peft_model = get_peft_model(MODELS["llama"](), config)
    batch = lm_batch("llama")
    with torch.no_grad():
        want = peft_model(**batch).logits
    with caplog.at_level(logging.INFO, logger="lorafast.peft_patch"):
        assert patch_peft(peft_model) is peft_model
    assert patched_layer_count(peft_model) == 0
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "PEFT's forward kept for" in record.message
    assert ("lora.Embedding" if isinstance(config, LoraConfig) else "4 (ia3.Linear)") in record.message
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, want, rtol=0, atol=0)
    assert fused_calls["lora_linear"] == 0


def test_patched_layers_look_like_peft_layers(tmp_path):
    from peft.tuners.lora.layer import Linear

    peft_model, patched = _pair("llama")
    peft_layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    layer = patched.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer) is not Linear and isinstance(layer, Linear)
    assert type(layer).__name__ == "Linear" and repr(layer).startswith("lora.Linear(")
    assert repr(patched) == repr(peft_model)
    assert patched.state_dict().keys() == peft_model.state_dict().keys()
    batch = lm_batch("llama")
    batch.pop("labels")
    # The project never unpickles from bytes (test_faults); what loading a whole saved model needs is checked
    # instead: torch.save and pickle serialise it, pickle finds the patched class by its module and qualified
    # name, and deepcopy rebuilds the model through the same reduce protocol.
    torch.save(patched, tmp_path / "model.pt")
    assert pickle.dumps(patched)
    cls = type(layer)
    assert getattr(importlib.import_module(cls.__module__), cls.__qualname__) is cls
    restored = copy.deepcopy(patched)
    assert patched_layer_count(restored) == 14
    with torch.no_grad():
        _close(restored.eval()(**batch).logits, patched.eval()(**batch).logits)
    assert repr(unpatch_peft(patched)) == repr(peft_model) and type(layer) is Linear
    assert type(peft_layer) is Linear


def test_bf16_base_with_fp32_adapters_trains_the_fp32_factors():
    peft_model = _peft("llama")
    peft_model.get_base_model().to(torch.bfloat16)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()  # PEFT's autocast_adapter_dtype: fp32 adapters on a bf16 base
    patched = patch_peft(copy.deepcopy(peft_model))
    batch = lm_batch("llama")
    outs = [model(**batch) for model in (peft_model, patched)]
    for out in outs:
        out.loss.backward()
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=5e-2, rtol=5e-2)
    for name, grad in _lora_grads(patched).items():
        assert grad.dtype == torch.float32
        want = _lora_grads(peft_model)[name]
        assert relative_error(grad, want) < 0.15  # bf16 base: up to 0.05 seen


def test_lora_dropout_p_and_train_mode_reach_the_fused_call():
    base = torch.nn.Linear(24, 16)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["0"], init_lora_weights=False)
    peft_layer = get_peft_model(torch.nn.Sequential(base), config).base_model.model[0]
    patched = patch_peft(copy.deepcopy(peft_layer))
    ours = lorafast.FusedLoRALinear.from_linear(copy.deepcopy(base), r=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
    x = torch.randn(5, 24)
    torch.manual_seed(7)
    got = patched.train()(x)
    torch.manual_seed(7)
    _close(got, ours.train()(x))  # the same seeded lorafast dropout as the lorafast layer with p=0.5
    assert not torch.allclose(got, patched.eval()(x))
    _close(patched.eval()(x), peft_layer.eval()(x))


def test_copy_round_trip_and_merge_and_unload():
    patched = _pair("llama")[1].eval()
    batch = lm_batch("llama")
    batch.pop("labels")
    restored = copy.deepcopy(patched)  # the pickling protocol (__reduce_ex__), without unpickling from bytes
    assert patched_layer_count(restored) == 14
    with torch.no_grad():
        want = patched(**batch).logits
        _close(restored(**batch).logits, want)
        merged = patched.merge_and_unload()
        assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear
        _close(merged(**batch).logits, want, rel=1e-4)


def test_a_biased_adapter_beside_a_plain_one_runs_peft_forward_when_active(fused_calls):
    peft_model = _peft("llama", targets=["q_proj", "v_proj"], adapter="plain")
    _peft("llama", targets=["q_proj", "v_proj"], lora_bias=True, model=peft_model, adapter="biased")
    patched = patch_peft(copy.deepcopy(peft_model))
    assert patched_layer_count(patched) == 4
    batch = lm_batch("llama")
    for name, fused in (("biased", 0), ("plain", 4)):
        peft_model.set_adapter(name)
        patched.set_adapter(name)
        with torch.no_grad():
            _close(patched.eval()(**batch).logits, peft_model.eval()(**batch).logits)
        assert fused_calls["lora_linear"] == fused


def test_torch_compile_of_a_patched_model_matches_eager():
    patched = _pair("llama")[1]
    batch = lm_batch("llama")
    eager = patched(**batch)
    eager.loss.backward()
    want = {n: g.clone() for n, g in _lora_grads(patched).items()}
    patched.zero_grad()
    compiled = torch.compile(patched, backend="aot_eager")(**batch)
    compiled.loss.backward()
    _close(compiled.logits, eager.logits)
    for name, grad in _lora_grads(patched).items():
        _close(grad, want[name])


def test_a_rank_above_the_kernels_range_keeps_peft_forward(caplog):
    config = LoraConfig(r=300, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
    peft_model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(10, 20)), config)
    x = torch.randn(3, 10)
    want = peft_model(x)
    with caplog.at_level(logging.INFO, logger="lorafast.peft_patch"):
        patch_peft(peft_model)
    assert patched_layer_count(peft_model) == 0 and "1 (rank above 256)" in caplog.text
    torch.testing.assert_close(peft_model(x), want, rtol=0, atol=0)


def test_a_tuner_layer_wrapping_a_patched_layer_may_add_to_its_output_in_place():
    from peft import AdaLoraConfig, LoHaConfig

    def mixed(patch):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 2))
        config = LoraConfig(target_modules=["0"], init_lora_weights=False)
        model = get_peft_model(net, config, adapter_name="plain", mixed=True)
        if patch:
            patch_peft(model)
        outer = AdaLoraConfig(target_modules=["0"], init_lora_weights=False, total_step=1)
        model.add_adapter("ada", outer)  # AdaLoRA wraps the LoRA layer and adds to its output in place
        model.add_adapter("hada", LoHaConfig(target_modules=["2"], init_weights=False))
        model.set_adapter(["plain", "ada", "hada"])
        return model

    x = torch.randn(4, 10)
    want = mixed(False)(x)
    model = mixed(True)
    assert patched_layer_count(model) == 1
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
