"""QLoRA: lorafast over bitsandbytes 4-bit (NF4/FP4) and 8-bit bases, against PEFT's QLoRA and float64 references.

Models are tiny Llamas saved here and loaded through transformers' ``BitsAndBytesConfig`` on the CPU. They run in
train mode: in eval mode without grad, bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs (covered apart).
"""

import copy
import importlib.util
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import lorafast
from conftest import relative_error
from lorafast.profiling import saved_activation_bytes

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install lorafast[qlora])")

if HAS_BNB:
    import bitsandbytes as bnb
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from tiny_models import VOCAB, lm_batch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from conftest import assert_close_scaled, keep_mask
    from lorafast import FusedLoRALinear, MultiLoRALinear
    from lorafast.base_linear import base_lora_linear
    from lorafast.bases import dequantize_weight
    from lorafast.peft_patch import patched_layer_count

N, D_IN, D_OUT, R = 24, 128, 64, 4
QUANT = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def _quantized_linear(kind, double_quant=True, compute_dtype=torch.float32, bias=True, seed=0):
    """A bitsandbytes layer (kind ``nf4``/``fp4``/``int8``) quantized from a seeded dense linear, and that linear."""
    torch.manual_seed(seed)
    dense = nn.Linear(D_IN, D_OUT, bias=bias)
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(D_IN, D_OUT, bias=bias, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            D_IN, D_OUT, bias=bias, compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=kind
        )
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu").train(), dense


def _reference(base, x, lora_A, lora_B, scaling, keep, p):
    """float64 LoRA on bitsandbytes layer ``base``'s dequantized W0 under the 0/1 mask ``keep`` ``(n, in)``:
    ``(y, (x, A, B))``, leaves for the gradients."""
    w = dequantize_weight(base, torch.float64)
    leaves = x64, a64, b64 = [t.detach().double().requires_grad_() for t in (x, lora_A, lora_B)]
    y = x64 @ w.T + base.bias.double() + scaling * ((x64 * keep.double() / (1 - p)) @ a64.T) @ b64.T
    return y, leaves


def _check_against_reference(y, inputs, reference):
    """y and its gradients w.r.t. ``inputs`` against the float64 ``(y, leaves)`` of :func:`_reference`."""
    want, leaves = reference
    grad_y = torch.randn_like(y)
    assert_close_scaled(y, want.detach())
    got, expected = torch.autograd.grad(y, inputs, grad_y), torch.autograd.grad(want, leaves, grad_y.double())
    for g, e in zip(got, expected, strict=True):
        assert_close_scaled(g, e)


def _quant_snapshot(layer):
    """Every tensor of the quantized weight and its state, copied."""
    return {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}


# --- one layer -------------------------------------------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize("kind,double_quant", [*QUANT, ("int8", False)])
def test_dequantized_weight_is_what_bitsandbytes_multiplies_by(kind, double_quant):
    layer, dense = _quantized_linear(kind, double_quant)
    x = torch.randn(N, D_IN)
    weight = dequantize_weight(layer, torch.float32)
    assert weight.shape == (D_OUT, D_IN) and weight.dtype == torch.float32
    torch.testing.assert_close(x @ weight.T + layer.bias, layer(x), rtol=1e-6, atol=1e-6)
    # A quantization of the dense weight (NF4/FP4 are coarse; int8 is not), not a copy of it.
    error = (weight - dense.weight).abs().max().item()
    assert 0 < error < (0.2 if kind != "int8" else 5e-3) * dense.weight.abs().max().item()


@needs_bnb
@pytest.mark.parametrize("kind,double_quant", [*QUANT, ("int8", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_matches_float64_reference(backend, kind, double_quant, dtype):
    layer, _ = _quantized_linear(kind, double_quant, compute_dtype=dtype)
    lora = lorafast.apply_lora(nn.Sequential(layer), target_modules=["0"], r=R, alpha=8)[0]
    assert isinstance(lora, FusedLoRALinear) and lora.lora_A.dtype == torch.float32
    nn.init.normal_(lora.lora_B, std=0.1)
    x = torch.randn(2, N // 2, D_IN, dtype=dtype, requires_grad=True)
    y = lora(x)
    assert y.dtype == dtype
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    w = dequantize_weight(layer, torch.float64)
    ref = [t.detach().double().requires_grad_() for t in (x, lora.lora_A, lora.lora_B)]
    x64, a64, b64 = ref
    y64 = x64 @ w.T + layer.bias.double() + 2.0 * (x64 @ a64.T) @ b64.T
    y64.backward(grad_y.double())
    assert_close_scaled(y, y64, dtype)
    for got, want in zip((x.grad, lora.lora_A.grad, lora.lora_B.grad), (x64.grad, a64.grad, b64.grad)):
        assert_close_scaled(got, want, dtype)
    assert lora.lora_A.grad.dtype == torch.float32


@needs_bnb
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dropout_uses_the_seeded_mask(backend, kind):
    """y, dX, dA, dB under dropout against float64 math on the dequantized W0 and the forward's mask: backward
    regenerates that mask from the seed (none is saved)."""
    layer, _ = _quantized_linear(kind)
    lora = FusedLoRALinear.from_linear(layer, r=R, alpha=8, dropout=0.25).train()
    nn.init.normal_(lora.lora_B, std=0.1)
    x = torch.randn(N, D_IN, requires_grad=True)
    torch.manual_seed(7)
    y = lora(x)
    torch.manual_seed(7)
    seed = lorafast.dropout.dropout_seed()  # what the forward drew
    keep = keep_mask(backend, seed, (N, D_IN), 0.25)
    assert 0 < keep.sum() < keep.numel()
    reference = _reference(layer, x, lora.lora_A, lora.lora_B, 2.0, keep, 0.25)
    _check_against_reference(y, (x, lora.lora_A, lora.lora_B), reference)


@needs_bnb
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_saved_bytes_are_x_and_xa_only(backend, kind, dropout):
    """Nothing dense of W0 is kept for backward: |x| + n·r elements (PEFT QLoRA keeps more, printed for the note)."""
    layer, _ = _quantized_linear(kind)
    lora = FusedLoRALinear.from_linear(layer, r=R, dropout=dropout).train()
    x = torch.randn(N, D_IN, requires_grad=True)
    saved = saved_activation_bytes(lambda: lora(x), exclude=list(lora.parameters()))
    assert saved <= (x.numel() + N * R) * x.element_size()
    dense_w = D_IN * D_OUT * 4
    assert saved < dense_w  # would not hold if a dequantized W0 (fp32) were saved

    peft_layer = _quantized_linear(kind)[0]
    config = LoraConfig(r=R, lora_alpha=16, lora_dropout=dropout, target_modules=["0"])
    peft_model = get_peft_model(nn.Sequential(peft_layer), config).train()
    peft_saved = saved_activation_bytes(lambda: peft_model(x), exclude=list(peft_model.parameters()))
    print(f"\nsaved for backward ({kind}, dropout {dropout}): lorafast {saved} B, PEFT QLoRA {peft_saved} B")


@needs_bnb
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_training_never_modifies_the_quantized_weight(kind):
    layer, _ = _quantized_linear(kind)
    before = _quant_snapshot(layer)
    lora = FusedLoRALinear.from_linear(layer, r=R, dropout=0.1).train()
    opt = torch.optim.AdamW(lora.parameters(), lr=1e-2)
    for _ in range(3):
        lora(torch.randn(N, D_IN)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    after = _quant_snapshot(layer)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


@needs_bnb
def test_state_dict_keeps_the_quantized_linears_keys():
    layer, _ = _quantized_linear("nf4")
    keys = set(layer.state_dict())
    lora = FusedLoRALinear.from_linear(layer, r=R)
    nn.init.normal_(lora.lora_B)
    state = lora.state_dict()
    assert set(state) == keys | {"lora_A", "lora_B"}
    # Loading routes the quantized keys to the bitsandbytes layer, which takes what it takes of its own
    # state_dict (its quant_state keys are for transformers' loader); the factors load.
    fresh = FusedLoRALinear.from_linear(_quantized_linear("nf4", seed=1)[0], r=R)
    plain = _quantized_linear("nf4", seed=1)[0].load_state_dict(layer.state_dict(), strict=False)
    loaded = fresh.load_state_dict(state, strict=False)
    assert loaded.missing_keys == plain.missing_keys == []
    assert loaded.unexpected_keys == plain.unexpected_keys
    assert torch.equal(fresh.lora_B, lora.lora_B) and torch.equal(fresh.weight, layer.weight)


@needs_bnb
def test_autocast_computes_in_the_autocast_dtype():
    layer, _ = _quantized_linear("nf4")
    lora = FusedLoRALinear.from_linear(layer, r=R)
    nn.init.normal_(lora.lora_B, std=0.1)
    x = torch.randn(N, D_IN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and lora.lora_A.grad.dtype == torch.float32
    assert_close_scaled(y, lora(x).detach(), torch.bfloat16)


@needs_bnb
def test_cpu_repacked_weight_still_dequantizes():
    """bitsandbytes' CPU inference may repack a 4-bit weight in place; lorafast reads both layouts."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    layer, _ = _quantized_linear("nf4")
    want = dequantize_weight(layer, torch.float32)
    state = layer.weight.quant_state
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data, state)
    assert layer.weight.quant_state.packing_format_for_cpu
    got = dequantize_weight(layer, torch.float32)
    assert layer.weight.quant_state.packing_format_for_cpu  # read, not converted back
    torch.testing.assert_close(got, want, rtol=8e-3, atol=0)  # the repacked block scales are bf16
    x = torch.randn(N, D_IN)
    if bnb.functional.has_avx512bf16():  # bitsandbytes' own kernel for that layout runs here
        with torch.no_grad():
            torch.testing.assert_close(x @ got.T + layer.bias, layer.eval()(x), rtol=2e-2, atol=2e-2)


@needs_bnb
def test_bad_bases_fail_clearly():
    with pytest.raises(ValueError, match="Linear4bit"):  # a module of no base kind
        base_lora_linear(
            torch.randn(2, D_IN), nn.Conv1d(D_IN, D_OUT, 1), torch.zeros(R, D_IN), torch.zeros(D_OUT, R), 1.0
        )
    with pytest.raises(ValueError, match="Linear4bit"):
        FusedLoRALinear.from_linear(nn.Conv1d(D_IN, D_OUT, 1), r=R)
    unquantized = bnb.nn.Linear4bit(D_IN, D_OUT)  # never moved to a device: no quant_state
    with pytest.raises(ValueError, match="not quantized"):
        FusedLoRALinear.from_linear(unquantized, r=R)(torch.randn(2, D_IN))
    layer, _ = _quantized_linear("nf4")
    with pytest.raises(ValueError, match="rank"):
        FusedLoRALinear.from_linear(layer, r=0)  # any r >= 1 is a rank, as in PEFT


@needs_bnb
@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_patch_peft_plain_lora_linear_over_a_quantized_base(kind, dropout, monkeypatch):
    """Outside a transformers model PEFT wraps a bitsandbytes layer in its plain ``lora.Linear``: patched too."""
    config = LoraConfig(r=R, lora_alpha=8, lora_dropout=dropout, target_modules=["0"], init_lora_weights=False)
    torch.manual_seed(3)
    ref = get_peft_model(nn.Sequential(_quantized_linear(kind)[0]), config).train()
    torch.manual_seed(3)
    ours = get_peft_model(nn.Sequential(_quantized_linear(kind)[0]), config).train()
    assert type(ours.base_model.model[0]).__name__ == "Linear"
    lorafast.patch_peft(ours)
    assert patched_layer_count(ours) == 1
    x = torch.randn(N, D_IN, requires_grad=True)
    if dropout:  # PEFT draws its own mask: lorafast against float64 math on lorafast's mask, forward and backward
        monkeypatch.setenv("LORAFAST_BACKEND", "torch")
        layer = ours.base_model.model[0]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.manual_seed(4)
        y = ours(x)
        torch.manual_seed(4)
        keep = keep_mask("torch", lorafast.dropout.draw_seed(), (N, D_IN), dropout)
        _check_against_reference(y, (x, a, b), _reference(layer.base_layer, x, a, b, 2.0, keep, dropout))
        return
    want, got = ref(x), ours(x)
    assert _rel(got, want) < 1e-5
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x, *[p for p in ref.parameters() if p.requires_grad]], grad)
    got_grads = torch.autograd.grad(got, [x, *[p for p in ours.parameters() if p.requires_grad]], grad)
    for g, w in zip(got_grads, want_grads):
        assert _rel(g, w) < 1e-5


@needs_bnb
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_named_adapters_single_and_mixed_match_float64(backend, kind):
    layer, _ = _quantized_linear(kind)
    model = nn.Sequential(layer)
    lorafast.add_adapter(model, "a", target_modules=["0"], r=R, alpha=8)
    lorafast.add_adapter(model, "b", target_modules=["0"], r=2, alpha=4)
    lora = model[0]
    assert isinstance(lora, MultiLoRALinear) and lora.lora_A["b"].dtype == torch.float32
    for name in "ab":
        nn.init.normal_(lora.lora_B[name], std=0.1)
    w, b = dequantize_weight(layer, torch.float64), layer.bias.double()
    x = torch.randn(3, 8, D_IN, requires_grad=True)

    def reference(name, rows):
        if name is None:
            return rows.double() @ w.T + b
        lora_A, lora_B, r, alpha, _ = lora.factors(name)
        return rows.double() @ w.T + b + (alpha / r) * (rows.double() @ lora_A.double().T) @ lora_B.double().T

    lorafast.set_adapter(model, "b")
    assert_close_scaled(model(x), reference("b", x))
    saved = saved_activation_bytes(lambda: model(x), exclude=list(model.parameters()))
    assert saved <= (x.numel() + x.shape[0] * x.shape[1] * 2) * x.element_size()
    with lorafast.adapter_ids(model, ["a", None, "b"]):
        y = model(x)
    assert_close_scaled(y, torch.stack([reference("a", x[0]), reference(None, x[1]), reference("b", x[2])]))
    y.square().sum().backward()
    assert lora.lora_A["a"].grad.abs().sum() > 0 and lora.lora_B["b"].grad.abs().sum() > 0
    before = _quant_snapshot(layer)
    with pytest.warns(UserWarning, match="re-quantizes"):
        lorafast.merge_lora(model)
    assert model[0] is layer and not torch.equal(_quant_snapshot(layer)["weight"], before["weight"])


# --- whole models ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama whose projections are at least one 4-bit block (64) wide, saved for quantized loading."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _load(path, bits=4, dtype=torch.float32):
    """The tiny Llama loaded in 4-bit NF4 (double quant, ``dtype`` compute) or 8-bit, in train mode."""
    if bits == 4:
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu", dtype=dtype)
    return model.train()


def _peft(path, bits=4, dtype=torch.float32, dropout=0.0):
    torch.manual_seed(1)  # PEFT's factors; init_lora_weights=False: B non-zero, so the adapters matter
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(_load(path, bits, dtype), config).train()


def _step(model, batch):
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out.logits.detach(), grads


_rel = relative_error


def _losses(model, steps=5):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    batch = lm_batch("llama")
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_patch_peft_matches_peft_qlora_fp32(base_dir, bits, caplog):
    ref, ours = _peft(base_dir, bits), _peft(base_dir, bits)
    with caplog.at_level("INFO", logger="lorafast.peft_patch"):
        lorafast.patch_peft(ours)
    assert "14 of 14 PEFT LoRA layers run lorafast" in caplog.text
    assert patched_layer_count(ours) == 14
    assert repr(ours) == repr(ref)  # patched layers print as PEFT's lora.Linear4bit / lora.Linear8bitLt
    batch = lm_batch("llama")
    (want_logits, want_grads), (logits, grads) = _step(ref, batch), _step(ours, batch)
    assert _rel(logits, want_logits) < 1e-5
    assert grads.keys() == want_grads.keys() and len(grads) == 28
    for name in grads:
        assert _rel(grads[name], want_grads[name]) < 1e-5, name
    want, got = _losses(ref), _losses(ours)
    assert got[-1] < got[0]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=0)
    lorafast.unpatch_peft(ours)
    assert patched_layer_count(ours) == 0


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_patch_peft_matches_peft_qlora_bf16(base_dir, bits):
    """bf16 compute: within 3e-2 of PEFT (which runs the LoRA branch in fp32), and no further from an fp32 run."""
    ref32, ref, ours = (
        _peft(base_dir, bits),
        _peft(base_dir, bits, torch.bfloat16),
        _peft(base_dir, bits, torch.bfloat16),
    )
    lorafast.patch_peft(ours)
    batch = lm_batch("llama")
    (_, exact_grads), (want_logits, want_grads) = _step(ref32, batch), _step(ref, batch)
    logits, grads = _step(ours, batch)
    assert logits.dtype == torch.bfloat16
    assert _rel(logits, want_logits) < 3e-2
    flat = lambda g: torch.cat([t.flatten().double() for t in g.values()])
    assert _rel(flat(grads), flat(want_grads)) < 3e-2
    assert _rel(flat(grads), flat(exact_grads)) < 1.5 * _rel(flat(want_grads), flat(exact_grads)) + 1e-2
    want, got = _losses(ref), _losses(ours)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=3e-2, atol=0)


@needs_bnb
def test_rslora_and_rank_pattern_on_a_4bit_model_load_into_peft_and_back(base_dir, tmp_path):
    """rsLoRA (alpha/sqrt(r)) and per-layer ranks over a quantized base: PEFT's logits, both ways."""
    patterns = {"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"down_proj": 4.0}}
    model = lorafast.apply_lora(_load(base_dir), "all-linear", r=8, alpha=16, use_rslora=True, **patterns)
    layers = dict(lorafast.lora_layers(model))
    assert all(isinstance(m, FusedLoRALinear) and m.use_rslora for m in layers.values())
    assert {m.r for n, m in layers.items() if n.endswith("q_proj")} == {4}
    with torch.no_grad():
        for layer in layers.values():
            torch.nn.init.normal_(layer.lora_B, std=0.05)  # a non-zero update, so the scaling shows
    lorafast.save_adapter(model, tmp_path / "adapter", task_type="CAUSAL_LM")
    # train mode before any forward: in eval mode bitsandbytes' CPU backend repacks 4-bit weights for a bf16 kernel
    peft_model = PeftModel.from_pretrained(_load(base_dir), tmp_path / "adapter").train()
    assert peft_model.peft_config["default"].use_rslora
    batch = lm_batch("llama", seed=9)
    with torch.no_grad():
        assert _rel(model(**batch).logits, peft_model(**batch).logits) < 1e-5
        plain = _load(base_dir)(**batch).logits
        assert _rel(model(**batch).logits, plain) > 1e-3  # the adapter is not a no-op
    peft_model.save_pretrained(tmp_path / "from_peft")
    back = lorafast.load_adapter(_load(base_dir), tmp_path / "from_peft")
    with torch.no_grad():
        assert _rel(back(**batch).logits, peft_model(**batch).logits) < 1e-5


@needs_bnb
def test_apply_lora_all_linear_trains_and_loads_into_peft(base_dir, tmp_path):
    model = lorafast.apply_lora(_load(base_dir), "all-linear", r=8, alpha=16)
    layers = dict(lorafast.lora_layers(model))
    assert len(layers) == 14 and all(isinstance(m, FusedLoRALinear) for m in layers.values())
    before = {n: _quant_snapshot(m.base_layer) for n, m in layers.items()}
    losses = _losses(model, steps=8)
    assert losses[-1] < losses[0]
    for name, layer in layers.items():
        for key, value in _quant_snapshot(layer.base_layer).items():
            assert torch.equal(value, before[name][key]), (name, key)

    lorafast.save_adapter(model, tmp_path / "adapter", task_type="CAUSAL_LM")
    peft_model = PeftModel.from_pretrained(_load(base_dir), tmp_path / "adapter").train()
    batch = lm_batch("llama", seed=9)
    with torch.no_grad():
        assert _rel(model(**batch).logits, peft_model(**batch).logits) < 1e-5

    # A whole patched PEFT QLoRA model pickles (its classes are found by name) and copies.
    lorafast.patch_peft(peft_model)
    assert len(pickle.dumps(peft_model)) > 0
    restored = copy.deepcopy(peft_model)  # the pickling protocol (__reduce_ex__), without unpickling from bytes
    assert patched_layer_count(restored) == 14
    with torch.no_grad():
        assert _rel(restored(**batch).logits, model(**batch).logits) < 1e-5

    # And back: PEFT's QLoRA adapter loads into lorafast on the 4-bit model.
    peft_model.save_pretrained(tmp_path / "from_peft")
    back = lorafast.load_adapter(_load(base_dir), tmp_path / "from_peft")
    assert all(isinstance(m, FusedLoRALinear) for _, m in lorafast.lora_layers(back))
    with torch.no_grad():
        assert _rel(back(**batch).logits, peft_model(**batch).logits) < 1e-5
    # remove_lora gives the bitsandbytes layers back, untouched.
    lorafast.remove_lora(back)
    assert not list(lorafast.lora_layers(back))
    plain = _load(base_dir)
    with torch.no_grad():
        assert _rel(back(**batch).logits, plain(**batch).logits) == 0


@needs_bnb
def test_named_adapter_on_a_4bit_model_loads_into_peft(base_dir, tmp_path):
    model = lorafast.add_adapter(_load(base_dir), "medical", "all-linear", r=8, alpha=16)
    lorafast.add_adapter(model, "legal", "all-linear", r=4, alpha=8)
    assert len(dict(lorafast.multi_lora_layers(model))) == 14
    for _, layer in lorafast.multi_lora_layers(model):
        nn.init.normal_(layer.lora_B["legal"], std=0.05)
    lorafast.set_adapter(model, "legal")
    lorafast.save_adapter(model, tmp_path / "legal", adapter_name="legal")
    peft_model = PeftModel.from_pretrained(_load(base_dir), tmp_path / "legal").train()
    batch = lm_batch("llama", seed=2)
    with torch.no_grad():
        assert _rel(model(**batch).logits, peft_model(**batch).logits) < 1e-5


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_merge_requantizes_as_peft_does(base_dir, bits):
    peft_model = _peft(base_dir, bits)
    ours = lorafast.apply_lora(_load(base_dir, bits), "all-linear", r=8, alpha=16)
    for name, layer in lorafast.lora_layers(ours):
        peft_layer = peft_model.base_model.model.get_submodule(name)
        layer.lora_A.data.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B.data.copy_(peft_layer.lora_B["default"].weight)
    batch = lm_batch("llama", seed=3)
    with torch.no_grad():
        unmerged = ours(**batch).logits
    with pytest.warns(UserWarning, match="re-quantizes"):
        lorafast.merge_lora(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_peft = peft_model.merge_and_unload()
    assert not list(lorafast.lora_layers(ours))
    for name, module in ours.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            peft_module = merged_peft.get_submodule(name)
            torch.testing.assert_close(
                dequantize_weight(module, torch.float32), dequantize_weight(peft_module, torch.float32)
            )
    with torch.no_grad():
        merged = ours(**batch).logits
        assert _rel(merged, merged_peft(**batch).logits) < 1e-5
    assert _rel(merged, unmerged) > 1e-4  # the adapter is in the weights now, up to re-quantization


@needs_bnb
def test_merge_lora_dense_gives_a_plain_bf16_model(base_dir, tmp_path):
    model = lorafast.apply_lora(_load(base_dir), "all-linear", r=8, alpha=16)
    for _, layer in lorafast.lora_layers(model):
        nn.init.normal_(layer.lora_B, std=0.05)
    batch = lm_batch("llama", seed=4)
    with torch.no_grad():
        want = model(**batch).logits
    dense = lorafast.merge_lora_dense(model, torch.bfloat16)
    assert dense is model
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        got = model(**batch).logits
    assert _rel(got, want) < 3e-2
    model.save_pretrained(tmp_path / "dense")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(reloaded.train()(**batch).logits, got)


@needs_bnb
def test_kbit_preparation_and_gradient_checkpointing_match_plain(base_dir):
    plain = lorafast.apply_lora(_load(base_dir), "all-linear", r=8, alpha=16, dropout=0.1)
    for _, layer in lorafast.lora_layers(plain):
        nn.init.normal_(layer.lora_B, std=0.05)
    prepared = prepare_model_for_kbit_training(_load(base_dir), use_gradient_checkpointing=True)
    prepared = lorafast.apply_lora(prepared, "all-linear", r=8, alpha=16, dropout=0.1)
    assert prepared.is_gradient_checkpointing
    prepared.load_state_dict(lorafast.lora_state_dict(plain), strict=False)
    batch = lm_batch("llama")
    torch.manual_seed(5)
    want_logits, want_grads = _step(plain, batch)
    torch.manual_seed(5)
    logits, grads = _step(prepared, batch)
    assert _rel(logits, want_logits) < 1e-5
    for name in want_grads:
        assert _rel(grads[name], want_grads[name]) < 1e-5, name


@needs_bnb
def test_trainer_saves_adapter_only_checkpoints(base_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    rows = lm_batch("llama", batch=8, length=12, seed=5)
    data = [{k: v[i] for k, v in rows.items()} for i in range(8)]
    model = lorafast.apply_lora(_load(base_dir), "all-linear", r=8, alpha=16)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        use_cpu=True, report_to=[], disable_tqdm=True, logging_steps=1, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = lorafast.adapter_checkpoints(Trainer(model=model, args=args, train_dataset=data))
    trainer.train()
    files = {p.name for p in (tmp_path / "checkpoint-2").iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    reloaded = lorafast.load_adapter(_load(base_dir), tmp_path / "checkpoint-2")
    batch = lm_batch("llama", seed=9)
    with torch.no_grad():
        assert _rel(reloaded(**batch).logits, model.train()(**batch).logits) < 1e-5


def test_lorafast_works_without_bitsandbytes():
    """With bitsandbytes unimportable, lorafast imports and trains a plain model (its QLoRA code stays unloaded)."""
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import torch, lorafast\n"
        "from lorafast.bases import is_quantized_linear\n"
        "m = lorafast.apply_lora(torch.nn.Sequential(torch.nn.Linear(8, 8)), target_modules=['0'], r=2)\n"
        "m(torch.randn(3, 8)).sum().backward()\n"
        "assert not is_quantized_linear(m[0]) and m[0].lora_B.grad is not None\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr
