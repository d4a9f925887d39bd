"""DoRA over bitsandbytes 4-bit (NF4/FP4) and 8-bit bases: the layer against float64 references built from the
dequantized weight and central differences, what it keeps for backward, the ‖W0‖² cache across merges, and PEFT's
QLoRA-DoRA (patch_peft, adapter files both ways, merge)."""

import copy
import importlib.util
import warnings

import pytest
import torch
from torch import nn

import lorafast

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
pytestmark = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install lorafast[qlora])")

if HAS_BNB:
    import bitsandbytes as bnb
    from peft import LoraConfig, PeftModel, get_peft_model
    from test_dora import central_differences
    from test_qlora import D_IN, D_OUT, N, _load, _quantized_linear, _rel, _step, base_dir  # noqa: F401
    from tiny_models import lm_batch

    from conftest import assert_close_scaled, keep_mask
    from lorafast import FusedLoRALinear
    from lorafast.base_linear import base_lora_linear, quantized_row_norms_sq
    from lorafast.bases import dequantize_weight
    from lorafast.dropout import dropout_seed
    from lorafast.peft_patch import patched_layer_count

R, S = 4, 2.0  # alpha = 8
KINDS = [("nf4", True), ("fp4", False), ("int8", False)]


def _dora_layer(kind, double_quant=True, dropout=0.0, compute_dtype=torch.float32, adapter_dtype=None, seed=0):
    """A QLoRA-DoRA layer with B non-zero and m away from its init (g ≠ 1)."""
    layer, _ = _quantized_linear(kind, double_quant, compute_dtype=compute_dtype, seed=seed)
    lora = FusedLoRALinear.from_linear(layer, r=R, alpha=8, dropout=dropout, use_dora=True,
                                           adapter_dtype=adapter_dtype).train()  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=g) * 0.1)
        lora.lora_magnitude.mul_(1.0 + 0.2 * torch.randn(D_OUT, generator=g).to(lora.lora_magnitude.dtype))
    return lora


def _reference(lora, x, keep=None, p=0.0):
    """float64 DoRA on the dequantized W0, under plain autograd: ``(y, (x, A, B, m))`` (leaves for the gradients)."""
    w = dequantize_weight(lora.base_layer, torch.float64)
    leaves = [t.detach().double().requires_grad_() for t in (x, lora.lora_A, lora.lora_B, lora.lora_magnitude)]
    x64, a, b, m = leaves
    norm = torch.linalg.vector_norm(w + S * b @ a, dim=1).detach()
    dropped = x64 if keep is None else x64 * keep.double() / (1.0 - p)
    y = (m / norm) * (x64 @ w.T + S * (dropped @ a.T) @ b.T) + lora.base_layer.bias.double()
    return y, leaves


def _grads(y, inputs, grad):
    return torch.autograd.grad(y, inputs, grad)


# --- one layer -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,double_quant", KINDS)
def test_magnitude_starts_as_peft_s_and_the_layer_as_its_base(kind, double_quant):
    layer, _ = _quantized_linear(kind, double_quant)
    lora = lorafast.FusedLoRALinear.from_linear(layer, r=R, alpha=8, use_dora=True)
    assert isinstance(lora, FusedLoRALinear) and "use_dora=True" in repr(lora)
    assert lora.lora_magnitude.dtype == torch.float32
    want = torch.linalg.vector_norm(dequantize_weight(layer, torch.float64), dim=1)
    torch.testing.assert_close(lora.lora_magnitude.double(), want, rtol=1e-6, atol=0)
    x = torch.randn(N, D_IN)
    torch.testing.assert_close(lora(x), layer(x), rtol=1e-5, atol=1e-5)
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_A", "lora_B", "lora_magnitude"]
    assert set(lora.state_dict()) == set(layer.state_dict()) | {"lora_A", "lora_B", "lora_magnitude"}


@pytest.mark.parametrize("kind,double_quant", KINDS)
@pytest.mark.parametrize("n", [N, 2 * D_IN])  # fewer rows than in_features (g scales y), more (g folded into W0)
def test_layer_matches_float64_reference(backend, kind, double_quant, n):
    lora = _dora_layer(kind, double_quant)
    x = torch.randn(n, D_IN, requires_grad=True)
    y = lora(x)
    grad = torch.randn_like(y)
    got = _grads(y, (x, lora.lora_A, lora.lora_B, lora.lora_magnitude), grad)
    want_y, leaves = _reference(lora, x)
    assert_close_scaled(y, want_y.detach())
    for g, w in zip(got, _grads(want_y, leaves, grad.double()), strict=True):
        assert_close_scaled(g, w)


def test_bf16_compute_and_autocast():
    lora = _dora_layer("nf4", compute_dtype=torch.bfloat16)
    x = torch.randn(N, D_IN, dtype=torch.bfloat16, requires_grad=True)
    y = lora(x)
    assert y.dtype == torch.bfloat16
    grad = torch.randn_like(y)
    got = _grads(y, (x, lora.lora_A, lora.lora_B, lora.lora_magnitude), grad)
    assert [g.dtype for g in got[1:]] == [torch.float32] * 3  # the fp32 adapter's gradients in its dtype
    want_y, leaves = _reference(lora, x)
    assert _rel(y, want_y) < 1e-2
    for g, w in zip(got, _grads(want_y, leaves, grad.double()), strict=True):
        assert _rel(g, w) < 2e-2
    x32 = x.detach().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lora(x32).dtype == torch.bfloat16


def test_magnitude_zero_keeps_an_exact_gradient():
    lora = _dora_layer("nf4")
    with torch.no_grad():
        lora.lora_magnitude[[3, 10]] = 0.0  # m's gradient there reads W0, dequantized again in backward
    x = torch.randn(2 * D_IN, D_IN)
    y = lora(x)
    grad = torch.randn_like(y)
    want_y, leaves = _reference(lora, x)
    assert_close_scaled(_grads(y, lora.lora_magnitude, grad)[0], _grads(want_y, leaves[3], grad.double())[0])


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dropout_gradients_equal_central_differences(kind):
    """float64 compute, dropout 0.3: dX, dA, dB, dm equal central differences of the same function (lorafast's
    mask from its seed; the norm held constant, as the detached norm is)."""
    lora = _dora_layer(kind, dropout=0.3, compute_dtype=torch.float64, adapter_dtype=torch.float64)
    x = torch.randn(3, D_IN, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    y = lora(x)
    assert y.dtype == torch.float64
    grad = torch.randn_like(y)
    params = (x, lora.lora_A, lora.lora_B, lora.lora_magnitude)
    got = _grads(y, params, grad)
    torch.manual_seed(5)
    keep = keep_mask("torch", dropout_seed(), x.shape, 0.3)
    assert 0 < keep.sum() < keep.numel()
    w, bias = dequantize_weight(lora.base_layer, torch.float64), lora.base_layer.bias.double()
    norm = torch.linalg.vector_norm(w + S * lora.lora_B.detach() @ lora.lora_A.detach(), dim=1)

    def loss(x, a, b, m):
        return ((m / norm * (x @ w.T + S * ((x * keep / 0.7) @ a.T) @ b.T) + bias) * grad).sum()

    for g, numeric in zip(got, central_differences(loss, params), strict=True):
        torch.testing.assert_close(g, numeric, atol=1e-7, rtol=1e-6)


def test_dropout_uses_the_seeded_mask(backend):
    lora = _dora_layer("nf4", dropout=0.25)
    x = torch.randn(N, D_IN, requires_grad=True)
    torch.manual_seed(7)
    y = lora(x)
    torch.manual_seed(7)
    keep = keep_mask(backend, dropout_seed(), x.shape, 0.25)
    want_y, leaves = _reference(lora, x, keep, 0.25)
    assert_close_scaled(y, want_y.detach())
    grad = torch.randn_like(y)
    got = _grads(y, (x, lora.lora_A, lora.lora_B, lora.lora_magnitude), grad)
    for g, w in zip(got, _grads(want_y, leaves, grad.double()), strict=True):
        assert_close_scaled(g, w)


def _saved_shapes(model, lora, x):
    """The shapes of what ``model(x)`` keeps for backward besides ``lora``'s parameters, x and the base's bias;
    backward then runs on what was kept."""
    params = {p.untyped_storage().data_ptr() for p in lora.parameters()} | {
        t.untyped_storage().data_ptr() for t in (x, lora.base_layer.bias)
    }
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    y.sum().backward()
    return saved


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("n", [N, 2 * D_IN])
def test_saved_tensors_hold_nothing_of_w0(backend, kind, n):
    """Kept for backward: x, xa (n, r), y and (out,) vectors; no (out, in) tensor (W0 is dequantized again)."""
    lora = _dora_layer(kind, dropout=0.1)
    x = torch.randn(n, D_IN, requires_grad=True)
    saved = _saved_shapes(lora, lora, x)
    assert lora.lora_A.grad is not None
    assert (D_OUT, D_IN) not in saved and (D_IN, D_OUT) not in saved
    assert sorted(saved) == sorted([(n, R), (n, D_OUT), (D_OUT,), (D_OUT,)]), saved


def test_base_norms_are_cached_and_follow_merge_and_unmerge():
    lora = _dora_layer("nf4")
    base = lora.base_layer
    first = quantized_row_norms_sq(base)
    assert quantized_row_norms_sq(base) is first
    torch.testing.assert_close(first, dequantize_weight(base, torch.float32).square().sum(1))
    x = torch.randn(N, D_IN)
    with torch.no_grad():
        before = lora(x)
    with pytest.warns(UserWarning, match="re-quantizes"):
        lora.merge()
    merged_sq = quantized_row_norms_sq(base)  # a new quantized weight: new norms
    assert not torch.equal(merged_sq, first)
    torch.testing.assert_close(merged_sq, dequantize_weight(base, torch.float32).square().sum(1))
    with pytest.warns(UserWarning, match="re-quantizes"):
        lora.unmerge()
    after = quantized_row_norms_sq(base)
    torch.testing.assert_close(after, dequantize_weight(base, torch.float32).square().sum(1))
    assert not torch.equal(after, merged_sq)
    # the forward after unmerge reads the unmerged weight's norms, not a stale entry
    x.requires_grad_()
    y = lora(x)
    want_y, _ = _reference(lora, x)
    assert_close_scaled(y, want_y.detach())
    assert _rel(y, before) < 0.3  # W0 back up to two NF4 re-quantizations


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_and_merge_lora_dense(kind):
    lora = _dora_layer(kind)
    x = torch.randn(N, D_IN)
    with torch.no_grad():
        want = lora(x)
    dense_model = lorafast.merge_lora_dense(nn.Sequential(copy.deepcopy(lora)), torch.float32)
    assert type(dense_model[0]) is nn.Linear
    w, _ = lorafast.dora.merged_weight(lora.base_weight(), lora.lora_A, lora.lora_B, lora.lora_magnitude, S)
    torch.testing.assert_close(dense_model[0].weight, w)
    torch.testing.assert_close(dense_model(x), want, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="re-quantizes"):
        lora.merge()
    assert lora.merged
    # re-quantized g·(W0 + s·BA): the DoRA output up to the quantization's rounding
    with torch.no_grad():
        assert _rel(lora(x), want) < (0.1 if kind != "int8" else 1e-2)
    torch.testing.assert_close(dequantize_weight(lora.base_layer, torch.float32), w, rtol=0, atol=0.2 * w.abs().max())


def test_bad_input_is_refused_before_anything_changes():
    layer, _ = _quantized_linear("nf4")
    with pytest.raises(ValueError, match="use_dora must be a bool"):
        FusedLoRALinear.from_linear(layer, r=R, use_dora="yes")
    assert layer.bias.requires_grad  # the refused call froze nothing
    model = nn.Sequential(bnb.nn.Linear4bit(D_IN, D_OUT), nn.Linear(D_OUT, 16))  # never moved: not quantized
    with pytest.raises(ValueError, match="not quantized yet"):
        lorafast.apply_lora(model, target_modules=["0", "1"], use_dora=True)
    with pytest.raises(ValueError, match="use_dora must be a bool"):
        lorafast.apply_lora(model, target_modules=["1"], use_dora=1)
    assert type(model[0]) is bnb.nn.Linear4bit and type(model[1]) is nn.Linear
    assert model[1].weight.requires_grad  # nothing was frozen
    unquantized8 = bnb.nn.Linear8bitLt(D_IN, D_OUT, has_fp16_weights=False)
    with pytest.raises(ValueError, match="not quantized yet"):
        FusedLoRALinear.from_linear(unquantized8, r=R, use_dora=True)
    lora = _dora_layer("nf4")
    x = torch.randn(N, D_IN)
    with pytest.raises(ValueError, match="magnitude must have shape"):
        base_lora_linear(x, lora.base_layer, lora.lora_A, lora.lora_B, S, magnitude=lora.lora_magnitude[:-1])
    with pytest.raises(ValueError, match="Linear4bit"):
        base_lora_linear(x, nn.Conv1d(D_IN, D_OUT, 1), lora.lora_A, lora.lora_B, S, magnitude=lora.lora_magnitude)


# --- PEFT ------------------------------------------------------------------------------------------------------


def _peft_dora(path, bits, dropout=0.0):
    torch.manual_seed(1)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                        init_lora_weights=False, use_dora=True)  # fmt: skip
    model = get_peft_model(_load(path, bits), config).train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.2 * torch.randn(param.shape))
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_patch_peft_matches_peft_qlora_dora_fp32(base_dir, bits, caplog, monkeypatch):
    ref = _peft_dora(base_dir, bits)
    ours = copy.deepcopy(ref)
    with caplog.at_level("INFO", logger="lorafast.peft_patch"):
        lorafast.patch_peft(ours)
    assert "14 of 14 PEFT LoRA layers run lorafast" in caplog.text
    assert patched_layer_count(ours) == 14
    calls = []
    real = lorafast.peft_patch.base_lora_linear  # what the PEFT bridge runs over a quantized base
    spy = lambda *a, **k: calls.append(a[-1] is not None) or real(*a, **k)  # a[-1]: DoRA's magnitude
    monkeypatch.setattr(lorafast.peft_patch, "base_lora_linear", spy)
    batch = lm_batch("llama")
    (want_logits, want_grads), (logits, grads) = _step(ref, batch), _step(ours, batch)
    assert len(calls) == 14 and all(calls)  # every layer ran lorafast's QLoRA-DoRA
    assert _rel(logits, want_logits) < 1e-5
    assert grads.keys() == want_grads.keys() and len(grads) == 3 * 14  # A, B and m of every layer
    for name in grads:
        assert _rel(grads[name], want_grads[name]) < 1e-5, name


def test_patched_bnb_dora_layer_with_dropout_is_lorafast_s_dora():
    """Dropout: PEFT draws its own mask (and runs a second base GEMM on the dropped input); the patched layer runs
    lorafast's DoRA, checked against dora_linear on the dequantized weight with the same seed."""
    holder = nn.Sequential(_quantized_linear("nf4")[0])
    holder.is_loaded_in_4bit = True  # what PEFT reads to wrap the layer as lora.bnb.Linear4bit
    config = LoraConfig(r=R, lora_alpha=8, lora_dropout=0.2, target_modules=["0"], init_lora_weights=False,
                        use_dora=True)  # fmt: skip
    model = lorafast.patch_peft(get_peft_model(holder, config)).train()
    layer = model.base_model.model[0]
    assert type(layer).__qualname__ == "PeftFusedLinear4bit"
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    w = dequantize_weight(layer.base_layer, torch.float32)
    x = torch.randn(N, D_IN, requires_grad=True)
    torch.manual_seed(4)
    got_y = model(x)
    grad = torch.randn_like(got_y)
    got = _grads(got_y, (x, a, b, m), grad)
    torch.manual_seed(4)
    want_y = lorafast.dora.dora_linear(x, w, layer.base_layer.bias, a, b, m, S, 0.2, True)
    want = _grads(want_y, (x, a, b, m), grad)
    torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-5)
    for g, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g, w_, rtol=1e-5, atol=1e-5)


def _trained_dora(path, bits=4):
    model = lorafast.apply_lora(_load(path, bits), "all-linear", r=8, alpha=16, use_dora=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lorafast.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
            layer.lora_magnitude.mul_(1.0 + 0.2 * torch.randn(layer.lora_magnitude.shape, generator=g))
    return model


def test_dora_adapter_loads_in_peft_over_the_4bit_base_and_back(base_dir, tmp_path):
    model = _trained_dora(base_dir)
    layers = dict(lorafast.lora_layers(model))
    assert len(layers) == 14 and all(isinstance(m, FusedLoRALinear) and m.use_dora for m in layers.values())
    lorafast.save_adapter(model, tmp_path / "ours", task_type="CAUSAL_LM")
    # train mode before any forward: in eval mode bitsandbytes' CPU backend repacks 4-bit weights
    peft_model = PeftModel.from_pretrained(_load(base_dir), tmp_path / "ours").train()
    assert peft_model.peft_config["default"].use_dora
    batch = lm_batch("llama", seed=9)
    with torch.no_grad():
        ours = model(**batch).logits
        assert _rel(ours, peft_model(**batch).logits) < 1e-5
        assert _rel(ours, _load(base_dir)(**batch).logits) > 1e-3  # the adapter is not a no-op
    peft_model.save_pretrained(tmp_path / "peft")
    back = lorafast.load_adapter(_load(base_dir), tmp_path / "peft")
    assert all(isinstance(m, FusedLoRALinear) and m.use_dora for _, m in lorafast.lora_layers(back))
    with torch.no_grad():
        assert _rel(back(**batch).logits, ours) < 1e-5


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_requantizes_as_peft_does(base_dir, bits):
    peft_model = _peft_dora(base_dir, bits)
    ours = lorafast.apply_lora(_load(base_dir, bits), "all-linear", r=8, alpha=16, use_dora=True)
    for name, layer in lorafast.lora_layers(ours):
        peft_layer = peft_model.base_model.model.get_submodule(name)
        layer.lora_A.data.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B.data.copy_(peft_layer.lora_B["default"].weight)
        layer.lora_magnitude.data.copy_(peft_layer.lora_magnitude_vector["default"].weight)
    batch = lm_batch("llama", seed=3)
    with torch.no_grad():
        unmerged = ours(**batch).logits
        assert _rel(unmerged, peft_model(**batch).logits) < 1e-5
    with pytest.warns(UserWarning, match="re-quantizes"):
        lorafast.merge_lora(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_peft = peft_model.merge_and_unload()
    for name, module in ours.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            torch.testing.assert_close(
                dequantize_weight(module, torch.float32),
                dequantize_weight(merged_peft.get_submodule(name), torch.float32),
            )
    with torch.no_grad():
        merged = ours(**batch).logits
        assert _rel(merged, merged_peft(**batch).logits) < 1e-5
    assert _rel(merged, unmerged) > 1e-5  # the re-quantized weights differ from DoRA's by rounding only


# --- named adapters --------------------------------------------------------------------------------------------


def _named_dora_model(kind):
    """One quantized linear with a DoRA adapter "d" (B non-zero, m away from its init) and a plain adapter "p"."""
    layer, _ = _quantized_linear(kind)
    model = nn.Sequential(layer)
    lorafast.add_adapter(model, "d", target_modules=["0"], r=R, alpha=8, use_dora=True)
    lorafast.add_adapter(model, "p", target_modules=["0"], r=2, alpha=4)
    lora = model[0]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in "dp":
            lora.lora_B[name].copy_(torch.randn(lora.lora_B[name].shape, generator=g) * 0.1)
        lora.lora_magnitude["d"].mul_(1.0 + 0.2 * torch.randn(D_OUT, generator=g))
    return model, lora


def _named_reference(lora, name, rows, leaves):
    """float64 output of adapter ``name`` (None: the base) on ``rows``; ``leaves``: float64 copies of the factors."""
    w, b = dequantize_weight(lora.base_layer, torch.float64), lora.base_layer.bias.double()
    if name is None:
        return rows @ w.T + b
    a, bb, m = leaves[name]
    s = lora.scaling(name)
    z = rows @ w.T + s * (rows @ a.T) @ bb.T
    if m is None:
        return z + b
    return m / torch.linalg.vector_norm(w + s * bb @ a, dim=1).detach() * z + b


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_named_dora_adapters_single_and_mixed_match_float64(backend, kind):
    """A DoRA and a plain named adapter over a quantized base: the active DoRA adapter, then a batch mixing DoRA,
    base and plain rows; outputs and the gradients of x and every factor and magnitude against float64."""
    model, lora = _named_dora_model(kind)
    assert type(lora) is lorafast.MultiLoRALinear and lora.uses_dora("d") and not lora.uses_dora("p")
    torch.testing.assert_close(
        lora.lora_magnitude["d"].detach().double() / torch.linalg.vector_norm(lora.base_weight().double(), dim=1),
        torch.ones(D_OUT, dtype=torch.float64),
        rtol=0.7,
        atol=0,
    )  # PEFT's init ‖W0‖_row, scaled above by 1 ± 0.2·N(0, 1)
    params = {n: lora.lora_A[n] for n in "dp"}, {n: lora.lora_B[n] for n in "dp"}
    trained = [params[0]["d"], params[1]["d"], lora.lora_magnitude["d"], params[0]["p"], params[1]["p"]]
    leaves = {
        "d": [t.detach().double().requires_grad_() for t in trained[:3]],
        "p": [t.detach().double().requires_grad_() for t in trained[3:]] + [None],
    }
    x = torch.randn(3, N, D_IN, requires_grad=True)
    x64 = x.detach().double().requires_grad_()

    lorafast.set_adapter(model, "d")
    y = model(x)
    want = _named_reference(lora, "d", x64, leaves)
    assert_close_scaled(y, want.detach())
    grad = torch.randn_like(y)
    got = _grads(y, [x, *trained[:3]], grad)
    for g, w in zip(got, _grads(want, [x64, *leaves["d"]], grad.double()), strict=True):
        assert_close_scaled(g, w)

    with lorafast.adapter_ids(model, ["d", None, "p"]):
        y = model(x)
    want = torch.stack([_named_reference(lora, n, x64[i], leaves) for i, n in enumerate(["d", None, "p"])])
    assert_close_scaled(y, want.detach())
    got = _grads(y, [x, *trained], grad)
    wanted = _grads(want, [x64, *leaves["d"], *leaves["p"][:2]], grad.double())
    for g, w in zip(got, wanted, strict=True):
        assert_close_scaled(g, w)


def test_active_named_dora_adapter_keeps_nothing_of_w0(backend):
    model, lora = _named_dora_model("nf4")
    lorafast.set_adapter(model, "d")
    x = torch.randn(N, D_IN, requires_grad=True)
    saved = _saved_shapes(model, lora, x)
    assert lora.lora_magnitude["d"].grad is not None
    assert sorted(saved) == sorted([(N, R), (N, D_OUT), (D_OUT,), (D_OUT,)]), saved  # xa, y, norm, g


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_named_dora_adapter_merges_as_peft(kind):
    """merge_lora_dense writes g·(W0 + s·BA) exactly; merge_lora re-quantizes it (lossy, warns)."""
    model, lora = _named_dora_model(kind)
    lorafast.set_adapter(model, "d")
    x = torch.randn(N, D_IN)
    with torch.no_grad():
        want = model(x)
    w, _ = lorafast.dora.merged_weight(lora.base_weight(), lora.lora_A["d"], lora.lora_B["d"],
                                       lora.lora_magnitude["d"], lora.scaling("d"))  # fmt: skip
    dense = lorafast.merge_lora_dense(copy.deepcopy(model), torch.float32)
    assert type(dense[0]) is nn.Linear
    torch.testing.assert_close(dense[0].weight, w)
    torch.testing.assert_close(dense(x), want, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="re-quantizes"):
        lorafast.merge_lora(model)
    assert type(model[0]) is type(lora.base_layer)
    torch.testing.assert_close(dequantize_weight(model[0], torch.float32), w, rtol=0, atol=0.2 * w.abs().max())
    with torch.no_grad():
        assert _rel(model(x), want) < (0.1 if kind != "int8" else 1e-2)


def test_named_dora_adapter_on_a_4bit_model_loads_into_peft_and_back(base_dir, tmp_path):
    model = lorafast.add_adapter(_load(base_dir), "plain", "all-linear", r=4, alpha=8)
    lorafast.add_adapter(model, "dora", "all-linear", r=8, alpha=16, use_dora=True)
    torch.manual_seed(0)
    for _, layer in lorafast.multi_lora_layers(model):
        nn.init.normal_(layer.lora_B["dora"], std=0.05)
        with torch.no_grad():
            layer.lora_magnitude["dora"].mul_(1.0 + 0.2 * torch.randn(layer.out_features))
    model.train()
    lorafast.set_adapter(model, "dora")
    lorafast.save_adapter(model, tmp_path / "dora", adapter_name="dora")
    peft_model = PeftModel.from_pretrained(_load(base_dir), tmp_path / "dora").train()
    batch = lm_batch("llama", seed=2)
    with torch.no_grad():
        want = peft_model(**batch).logits
        assert _rel(model(**batch).logits, want) < 1e-5
    back = lorafast.load_adapter(_load(base_dir), tmp_path / "dora", adapter_name="again").train()
    with torch.no_grad():
        assert _rel(back(**batch).logits, want) < 1e-5
