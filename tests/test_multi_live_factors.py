"""A mixed-adapter batch reads the adapters' current values, whatever path wrote them.

Central differences taken through ``p.data[i] = v`` equal autograd's gradients; after ``.data.copy_``, ``param.data =
t``, ``load_state_dict`` or an optimizer step a model gives what a model built with those values gives; the Triton
path's table of factor pointers is rebuilt only when a pointer changes; GPT-2's Conv1D and ``adapter_dtype`` work
with named adapters.
"""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel
from tiny_models import lm_batch, peft_saved_adapters, tiny_gpt2

import lorafast.kernels.multi_factors as multi_factors
from conftest import assert_close_scaled, reference_lora
from lorafast import (
    MultiLoRALinear,
    adapter_ids,
    add_adapter,
    list_adapters,
    load_adapter,
    multi_lora_layers,
    remove_adapter,
    save_adapter,
    set_adapter,
)

IDS = ["b", None, "a", "c", "b"]  # sequence i's adapter


def _model(dtype=torch.float32, dropout=(0.2, 0.1, 0.0), seed=0):
    """Two MultiLoRALinear layers with adapters a, b, c of ranks 2, 3, 1, every factor random."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5)).to(dtype)
    for name, r, p in zip("abc", (2, 3, 1), dropout):
        add_adapter(model, name, r=r, alpha=2 * r + 1, dropout=p, target_modules=["0", "2"])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in _factors(model):
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    return model


def _factors(model):
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]


def _loss(model, x, seed=5):
    """A mixed training batch (dropout drawn from ``seed``), reduced to a number that depends on every output."""
    torch.manual_seed(seed)
    with adapter_ids(model, IDS):
        y = model(x)
    return (y * torch.linspace(-1.0, 2.0, y.numel(), dtype=y.dtype).view(y.shape)).sum() + y.square().sum()


def test_central_differences_through_data_writes_equal_autograd_for_every_adapter(monkeypatch):
    monkeypatch.setenv("LORAFAST_BACKEND", "torch")
    model = _model(torch.float64).train()
    x = torch.randn(5, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _loss(model, x).backward()
    step = 1e-5
    for name, p in _factors(model):
        numeric = torch.empty_like(p)
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            value = flat[i].item()
            p.data.view(-1)[i] = value + step  # as a user would, behind autograd's back
            plus = _loss(model, x).item()
            p.data.view(-1)[i] = value - step
            minus = _loss(model, x).item()
            p.data.view(-1)[i] = value
            numeric.view(-1)[i] = (plus - minus) / (2 * step)
        assert p.grad.norm() > 0.01, name  # every adapter has rows: its gradient is not zero
        error = (numeric - p.grad).norm() / p.grad.norm()
        assert error <= 1e-6, f"{name}: central differences {numeric} vs autograd {p.grad} (relative {error:.2e})"


def _write(how, model, values):
    """Put ``values`` ``{name: tensor}`` into ``model``'s factors the way ``how`` says."""
    params = dict(model.named_parameters())
    if how == "load_state_dict":
        model.load_state_dict(values, strict=False)
    for name, value in values.items():
        if how == "data_copy":
            params[name].data.copy_(value)
        elif how == "data_assign":  # a new storage, in another memory layout
            params[name].data = value.t().contiguous().t() if value.dim() == 2 else value.clone()
        elif how == "data_index":
            for i in range(value.shape[0]):
                params[name].data[i] = value[i]


@pytest.mark.parametrize("how", ["data_copy", "data_assign", "data_index", "load_state_dict", "optimizer_step"])
def test_writes_to_the_factors_are_seen_by_the_next_call(backend, how):
    x = torch.randn(5, 3, 6, generator=torch.Generator().manual_seed(4))
    model = _model().train()
    for _ in range(2):  # forward and backward ran: whatever a layer keeps between calls was made
        _loss(model, x).backward()
    if how == "optimizer_step":
        torch.optim.SGD([p for _, p in _factors(model)], lr=0.1).step()
        values = {n: p.detach().clone() for n, p in _factors(model)}
    else:
        g = torch.Generator().manual_seed(9)
        values = {n: torch.randn(p.shape, generator=g) for n, p in _factors(model)}
        _write(how, model, values)
    fresh = _model()  # built with the new values from the start
    with torch.no_grad():
        for name, p in _factors(fresh):
            p.copy_(values[name])
    for m in (model, fresh):
        m.zero_grad()
        _loss(m, x).backward()
    for (name, p), (_, q) in zip(_factors(model), _factors(fresh)):
        torch.testing.assert_close(p, q)
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)
    with torch.no_grad(), adapter_ids(model, IDS), adapter_ids(fresh, IDS):
        torch.testing.assert_close(model.eval()(x), fresh.eval()(x), atol=1e-6, rtol=1e-6)


def test_triton_factor_table_is_rebuilt_only_when_a_pointer_changes(monkeypatch):
    monkeypatch.setenv("LORAFAST_BACKEND", "triton")
    monkeypatch.setattr(multi_factors, "_tables", {})  # none kept from other tests (their storages may be reused)
    builds = []
    original = multi_factors._device_table
    monkeypatch.setattr(
        multi_factors, "_device_table", lambda v, shape, d: builds.append(shape) or original(v, shape, d)
    )
    factor_builds = lambda: sum(shape[1] == multi_factors.TABLE_WIDTH for shape in builds)
    model = _model(dropout=(0.0, 0.0, 0.0))
    layer = model[0]
    x = torch.randn(5, 6)
    optimizer = torch.optim.SGD([p for _, p in _factors(model)], lr=0.05)
    with adapter_ids(model, [1, -1, 0, 2, 1]):
        for _ in range(2):  # forward and backward twice: one table per layer
            model(x).square().mean().backward()
        assert factor_builds() == 2
        table = multi_factors.adapter_factors(layer.lora_A.values(), layer.lora_B.values()).table
        pointers = [(a.data_ptr(), b.data_ptr()) for a, b in zip(layer.lora_A.values(), layer.lora_B.values())]
        assert table[:, [multi_factors.A_COL, multi_factors.B_COL]].tolist() == [list(p) for p in pointers]
        assert table[:, multi_factors.RANK_COL].tolist() == [2, 3, 1]
        optimizer.step()  # in place: same pointers, new values
        model.load_state_dict({k: v + 0.1 for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
        with torch.no_grad():
            layer.lora_B["c"].data.mul_(2.0)
        torch.testing.assert_close(layer(x), _layer_reference(layer, x, [1, -1, 0, 2, 1]))
        assert factor_builds() == 2
        layer.lora_A["a"].data = layer.lora_A["a"].data.clone()  # a new storage: a new table for this layer
        torch.testing.assert_close(layer(x), _layer_reference(layer, x, [1, -1, 0, 2, 1]))
        assert factor_builds() == 3
        model[0].add_adapter("d", r=4)  # another set of adapters
        with torch.no_grad():
            layer.lora_B["d"].normal_()
        torch.testing.assert_close(layer(x), _layer_reference(layer, x, [1, -1, 0, 2, 1]))
        assert factor_builds() == 4


def _layer_reference(layer, x, ids):
    """Row i through adapter ids[i] by plain autograd from the layer's current Parameters (−1: the base layer)."""
    rows = []
    for i, k in enumerate(ids):
        if k < 0:
            rows.append(x[i] @ layer.weight.T + layer.bias)
        else:
            name = layer.adapter_names[k]
            lora = (layer.lora_A[name], layer.lora_B[name], layer.scaling(name))
            rows.append(reference_lora(x[i : i + 1], layer.weight, layer.bias, *lora)[0])
    return torch.stack(rows)


def test_triton_gradients_are_each_adapters_own_and_deterministic(monkeypatch):
    """Each adapter's gradient has its own shape and dtype (no padding), equals the PyTorch path's, and two runs of
    the same batch give the same bits."""
    x = torch.randn(5, 3, 6, generator=torch.Generator().manual_seed(6))
    grads = {}
    for backend in ("torch", "triton", "triton"):
        monkeypatch.setenv("LORAFAST_BACKEND", backend)
        model = _model(dropout=(0.0, 0.0, 0.0)).train()
        _loss(model, x).backward()
        grads.setdefault(backend, []).append({n: p.grad.clone() for n, p in _factors(model)})
        assert all(p.grad.shape == p.shape and p.grad.dtype == p.dtype for _, p in _factors(model))
    first, second = grads["triton"]
    for name, grad in first.items():
        assert torch.equal(grad, second[name]), name
        assert_close_scaled(grad, grads["torch"][0][name])


@pytest.mark.parametrize("adapter_dtype", [None, torch.float32])
def test_adapter_dtype_fp32_factors_on_a_bf16_base_in_a_mixed_batch(backend, adapter_dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 8)).to(torch.bfloat16)
    for name, r in (("a", 2), ("b", 4)):
        add_adapter(model, name, r=r, target_modules=["0", "2"], adapter_dtype=adapter_dtype)
    layer = model[0]
    assert all(p.dtype == torch.float32 for _, p in _factors(model))  # None: fp32 on a half-precision base, as PEFT
    with torch.no_grad():
        for name in ("a", "b"):
            layer.lora_B[name].normal_()
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    ids = [1, -1, 0, 1]
    with adapter_ids(model, ids):
        y = layer(x)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.lora_A["a"].grad.dtype == torch.float32
    want = _layer_reference_fp32(layer, x, ids)
    assert_close_scaled(y, want, torch.bfloat16)


def _layer_reference_fp32(layer, x, ids):
    with torch.no_grad():
        rows = []
        for i, k in enumerate(ids):
            w, b = layer.weight.float(), layer.bias.float()
            if k < 0:
                rows.append(x[i].float() @ w.T + b)
            else:
                name = layer.adapter_names[k]
                a, bb = layer.lora_A[name], layer.lora_B[name]
                rows.append(reference_lora(x[i : i + 1].float(), w, b, a, bb, layer.scaling(name))[0])
        return torch.stack(rows)


def test_adapters_of_different_dtypes_in_one_layer_are_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(6, 4))
    add_adapter(model, "a", target_modules=["0"], r=2)
    add_adapter(model, "b", target_modules=["0"], r=2, adapter_dtype=torch.float64)
    with pytest.raises(ValueError, match="share one floating dtype"), adapter_ids(model, [0, 1]):
        model(torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"adapter_dtype must be a floating torch\.dtype"):
        add_adapter(model, "c", target_modules=["0"], adapter_dtype=torch.int8)
    assert list_adapters(model) == ["a", "b"]


def _peft_gpt2_dirs(tmp_path):
    """Two GPT-2 adapters on the Conv1D projections, random factors, saved by PEFT itself."""
    configs = {
        name: LoraConfig(r=r, lora_alpha=2 * r, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
        for name, r in (("first", 4), ("second", 2))
    }
    return peft_saved_adapters(tmp_path, tiny_gpt2, configs, seed=20)


def test_gpt2_conv1d_peft_adapters_load_as_named_adapters_and_mix(backend, tmp_path):
    from transformers.pytorch_utils import Conv1D

    dirs = _peft_gpt2_dirs(tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_gpt2(), dirs["first"], adapter_name="first")
    peft_model.load_adapter(dirs["second"], adapter_name="second")
    peft_model.eval()
    model = tiny_gpt2().eval()
    for name, directory in dirs.items():
        load_adapter(model, directory, adapter_name=name)
    layers = dict(multi_lora_layers(model))
    assert len(layers) == 6 and all(layer.fan_in_fan_out for layer in layers.values())  # c_attn, 2 c_proj × 2 blocks
    batch = {k: v for k, v in lm_batch("gpt2").items() if k != "labels"}
    names = ["second", "__base__", "first"]
    with torch.no_grad():
        for name in dirs:
            peft_model.set_adapter(name)
            set_adapter(model, name)
            torch.testing.assert_close(model(**batch).logits, peft_model(**batch).logits, atol=1e-5, rtol=1e-5)
        want = peft_model(**batch, adapter_names=names).logits
        with adapter_ids(model, [None if n == "__base__" else n for n in names]):
            got = model(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # saved back as a named adapter: PEFT's Conv1D layout flag, and PEFT loads it to the same logits
    save_adapter(model, tmp_path / "again", adapter_name="second")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    again = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "again").eval()
    set_adapter(model, "second")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-5)
    for name in list(dirs):
        remove_adapter(model, name)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)


def test_add_adapter_on_gpt2_all_linear_trains_in_a_mixed_batch(backend):
    model = tiny_gpt2()
    add_adapter(model, "x", target_modules="all-linear", r=2)
    add_adapter(model, "y", target_modules="all-linear", r=3)
    layers = dict(multi_lora_layers(model))
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"c_attn", "c_proj", "c_fc"}  # Conv1D; not the lm_head
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, MultiLoRALinear) and tuple(layer.weight.shape) == (32, 128)  # (in, out) kept
    batch = lm_batch("gpt2")
    with adapter_ids(model, ["y", "x", None]):
        model(**batch).loss.backward()
    # B starts at zero, so B's gradients are the non-zero ones; each adapter gets them from its own sequence only
    grads_b = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert len(grads_b) == 2 * len(layers) and all(g is not None and g.abs().sum() > 0 for g in grads_b.values())
