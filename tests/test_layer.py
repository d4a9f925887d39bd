"""FusedLoRALinear as a drop-in nn.Linear: construction, state_dict, merge/unmerge."""

import pytest
import torch
from torch import nn

from lorafast import FusedLoRALinear


def _trained(layer: FusedLoRALinear) -> FusedLoRALinear:
    """Give B non-zero values, as after some training."""
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
    return layer


def test_constructor_matches_linear_contract():
    layer = FusedLoRALinear(20, 30, r=4, alpha=8, dropout=0.1)
    assert layer.weight.shape == (30, 20) and layer.bias.shape == (30,)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (30, 4)
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert (layer.r, layer.scaling, layer.in_features, layer.out_features) == (4, 2.0, 20, 30)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert repr(layer) == "FusedLoRALinear(in_features=20, out_features=30, bias=True, r=4, alpha=8, dropout=0.1)"
    assert FusedLoRALinear(20, 30, bias=False).bias is None


def test_fresh_layer_equals_base_layer(backend):
    """B starts at zero, so before training the layer is exactly its base linear."""
    base = nn.Linear(24, 16)
    layer = FusedLoRALinear.from_linear(base, r=4)
    x = torch.randn(3, 7, 24)
    torch.testing.assert_close(layer(x), base(x), atol=1e-6, rtol=1e-6)


def test_from_linear_shares_and_freezes_the_weights():
    base = nn.Linear(24, 16)
    layer = FusedLoRALinear.from_linear(base, r=4, alpha=4, dropout=0.2)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.weight.data_ptr() == base.weight.data_ptr()
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert (layer.r, layer.scaling, layer.dropout) == (4, 1.0, 0.2)
    no_bias = FusedLoRALinear.from_linear(nn.Linear(8, 8, bias=False), r=2)
    assert no_bias.bias is None


@pytest.mark.parametrize(
    "dtype,adapter_dtype,expected",
    [
        (torch.float32, None, torch.float32),
        (torch.bfloat16, None, torch.float32),  # fp32 factors on a half-precision base, as PEFT
        (torch.float16, None, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    ],
)
def test_from_linear_adapter_dtype(dtype, adapter_dtype, expected):
    layer = FusedLoRALinear.from_linear(nn.Linear(8, 8, dtype=dtype), r=2, adapter_dtype=adapter_dtype)
    assert layer.lora_A.dtype == expected and layer.lora_B.dtype == expected and layer.weight.dtype == dtype


def test_state_dict_keys_and_base_checkpoint():
    base = nn.Linear(12, 10)
    layer = FusedLoRALinear(12, 10, r=2)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    lora_a = layer.lora_A.detach().clone()
    # A plain nn.Linear checkpoint loads unchanged (strict), the LoRA factors keep their values.
    result = layer.load_state_dict(base.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(layer.weight, base.weight) and torch.equal(layer.bias, base.bias)
    assert torch.equal(layer.lora_A, lora_a)
    # Inside a model: the lora keys of every layer may be missing, anything else may not.
    model = nn.Sequential(FusedLoRALinear(12, 10, r=2), nn.ReLU(), FusedLoRALinear(10, 4, r=2))
    plain = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))
    model.load_state_dict(plain.state_dict())
    assert torch.equal(model[2].weight, plain[2].weight)
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({k: v for k, v in plain.state_dict().items() if k != "2.bias"})


def test_full_state_dict_round_trip():
    src = _trained(FusedLoRALinear(12, 10, r=3))
    dst = FusedLoRALinear(12, 10, r=3)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(5, 12)
    torch.testing.assert_close(dst(x), src(x))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_merge_and_unmerge(backend, dtype, atol):
    torch.manual_seed(0)
    layer = _trained(FusedLoRALinear(40, 24, r=4, dtype=dtype)).eval()
    x = torch.randn(6, 40, dtype=dtype)
    before, w0 = layer(x), layer.weight.detach().clone()
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    torch.testing.assert_close(layer(x), before, atol=atol, rtol=atol)
    torch.testing.assert_close(
        layer.weight.float(), (w0.float() + layer.get_delta_weight().float()), atol=atol, rtol=atol
    )
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, atol=atol, rtol=atol)
    torch.testing.assert_close(layer(x), before, atol=atol, rtol=atol)


def test_delta_weight_is_scaled_ba():
    layer = _trained(FusedLoRALinear(8, 6, r=2, alpha=6))
    torch.testing.assert_close(layer.get_delta_weight(), 3.0 * layer.lora_B.detach() @ layer.lora_A.detach())


def test_merging_twice_warns_and_changes_nothing():
    layer = _trained(FusedLoRALinear(8, 6, r=2))
    layer.merge()
    merged_weight = layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.weight, merged_weight)
    layer.unmerge()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_training_a_merged_layer_raises():
    layer = _trained(FusedLoRALinear(8, 6, r=2))
    layer.merge()
    with pytest.raises(RuntimeError, match=r"merged.*call unmerge\(\)"):
        layer.train()(torch.randn(2, 8))
    with torch.no_grad():
        layer(torch.randn(2, 8))  # inference on a merged layer is fine
    layer.eval()(torch.randn(2, 8))


def test_module_conversions_keep_the_contract():
    layer = FusedLoRALinear(8, 6, r=2).to(torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.lora_A.dtype == torch.float64
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad
    out = layer(torch.randn(3, 8, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_only_lora_factors_receive_gradients(backend):
    layer = _trained(FusedLoRALinear(16, 12, r=2))
    layer(torch.randn(4, 16)).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_autocast_runs_in_the_autocast_dtype(backend):
    layer = _trained(FusedLoRALinear(16, 12, r=2))
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32  # the fp32 parameters get fp32 gradients
    want = FusedLoRALinear.from_linear(nn.Linear(16, 12), r=2)
    want.load_state_dict({k: v.bfloat16() for k, v in layer.state_dict().items()}, assign=True)
    torch.testing.assert_close(y, want(x.bfloat16()), atol=1e-2, rtol=1e-2)
