"""LoRA over transformers' ``FP8Linear`` (e4m3 weight, ``weight_scale_inv`` per 128×128 block or per tensor),
dequantized per call by lorafast (:mod:`lorafast.bases.fp8`), checked against float64 math on the weights the test
dequantizes itself."""

import copy

import pytest
import torch
from torch import nn

import lorafast
from conftest import relative_error
from lorafast.layer import LoRALayer
from lorafast.profiling import saved_activation_bytes

fp8_module = pytest.importorskip("transformers.integrations.finegrained_fp8")
FP8Linear = fp8_module.FP8Linear
BLOCKS = [(128, 128), None]  # block-wise and per-tensor scales
VOCAB, R = 120, 4


def quantize_fp8(linear: nn.Linear, block: tuple[int, int] | None) -> FP8Linear:
    """An ``FP8Linear`` holding ``linear``'s weight in e4m3: each block's max |w| maps to 448."""
    out_features, in_features = linear.weight.shape
    fp8 = FP8Linear(in_features, out_features, block_size=block, has_bias=linear.bias is not None)
    w = linear.weight.detach().double()
    rows, cols = block or (out_features, in_features)
    scale = torch.empty(-(-out_features // rows), -(-in_features // cols), dtype=torch.float64)
    q = torch.empty_like(w)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols]
            scale[i, j] = tile.abs().max() / 448
            q[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols] = tile / scale[i, j]
    fp8.weight = nn.Parameter(q.to(torch.float8_e4m3fn), requires_grad=False)
    fp8.weight_scale_inv = nn.Parameter((scale if block else scale.reshape(())).float(), requires_grad=False)
    if linear.bias is not None:
        fp8.bias = nn.Parameter(linear.bias.detach().clone())
    return fp8


def dequantized(fp8: FP8Linear) -> torch.Tensor:
    """W0 ``(out, in)`` float64, block by block."""
    w = fp8.weight.double()
    scale = fp8.weight_scale_inv.double()
    if fp8.block_size is None:
        return w * scale
    rows, cols = fp8.block_size
    out = w.clone()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols] *= scale[i, j]
    return out


def fp8_llama(block, seed: int = 0) -> nn.Module:
    """A one-layer Llama (hidden 160, MLP 272: several 128-blocks, partial ones at the edges) whose seven
    projections are FP8Linear."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=160, intermediate_size=272, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantize_fp8(module, block))
    return model


class Float64LoRA(nn.Module):
    """``x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ`` in float64 on the test's own dequantized W0."""

    def __init__(self, fp8: FP8Linear, lora_A, lora_B, scaling):
        super().__init__()
        self.weight = dequantized(fp8)
        self.bias = None if fp8.bias is None else fp8.bias.detach().double()
        self.lora_A = nn.Parameter(lora_A.detach().double())
        self.lora_B = nn.Parameter(lora_B.detach().double())
        self.scaling = scaling

    def forward(self, x):
        y = x @ self.weight.T + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T
        return y if self.bias is None else y + self.bias


def reference_model(model: nn.Module, adapter: str | None = None) -> nn.Module:
    """``model`` (lorafast LoRA on FP8 bases; named ``adapter`` of its MultiLoRALinear layers) as float64 math: every
    LoRA layer a :class:`Float64LoRA`."""
    ref = copy.deepcopy(model)
    for name, layer in list(lorafast.lora_layers(ref, LoRALayer)):
        parent, _, child = name.rpartition(".")
        lora_A, lora_B, *_ = layer.factors(adapter)
        lora = Float64LoRA(layer.base_layer, lora_A, lora_B, layer.adapter_scaling(adapter))
        setattr(ref.get_submodule(parent), child, lora)
    return ref.double()


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 6), generator=g)
    return {"input_ids": ids, "labels": ids}


def lora_model(block) -> nn.Module:
    model = lorafast.apply_lora(fp8_llama(block), "all-linear", r=R, alpha=8)
    g = torch.Generator().manual_seed(1)
    for _, layer in lorafast.lora_layers(model):
        layer.lora_B.data.normal_(0, 0.05, generator=g)  # B not zero: every factor gets a gradient
    return model


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("block", BLOCKS, ids=["block128", "per_tensor"])
def test_fp8_llama_logits_and_gradients_match_float64(backend, block):
    model = lora_model(block)
    layers = dict(lorafast.lora_layers(model))
    assert len(layers) == 7 and all(isinstance(m.base_layer, FP8Linear) for m in layers.values())
    ref = reference_model(model)
    out, want = model(**batch()), ref(**batch())
    out.loss.backward()
    want.loss.backward()
    assert relative_error(out.logits, want.logits) < 1e-5
    grads, want_grads = lora_grads(model), lora_grads(ref)
    assert grads.keys() == want_grads.keys() and len(grads) == 14
    for name, grad in grads.items():
        assert relative_error(grad, want_grads[name]) < 1e-5, name
    assert all(m.base_layer.weight.dtype == torch.float8_e4m3fn for m in layers.values())  # W0 only read


@pytest.mark.parametrize("block", BLOCKS, ids=["block128", "per_tensor"])
def test_saved_for_backward_is_x_and_xa(block):
    torch.manual_seed(0)
    lora = lorafast.FusedLoRALinear.from_linear(quantize_fp8(nn.Linear(160, 272), block), r=R)
    x = torch.randn(24, 160, requires_grad=True)
    saved = saved_activation_bytes(lambda: lora(x), exclude=list(lora.parameters()))
    assert saved <= (x.numel() + 24 * R) * 4  # |x| + n·r floats: no dequantized W0 (272·160 floats) kept


@pytest.mark.parametrize("block", BLOCKS, ids=["block128", "per_tensor"])
def test_merge_lora_dense_writes_the_dequantized_merged_weight(block):
    model = lora_model(block)
    want = {n: dequantized(m.base_layer) + m.scaling * m.lora_B.double() @ m.lora_A.double()
            for n, m in lorafast.lora_layers(model)}  # fmt: skip
    lorafast.merge_lora_dense(model, dtype=torch.float32)
    for name, weight in want.items():
        dense = model.get_submodule(name)
        assert type(dense) is nn.Linear and dense.weight.dtype == torch.float32
        assert relative_error(dense.weight, weight) < 1e-6, name


@pytest.mark.parametrize("block", BLOCKS, ids=["block128", "per_tensor"])
def test_merge_requantizes_into_the_fp8_base(block):
    model = lora_model(block)
    name, layer = next(iter(lorafast.lora_layers(model)))
    want = dequantized(layer.base_layer) + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    with pytest.warns(UserWarning, match="re-quantizes"):
        lorafast.merge_lora(model)
    merged = model.get_submodule(name)
    assert isinstance(merged, FP8Linear) and merged.weight.dtype == torch.float8_e4m3fn
    assert merged.weight_scale_inv.shape == (() if block is None else (2, 2))
    assert relative_error(dequantized(merged), want) < 0.05  # e4m3 keeps 3 mantissa bits


def test_adapter_trained_on_fp8_loads_in_peft_over_the_same_base(tmp_path):
    """PEFT wraps FP8Linear as a plain ``lora.Linear``; its own forward calls FP8Linear's, which needs a GPU FP8
    kernel, so the loaded adapter runs through patch_peft (lorafast over the same FP8 base) on the CPU."""
    from peft import PeftModel

    model = lora_model((128, 128))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        model(**batch()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    lorafast.save_adapter(model, tmp_path / "adapter", task_type="CAUSAL_LM")
    peft_model = PeftModel.from_pretrained(fp8_llama((128, 128)), tmp_path / "adapter")
    for name, layer in lorafast.lora_layers(model):
        peft_layer = peft_model.base_model.model.get_submodule(name)
        assert isinstance(peft_layer.get_base_layer(), FP8Linear)
        assert torch.equal(peft_layer.lora_A["default"].weight, layer.lora_A)
        assert torch.equal(peft_layer.lora_B["default"].weight, layer.lora_B)
    lorafast.patch_peft(peft_model)
    assert lorafast.peft_patch.patched_layer_count(peft_model) == 7
    with torch.no_grad():
        assert relative_error(peft_model(**batch(3)).logits, model(**batch(3)).logits) < 1e-6


def test_named_adapters_on_fp8_alone_and_in_one_mixed_batch():
    model = fp8_llama((128, 128))
    lorafast.add_adapter(model, "a", "all-linear", r=R, alpha=8)
    lorafast.add_adapter(model, "b", "all-linear", r=2, alpha=6)
    g = torch.Generator().manual_seed(2)
    for _, layer in lorafast.multi_lora_layers(model):
        assert isinstance(layer.base_layer, FP8Linear)
        for name in ("a", "b"):
            layer.lora_B[name].data.normal_(0, 0.05, generator=g)
    inputs = batch(4)["input_ids"]
    want = {name: reference_model(model, name)(input_ids=inputs).logits for name in ("a", "b")}
    with torch.no_grad():
        for name in ("a", "b"):
            lorafast.set_adapter(model, name)
            assert relative_error(model(input_ids=inputs).logits, want[name]) < 1e-5, name
        with lorafast.adapter_ids(model, ["b", "a"]):
            mixed = model(input_ids=inputs).logits
    assert relative_error(mixed[0], want["b"][0]) < 1e-5 and relative_error(mixed[1], want["a"][1]) < 1e-5
