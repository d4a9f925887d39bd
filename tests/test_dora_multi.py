"""DoRA named adapters: MultiLoRALinear's DoRA adapters alone and in mixed batches (beside plain adapters and base
rows) against float64 per-row references on both backends, merge, removal, errors, and PEFT's files both ways."""

import importlib.util

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_dora import _reference as dora_reference
from test_dora import central_differences
from tiny_models import MODELS, TASK_TYPES, lm_batch

import lorafast
from conftest import assert_close_scaled, keep_mask
from lorafast import FusedLoRALinear, MultiLoRALinear, lora_state_dict, multi_lora_layers
from lorafast.dropout import draw_seed
from lorafast.profiling import saved_activation_bytes

# (name, r, alpha, use_dora): DoRA and plain adapters interleaved, so DoRA slots differ from adapter indices
ADAPTERS = [("d1", 3, 5.0, True), ("p", 2, 3.0, False), ("d2", 4, 2.0, True)]


def _layer(in_f=24, out_f=16, bias=True, dtype=torch.float32, seed=0, adapters=ADAPTERS):
    """A MultiLoRALinear with ``adapters``, B random and magnitudes away from their init (g ≠ 1)."""
    torch.manual_seed(seed)
    layer = MultiLoRALinear.from_linear(torch.nn.Linear(in_f, out_f, bias=bias, dtype=dtype))
    for name, r, alpha, use_dora in adapters:
        layer.add_adapter(name, r=r, alpha=alpha, use_dora=use_dora)
        with torch.no_grad():
            layer.lora_B[name].normal_(0.0, 0.3)
            if use_dora:
                layer.lora_magnitude[name].mul_(1.0 + 0.2 * torch.randn(out_f, dtype=dtype))
    return layer


def _trainable(layer):
    return {n: p for n, p in layer.named_parameters() if p.requires_grad}


def _reference(layer, x, ids, masks=None):
    """float64, one row at a time: base rows ``x·W0ᵀ + b``, plain rows ``+ s·(drop(x)·Aᵀ)·Bᵀ``, DoRA rows
    ``m/‖W0 + s·BA‖_row ⊙ (x·W0ᵀ + s·(drop(x)·Aᵀ)·Bᵀ) + b`` (the norm detached). Returns y and float64 leaf copies
    of x and the layer's trainable parameters."""
    params = {n: p.detach().double().requires_grad_() for n, p in _trainable(layer).items()}
    x = x.detach().double().requires_grad_()
    weight = layer.weight.detach().double()
    bias = 0.0 if layer.bias is None else layer.bias.detach().double()
    x2 = x.reshape(-1, x.shape[-1])
    rows = []
    for i, k in enumerate(ids.tolist()):
        base = x2[i] @ weight.t()
        if k < 0:
            rows.append(base + bias)
            continue
        name = layer.adapter_names[k]
        a, b, s = params[f"lora_A.{name}"], params[f"lora_B.{name}"], layer.scaling(name)
        p = layer.dropouts[name]
        dropped = x2[i] if not p else x2[i] * masks[name][i].double() / (1.0 - p)
        z = base + s * (dropped @ a.t()) @ b.t()
        if layer.uses_dora(name):
            norm = torch.linalg.vector_norm(weight + s * b @ a, dim=1).detach()
            z = params[f"lora_magnitude.{name}"] / norm * z
        rows.append(z + bias)
    return torch.stack(rows).view(*x.shape[:-1], -1), x, params


def _check_against_reference(layer, x, ids, masks=None, dtype=torch.float32):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    grad = torch.randn_like(y)
    params = _trainable(layer)
    got = torch.autograd.grad(y, [x, *params.values()], grad)
    want_y, x64, params64 = _reference(layer, x, ids, masks)
    want = torch.autograd.grad(want_y, [x64, *params64.values()], grad.double())
    assert_close_scaled(y, want_y.detach(), dtype)
    for name, g, w in zip(["x", *params], got, want, strict=True):
        assert g.dtype == (x.dtype if name == "x" else params[name].dtype), name
        assert_close_scaled(g, w, dtype)
    return got


@pytest.mark.parametrize("bias", [True, False])
def test_mixed_batch_of_dora_plain_and_base_rows_equals_float64_rows(backend, bias):
    layer = _layer(bias=bias).train()
    ids = torch.tensor([0, 1, 2, -1, 2, 0, 0, 1, -1, 2, 0, 1, 2])
    layer.set_row_adapters(ids)
    got = _check_against_reference(layer, torch.randn(13, 24), ids)
    assert all(g.abs().sum() > 0 for g in got)  # every adapter's A, B and m got a gradient from its rows


def test_mixed_batch_per_sequence_ids_on_3d_input(backend):
    layer = _layer()
    seq_ids = torch.tensor([2, -1, 0, 1])
    x = torch.randn(4, 5, 24)
    with lorafast.adapter_ids(torch.nn.Sequential(layer), seq_ids.tolist()):
        _check_against_reference(layer, x, seq_ids[:, None].expand(4, 5).reshape(-1))


def test_mixed_batch_with_dropout_equals_rows_under_the_same_masks(backend):
    adapters = [("d1", 3, 5.0, True), ("p", 2, 3.0, False), ("d2", 4, 2.0, True)]
    layer = _layer(adapters=adapters).train()
    for name, p in (("d1", 0.25), ("p", 0.1), ("d2", 0.0)):
        layer.dropouts[name] = p
    ids = torch.tensor([0, 1, 2, -1, 2, 0, 0, 1, -1, 2, 0, 1, 2, 0, 0])
    x = torch.randn(15, 24)
    layer.set_row_adapters(ids)
    torch.manual_seed(5)
    seed = draw_seed()
    masks = {n: keep_mask(backend, seed, tuple(x.shape), p) if p else None for n, p in layer.dropouts.items()}
    assert 0 < masks["d1"][ids == 0].sum() < masks["d1"][ids == 0].numel()
    torch.manual_seed(5)
    _check_against_reference(layer, x, ids, masks)


def test_mixed_dropout_gradients_equal_central_differences():
    """float64 on the PyTorch path (the Triton kernels run no fp64), dropout on a DoRA and a plain adapter: dX, dA,
    dB, dm equal central differences of the function lorafast computes (its masks from the seed, norms held
    constant as the detached norms are)."""
    layer = _layer(in_f=5, out_f=4, dtype=torch.float64, adapters=[("d", 2, 3.0, True), ("p", 1, 2.0, False)])
    layer.train().dropouts.update(d=0.3, p=0.4)
    ids = torch.tensor([0, 1, -1, 0, 1, 0])
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    layer.set_row_adapters(ids)
    params = _trainable(layer)
    torch.manual_seed(3)
    y = layer(x)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *params.values()], grad)
    torch.manual_seed(3)
    seed = draw_seed()
    keep = {n: keep_mask("torch", seed, tuple(x.shape), p) for n, p in layer.dropouts.items()}
    assert 0 < keep["d"][ids == 0].sum() < keep["d"][ids == 0].numel()
    weight, bias, names = layer.weight.detach(), layer.bias.detach(), list(params)
    s = {n: layer.scaling(n) for n in layer.adapter_names}
    norm = torch.linalg.vector_norm(weight + s["d"] * params["lora_B.d"] @ params["lora_A.d"], dim=1).detach()

    def loss(x, *values):
        v = dict(zip(names, values, strict=True))
        y = x @ weight.t() + bias
        for k, n in enumerate(layer.adapter_names):
            lora = s[n] * ((x * keep[n] / (1 - layer.dropouts[n])) @ v[f"lora_A.{n}"].t()) @ v[f"lora_B.{n}"].t()
            row = (ids == k)[:, None]
            if n == "d":
                y = torch.where(row, v["lora_magnitude.d"] / norm * (x @ weight.t() + lora) + bias, y)
            else:
                y = torch.where(row, y + lora, y)
        return (y * grad).sum()

    numeric = central_differences(loss, (x, *params.values()))
    for name, g, n in zip(["x", *names], got, numeric, strict=True):
        torch.testing.assert_close(g, n, atol=1e-7, rtol=1e-6, msg=name)


def test_bf16_autocast_mixed_batch_against_fp32_reference(backend):
    layer = _layer()
    ids = torch.tensor([0, 1, 2, -1, 2, 0, 1, 0])
    layer.set_row_adapters(ids)
    x = torch.randn(8, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    want, x64, params64 = _reference(layer, x, ids)
    want.square().sum().backward()
    assert_close_scaled(y, want.detach(), torch.bfloat16)
    assert_close_scaled(x.grad, x64.grad, torch.bfloat16, rel=5e-2)
    for name, p in _trainable(layer).items():
        assert p.grad.dtype == torch.float32
        assert_close_scaled(p.grad, params64[name].grad, torch.bfloat16, rel=5e-2)


def test_active_dora_adapter_equals_fused_dora_layer(backend):
    layer = _layer().train()
    layer.set_adapter("d2")
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 16)
    fused = FusedLoRALinear.from_linear(linear, r=4, alpha=2.0, use_dora=True).train()
    with torch.no_grad():
        for ours, theirs in ((layer.lora_A["d2"], fused.lora_A), (layer.lora_B["d2"], fused.lora_B)):
            theirs.copy_(ours)
        fused.lora_magnitude.copy_(layer.lora_magnitude["d2"])
    x = torch.randn(2, 7, 24)
    outs = []
    for module, params in ((layer, [layer.lora_A["d2"], layer.lora_B["d2"], layer.lora_magnitude["d2"]]),
                           (fused, [fused.lora_A, fused.lora_B, fused.lora_magnitude])):  # fmt: skip
        y = module(x)
        outs.append((y, *torch.autograd.grad(y.square().sum(), params)))
    for got, want in zip(*outs, strict=True):
        torch.testing.assert_close(got, want)
    # both sides run dora_linear: the fused layer's values against float64 DoRA written in test_dora
    leaves = [t.detach().double().requires_grad_() for t in (fused.lora_A, fused.lora_B, fused.lora_magnitude)]
    want_y = dora_reference(x, linear.weight.detach(), linear.bias.detach(), *leaves, layer.scaling("d2"))
    want = (want_y, *torch.autograd.grad(want_y.square().sum(), leaves))
    for got, expected in zip(outs[1], want, strict=True):
        assert_close_scaled(got, expected.detach())


def test_saved_for_backward_is_the_mixed_lora_s_plus_z():
    """x, xa and the row ids as the plain mixed batch, plus z (n, out) and (out,)-sized tables; z only when a
    magnitude trains."""
    n, in_f, out_f = 64, 48, 40
    layer = _layer(in_f=in_f, out_f=out_f)
    layer.set_row_adapters(torch.randint(-1, 3, (n,)))
    x = torch.randn(n, in_f)
    exclude = [layer.weight, *layer.parameters()]
    saved = saved_activation_bytes(lambda: layer(x), exclude=exclude)
    rank = max(layer.ranks().values())
    lora_bytes = x.nbytes + n * rank * 4 + n * 8 + 3 * 4  # x, xa, row ids, scalings
    tables = n * 8 + (2 * 2 + 1) * out_f * 4  # slots, G and norms
    assert lora_bytes + n * out_f * 4 <= saved <= lora_bytes + n * out_f * 4 + tables
    for m in layer.lora_magnitude.values():
        m.requires_grad_(False)
    assert saved_activation_bytes(lambda: layer(x), exclude=exclude) <= lora_bytes + tables


def test_add_adapter_initialises_as_peft_and_starts_as_the_base_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 10).to(torch.bfloat16)
    layer = MultiLoRALinear.from_linear(linear)
    layer.add_adapter("d", r=4, use_dora=True)
    layer.add_adapter("p", r=2)
    m = layer.lora_magnitude["d"]
    assert m.dtype == torch.float32 and m.requires_grad and layer.uses_dora("d") and not layer.uses_dora("p")
    assert layer.magnitude("p") is None and layer.magnitude("d") is m
    torch.testing.assert_close(m.detach(), torch.linalg.vector_norm(linear.weight.float(), dim=1))
    assert "d(r=4, alpha=16, use_dora=True), p(r=2, alpha=16)" in repr(layer)
    x = torch.randn(5, 12, dtype=torch.bfloat16)
    layer.set_row_adapters(torch.tensor([0, 1, -1, 0, 0]))
    assert_close_scaled(layer(x), linear(x), torch.bfloat16)  # the bias is added to z rounded to bf16


def test_merge_and_remove_adapter():
    layer = _layer().eval()
    x = torch.randn(6, 24)
    for name in ("d1", "p"):
        merged = _layer().eval()
        merged.set_adapter(name)
        want = merged(x)
        base = merged.to_base_layer(merge=True)
        assert type(base) is torch.nn.Linear
        torch.testing.assert_close(base(x), want, atol=1e-5, rtol=1e-5)
    # PEFT's get_delta_weight: s·B·A, the magnitude only enters merging
    torch.testing.assert_close(
        layer.get_delta_weight("d1"), layer.scaling("d1") * layer.lora_B["d1"] @ layer.lora_A["d1"]
    )
    assert set(lora_state_dict(torch.nn.Sequential(layer))) >= {"0.lora_magnitude.d1", "0.lora_magnitude.d2"}
    layer.set_adapter("d1")
    layer.remove_adapter("d1")
    assert "d1" not in layer.lora_magnitude and layer.active_adapter is None
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.p", "lora_A.d2", "lora_B.p", "lora_B.d2",
                                       "lora_magnitude.d2"}  # fmt: skip
    layer.set_row_adapters(torch.tensor([1, 0, -1, 1, 0, 0]))  # ids follow the remaining adapters: p, d2
    _check_against_reference(layer, x, torch.tensor([1, 0, -1, 1, 0, 0]))


def test_model_add_adapter_and_merge_lora():
    model = MODELS["llama"]()
    lorafast.add_adapter(model, "plain", target_modules=["q_proj", "v_proj"], r=4)
    lorafast.add_adapter(model, "dora", target_modules=["q_proj", "v_proj"], r=8, use_dora=True)
    layers = dict(multi_lora_layers(model))
    assert all(layer.uses_dora("dora") and not layer.uses_dora("plain") for layer in layers.values())
    trainable = {".".join(n.split(".")[-2:]) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{f}.{a}" for f in ("lora_A", "lora_B") for a in ("plain", "dora")} | {"lora_magnitude.dora"}
    _perturb(model)
    batch = lm_batch("llama")
    lorafast.set_adapter(model, "dora")
    want = _logits(model, batch)
    merged = lorafast.merge_lora(model)
    assert not list(multi_lora_layers(merged))
    torch.testing.assert_close(_logits(merged, batch), want, atol=1e-5, rtol=1e-5)


def test_errors_leave_the_model_unchanged():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    with pytest.raises(ValueError, match="use_dora must be a bool"):
        lorafast.add_adapter(model, "a", target_modules=["0"], use_dora=1)
    assert type(model[0]) is torch.nn.Linear and model[0].weight.requires_grad
    layer = MultiLoRALinear.from_linear(torch.nn.Linear(6, 5))
    with pytest.raises(ValueError, match="use_dora must be a bool"):
        layer.add_adapter("a", use_dora="yes")
    assert layer.adapter_names == []
    with pytest.raises(ValueError, match="no adapter named"):
        layer.uses_dora("a")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_dora_named_adapter_over_an_unquantized_bnb_module_is_refused_before_the_model_changes():
    import bitsandbytes as bnb

    model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 32), torch.nn.Linear(32, 16))
    with pytest.raises(ValueError, match="not quantized yet"):
        lorafast.add_adapter(model, "d", target_modules=["0", "1"], use_dora=True)
    assert type(model[0]) is bnb.nn.Linear4bit and type(model[1]) is torch.nn.Linear
    assert model[1].weight.requires_grad  # nothing was frozen
    lorafast.add_adapter(model, "plain", target_modules=["0", "1"])
    with pytest.raises(ValueError, match="not quantized yet"):
        lorafast.add_adapter(model, "d", target_modules=["0", "1"], use_dora=True)
    assert lorafast.list_adapters(model) == ["plain"]
    with pytest.raises(ValueError, match="not quantized yet"):
        model[0].add_adapter("d", use_dora=True)
    assert model[0].adapter_names == ["plain"]


# --- PEFT's files both ways ---------------------------------------------------------------------------


def _perturb(model, seed=3):
    """Random B and magnitudes away from their init, so every adapter changes the output (DoRA's g ≠ 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
            elif "lora_magnitude" in name:
                param.mul_(1.0 + 0.2 * torch.randn(param.shape, generator=g))


def _logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_named_dora_adapter_saved_by_lorafast_loads_in_peft(kind, tmp_path):
    model = MODELS[kind]()
    targets = ["q_proj", "v_proj"]
    lorafast.add_adapter(model, "plain", target_modules=targets, r=4)
    lorafast.add_adapter(model, "dora", target_modules=targets, r=8, use_dora=True)
    _perturb(model)
    for name in ("plain", "dora"):
        lorafast.save_adapter(model, tmp_path / name, task_type=TASK_TYPES[kind], adapter_name=name)
    config = (tmp_path / "dora" / "adapter_config.json").read_text()
    assert '"use_dora": true' in config
    peft_model = PeftModel.from_pretrained(MODELS[kind](), tmp_path / "dora", adapter_name="dora")
    peft_model.load_adapter(tmp_path / "plain", adapter_name="plain")
    batch = lm_batch(kind)
    per_adapter = {}
    for name in ("dora", "plain"):
        peft_model.set_adapter(name)
        lorafast.set_adapter(model, name)
        per_adapter[name] = _logits(peft_model, batch)
        torch.testing.assert_close(_logits(model, batch), per_adapter[name], atol=1e-5, rtol=1e-5)
    # PEFT refuses DoRA in its mixed batches; each row of lorafast's equals PEFT's run of that row's adapter
    with lorafast.adapter_ids(model, ["dora", "plain", "dora"]):
        mixed = _logits(model, batch)
    for row, name in enumerate(("dora", "plain", "dora")):
        torch.testing.assert_close(mixed[row], per_adapter[name][row], atol=1e-5, rtol=1e-5)


def test_peft_model_with_a_dora_and_a_plain_adapter_loads_as_named_adapters(tmp_path):
    torch.manual_seed(1)
    common = {"target_modules": "all-linear", "init_lora_weights": False, "task_type": "CAUSAL_LM"}
    peft_model = get_peft_model(MODELS["llama"](), LoraConfig(r=4, lora_alpha=8, **common), adapter_name="plain")
    peft_model.add_adapter("dora", LoraConfig(r=8, lora_alpha=16, use_dora=True, **common))
    _perturb(peft_model)
    peft_model.save_pretrained(tmp_path)  # each adapter but "default" in a folder of its name
    model = MODELS["llama"]()
    for name in ("plain", "dora"):
        lorafast.load_adapter(model, tmp_path / name, adapter_name=name)
    layers = dict(multi_lora_layers(model))
    assert len(layers) == 14 and all(
        layer.uses_dora("dora") and not layer.uses_dora("plain") for layer in layers.values()
    )
    batch = lm_batch("llama")
    per_adapter = {}
    for name in ("plain", "dora"):
        peft_model.set_adapter(name)
        lorafast.set_adapter(model, name)
        per_adapter[name] = _logits(peft_model, batch)
        torch.testing.assert_close(_logits(model, batch), per_adapter[name], atol=1e-5, rtol=1e-5)
    ids = ["dora", None, "plain"]
    with pytest.raises(ValueError, match="DoRA"):  # PEFT's mixed batches do not take DoRA adapters
        peft_model(**batch, adapter_names=[n or "__base__" for n in ids])
    with lorafast.adapter_ids(model, ids):
        mixed = _logits(model, batch)
    torch.testing.assert_close(mixed[0], per_adapter["dora"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], per_adapter["plain"][2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], _logits(MODELS["llama"](), batch)[1], atol=1e-5, rtol=1e-5)  # the base
    # and back: lorafast's named DoRA adapter written again equals PEFT's file
    lorafast.save_adapter(model, tmp_path / "again", adapter_name="dora")
    again = lorafast.read_adapter(tmp_path / "again")[1]
    theirs = lorafast.read_adapter(tmp_path / "dora")[1]
    assert again.keys() == theirs.keys()
    for module, tensors in theirs.items():
        for key, value in tensors.items():
            torch.testing.assert_close(again[module][key], value)
