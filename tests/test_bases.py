"""One layer class over every kind of frozen base (:mod:`lorafast.bases`): ``nn.Linear``, GPT-2's ``Conv1D``,
bitsandbytes 4-bit and 8-bit, transformers' FP8. The same ``FusedLoRALinear``/``MultiLoRALinear`` class holds each,
shows the base's own state_dict keys, round-trips its state_dict strictly (DoRA included), gives the very module
back, and with ``lora_B = 0`` computes what the base computes."""

import copy
import importlib.util

import pytest
import torch
from test_fp8 import dequantized, quantize_fp8
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorafast
from lorafast import FusedLoRALinear, MultiLoRALinear

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
KINDS = ["dense", "conv1d", "fp8", *(["nf4", "int8"] if HAS_BNB else [])]
D_IN, D_OUT, R = 96, 64, 4  # out a multiple of 64: bitsandbytes' CPU 4-bit kernel needs it


def make_base(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    dense = nn.Linear(D_IN, D_OUT)
    if kind == "dense":
        return dense
    if kind == "conv1d":
        conv = Conv1D(D_OUT, D_IN)
        conv.load_state_dict({"weight": dense.weight.t(), "bias": dense.bias})
        return conv
    if kind == "fp8":
        return quantize_fp8(dense, (32, 32))
    import bitsandbytes as bnb

    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(D_IN, D_OUT, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(D_IN, D_OUT, compute_dtype=torch.float32, quant_type=kind)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")


def base_output(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the base computes, in float64: FP8 from the test's own dequantization (its forward needs a GPU kernel),
    4-bit from bitsandbytes' ``dequantize_4bit`` (its CPU matmul needs shapes this one lacks), 8-bit as CB·SCB/127
    (its own forward also rounds x to int8), else the module's own forward."""
    if isinstance(base, nn.Linear) and base.weight.dtype == torch.float8_e4m3fn:
        return x.double() @ dequantized(base).T + base.bias.double()
    if type(base).__name__ == "Linear4bit":
        from bitsandbytes.functional import dequantize_4bit

        return x.double() @ dequantize_4bit(base.weight.data, base.weight.quant_state).double().T + base.bias.double()
    if type(base).__name__ == "Linear8bitLt":
        scb = base.weight.SCB if getattr(base.weight, "SCB", None) is not None else base.state.SCB
        return x.double() @ (base.weight.double() * scb.double()[:, None] / 127).T + base.bias.double()
    with torch.no_grad():
        return base.eval()(x).double()


@pytest.mark.parametrize("kind", KINDS)
def test_one_layer_class_holds_every_base_kind(kind):
    base = make_base(kind)
    own_keys = set(base.state_dict())
    layer = FusedLoRALinear.from_linear(base, r=R)
    assert type(layer) is FusedLoRALinear and layer.base_layer is base
    assert (layer.in_features, layer.out_features) == (D_IN, D_OUT) and layer.fan_in_fan_out == (kind == "conv1d")
    assert set(layer.state_dict()) == own_keys | {"lora_A", "lora_B"}
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert layer.lora_A.dtype == torch.float32 and "\n" not in repr(layer)
    assert lorafast.QuantizedLoRALinear is FusedLoRALinear  # the QLoRA layer's earlier name
    multi = MultiLoRALinear.from_linear(make_base(kind))
    multi.add_adapter("a", r=R)
    assert type(multi) is MultiLoRALinear and set(multi.state_dict()) == own_keys | {"lora_A.a", "lora_B.a"}
    assert layer.to_base_layer() is base


@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_layer_computes_what_its_base_computes(kind):
    base = make_base(kind)
    x = torch.randn(5, D_IN)
    want = base_output(base, x)
    layer = FusedLoRALinear.from_linear(base, r=R).eval()
    with torch.no_grad():
        y = layer(x)
        nn.init.normal_(layer.lora_B)
        delta = layer(x).double() - y.double()
    tolerance = 1e-5
    torch.testing.assert_close(y.double(), want, rtol=tolerance, atol=tolerance)
    a, b = layer.lora_A.double(), layer.lora_B.double()
    torch.testing.assert_close(delta, layer.scaling * (x.double() @ a.T) @ b.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind, use_dora):
    """The layer's state_dict (the base's keys, the factors, DoRA's magnitude) loads into a layer over a second base
    of the same kind: the factors always, the base's keys as the bare base module takes them (a quantized
    ``Linear4bit`` refuses its own serialized state once quantized; then the same keys are reported, under the
    layer's names); where the base takes them, the layers compute the same."""
    layer = FusedLoRALinear.from_linear(make_base(kind), r=R, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_B.normal_()
        if use_dora:
            layer.lora_magnitude.mul_(1.5)
    state = copy.deepcopy(layer.state_dict())
    bare = make_base(kind, seed=1).load_state_dict(copy.deepcopy(layer.base_layer.state_dict()), strict=False)
    other = FusedLoRALinear.from_linear(make_base(kind, seed=1), r=R, use_dora=use_dora)
    result = other.load_state_dict(state, strict=False)
    assert sorted(result.unexpected_keys) == sorted(bare.unexpected_keys) and not result.missing_keys
    for name in ("lora_A", "lora_B", *(["lora_magnitude"] if use_dora else [])):
        assert torch.equal(getattr(other, name), getattr(layer, name)), name
    if not bare.unexpected_keys:
        x = torch.randn(5, D_IN)
        with torch.no_grad():
            torch.testing.assert_close(other.eval()(x), layer.eval()(x))


def test_a_module_of_no_kind_is_refused_by_name():
    for build in (lambda m: FusedLoRALinear.from_linear(m), MultiLoRALinear.from_linear):
        with pytest.raises(ValueError, match=r"from_linear expects an nn\.Linear, got Conv1d \(transformers' Conv1D"):
            build(nn.Conv1d(D_IN, D_OUT, 1))


def test_a_new_layer_draws_its_base_as_nn_linear_does():
    """``FusedLoRALinear(in, out)`` holds an ``nn.Linear`` drawn as ``nn.Linear(in, out)`` draws it, seed for seed."""
    torch.manual_seed(0)
    want = nn.Linear(D_IN, D_OUT)
    torch.manual_seed(0)
    layer = FusedLoRALinear(D_IN, D_OUT, r=R)
    assert type(layer.base_layer) is nn.Linear
    assert torch.equal(layer.weight, want.weight) and torch.equal(layer.bias, want.bias)
    torch.manual_seed(1)
    layer.reset_parameters()
    assert not torch.equal(layer.weight, want.weight) and torch.count_nonzero(layer.lora_B) == 0
