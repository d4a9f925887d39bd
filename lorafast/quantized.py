"""LoRA over quantized linears (the kinds of :mod:`lorafast.bases`): bitsandbytes' ``Linear4bit`` (NF4/FP4, double
quant or not) and ``Linear8bitLt`` (QLoRA), transformers' ``FP8Linear``.

Each forward dequantizes W0 (the kind's own function) into a transient dense buffer in the compute dtype and runs
lorafast's LoRA linear on it; backward dequantizes again. Nothing dense of W0 is kept for backward (it
saves x and ``xa`` ``(n, r)`` only), and the quantized weight and its ``quant_state`` are only read.

Compute dtype: the autocast dtype under ``torch.autocast``, else a ``Linear4bit``'s ``compute_dtype`` (x's dtype if
unset), else x's dtype; the output has x's dtype, as bitsandbytes' layers return. 8-bit: see
:mod:`lorafast.bases.bnb8` for how its W0 differs from bitsandbytes' CUDA int8 matmul.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from . import dora
from .backend import front_door
from .bases import check_quantized, compute_dtype, dequantize_weight, is_quantized_linear, requantize
from .function import LoRALinearFunction
from .layer import FusedLoRALinear, _scaled_product, default_adapter_dtype
from .multi_layer import MultiLoRALinear
from .row_adapters import active_row_adapters
from .validation import autocast_dtype, check_rank, lora_inputs_check

_BASE = "base_layer"  # the quantized module's name inside QuantizedLoRALinear (hidden from state_dict keys)


def held_quantized_bases(model: nn.Module) -> set[int]:
    """``id()`` of the bitsandbytes modules that lorafast's QLoRA layers of ``model`` hold as ``base_layer``."""
    kinds = (QuantizedLoRALinear, QuantizedMultiLoRALinear)
    return {id(m.base_layer) for m in model.modules() if isinstance(m, kinds)}


def note_trainable_adapters(model: nn.Module) -> None:
    """After LoRA layers were put over ``model``'s quantized linears: transformers' ``Trainer`` refuses a model whose
    ``is_quantized`` is set unless it is a ``PeftModel`` (a "purely quantized" base has nothing to train). That flag
    is read for that check alone, and lorafast's adapters are trainable, so it is cleared; the model's quantizer
    and its ``quantization_config`` stay."""
    if getattr(model, "is_quantized", False) and any(isinstance(m, QuantizedLoRALinear) for m in model.modules()):
        model.is_quantized = False


def quantized_lora_linear(
    x: torch.Tensor,
    module: nn.Module,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`lorafast.lora_linear` over a quantized linear ``module``'s (:mod:`lorafast.bases`) frozen W0 and bias;
    with a DoRA ``magnitude`` m ``(out,)``, :func:`lorafast.dora.dora_linear` over it (:func:`quantized_dora_linear`).

    x ``(..., in)`` -> ``(..., out)`` in x's dtype (the autocast dtype under ``torch.autocast``); lora_A ``(r, in)``,
    lora_B ``(out, r)``, m in any floating dtype (cast to the compute dtype, gradients in their own). W0 is
    dequantized into a transient buffer per call and again in backward (never kept). ValueError as lora_linear's
    (and dora_linear's), and for a module that is not a quantized linear.
    """
    if not is_quantized_linear(module):
        raise ValueError(f"expects a bitsandbytes Linear4bit/Linear8bitLt or an FP8Linear, got {type(module)}")
    if magnitude is not None:
        dora.check_magnitude(magnitude, module.out_features, x)
    dtype = compute_dtype(module, x)
    under_autocast = autocast_dtype(x) is not None
    reload = functools.partial(dequantize_weight, module, dtype)

    def run(tensors, p, backend, seed):
        if magnitude is None:  # the factors as given: the Function casts them itself (no cast copy kept)
            return LoRALinearFunction.apply(*tensors[:3], lora_A, lora_B, float(scaling), p, seed, backend, reload)
        # fp64 (references): the norms of the fp64 weight of this call, not the cached fp32 ones
        base_sq = quantized_row_norms_sq(module) if dtype != torch.float64 else None
        return dora.ReloadedWeightDoRALinearFunction.apply(
            *tensors, magnitude, float(scaling), p, seed, backend, base_sq, reload
        )

    bias = module.bias
    with torch.autocast(device_type=x.device.type, enabled=False) if under_autocast else contextlib.nullcontext():
        # differentiable casts: the gradients arrive in A's and B's dtype
        tensors = x.to(dtype), reload(), None if bias is None else bias.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
        y = front_door(*tensors, lora_inputs_check(scaling, dropout_p, training), run)
    return y.to(dtype if under_autocast else x.dtype)


def quantized_row_norms_sq(module: nn.Module) -> torch.Tensor:
    """``‖W0‖²`` per row ``(out,)`` fp32 of a quantized module's dequantized W0, cached per quantized weight (its
    Parameter's storage and version: a merge, which re-quantizes, or a device move invalidates it)."""
    return dora.base_row_norms_sq(module.weight, lambda: dequantize_weight(module, torch.float32))


def quantized_dora_linear(x, module, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, training=False) -> torch.Tensor:
    """DoRA over a quantized ``module``: ``y = g ⊙ (x·W0ᵀ + s·drop(x)·Aᵀ·Bᵀ) + b``, ``g = m / ‖W0 + s·B·A‖_row``
    (detached; ``‖W0‖²_row`` cached per quantized weight). As :func:`quantized_lora_linear` with ``magnitude``."""
    return quantized_lora_linear(x, module, lora_A, lora_B, scaling, dropout_p, training, magnitude)


class QuantizedLoRALinear(FusedLoRALinear, over_quantized=True):
    """``FusedLoRALinear`` over a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` (QLoRA).

    The quantized module is kept as ``base_layer`` (its ``.to()``/device moves stay bitsandbytes'), yet the
    state_dict keys are the quantized linear's own (``weight``, ``weight.absmax``, ..., ``bias``) plus ``lora_A``
    ``(r, in)`` and ``lora_B`` ``(out, r)``, so a quantized checkpoint loads unchanged. Factors default to fp32.
    ``merge()`` re-quantizes W0 + scaling·B·A as PEFT does (lossy: warns); see :func:`merge_lora_dense` for a
    dense merge.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("build a QuantizedLoRALinear with QuantizedLoRALinear.from_linear(quantized_linear, ...)")

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        *,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        adapter_dtype: torch.dtype | None = None,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> QuantizedLoRALinear:
        """Wrap a bitsandbytes ``Linear4bit``/``Linear8bitLt`` (kept, not copied; frozen); ``use_rslora``: scaled by
        ``alpha / sqrt(r)``; ``use_dora``: DoRA (:func:`quantized_dora_linear`), its magnitude ``lora_magnitude``
        ``(out,)`` fp32 initialised as PEFT's to the row norms of the dequantized W0 (the module must be quantized
        already)."""
        if not is_quantized_linear(linear):
            raise ValueError(f"QuantizedLoRALinear wraps a bitsandbytes Linear4bit or Linear8bitLt, got {type(linear)}")
        check_rank(r, linear.in_features, linear.out_features)
        if use_dora is True:  # m is read off W0 now (a non-bool use_dora is refused by _init_lora)
            check_quantized(linear)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.base_layer = linear
        layer._init_lora(r, alpha, dropout, adapter_dtype, use_rslora, use_dora)
        linear.requires_grad_(False)  # after the checks above: a refused call leaves the module as it was
        _register_key_hooks(layer)
        layer.reset_lora_parameters()
        return layer

    @property
    def weight(self) -> nn.Parameter:
        """The quantized weight (bitsandbytes' ``Params4bit``/``Int8Params``, FP8's e4m3)."""
        return self.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:
        dense = self.__dict__.get("_dense")
        return self.base_layer.bias if dense is None else dense[1]

    def _factor_options(self, adapter_dtype: torch.dtype | None) -> dict:
        """New factors: on the base's device, ``adapter_dtype`` or fp32 (a quantized weight's dtype is storage)."""
        return {"device": self.base_layer.weight.device, "dtype": default_adapter_dtype(torch.float32, adapter_dtype)}

    def reset_parameters(self) -> None:
        """Re-initialise the LoRA factors (the quantized base is left as it is)."""
        self.reset_lora_parameters()

    def base_weight(self) -> torch.Tensor:
        """W0 ``(out, in)`` dequantized to fp32 (a new tensor); during a mixed batch's forward the W0 dequantized
        for it, in its compute dtype."""
        dense = self.__dict__.get("_dense")
        return dequantize_weight(self.base_layer, torch.float32) if dense is None else dense[0]

    def _in_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``(..., in_features)`` -> ``(..., out_features)`` in x's dtype (see :func:`quantized_lora_linear`)."""
        if self.merged:
            return self.base_layer(x)
        return quantized_lora_linear(x, self.base_layer, self.lora_A, self.lora_B, self.scaling, self.dropout,
                                     self.training, self.lora_magnitude)  # fmt: skip

    @torch.no_grad()
    def _write_weight(self, merged: torch.Tensor | None = None, delta: torch.Tensor | None = None) -> None:
        """Re-quantize ``merged`` (or ``W0 + delta``) into the base layer, as PEFT merges into a quantized base
        (lossy, warns): ``merge()``/``unmerge()`` are ``FusedLoRALinear``'s."""
        requantize(self.base_layer, delta, merged)

    def adapter_to_merge(self) -> tuple | None:
        """``(lora_A, lora_B, scaling, magnitude or None)`` of the adapter, None once merged (nothing left to add)."""
        return None if self.merged else (self.lora_A, self.lora_B, self.scaling, self.lora_magnitude)

    def to_base_layer(self, merge: bool = False) -> nn.Module:
        """The quantized module, the adapter (the active one) re-quantized into it (``merge``, lossy) or not."""
        self._set_merged(merge)
        return self.base_layer.train(self.training)


class QuantizedMultiLoRALinear(MultiLoRALinear, over_quantized=True):
    """``MultiLoRALinear`` (named adapters, mixed batches) over a bitsandbytes ``Linear4bit``/``Linear8bitLt``.

    As :class:`QuantizedLoRALinear`: the quantized module is ``base_layer`` under the quantized linear's own
    state_dict keys, factors are fp32, one active adapter runs :func:`quantized_lora_linear` (a DoRA one
    :func:`quantized_dora_linear`). A mixed batch (``adapter_ids``) runs ``multi_lora_linear`` (and DoRA rows' column
    scale) on a dequantized W0 that it keeps until backward.
    """

    @classmethod
    def from_linear(cls, linear: nn.Module) -> QuantizedMultiLoRALinear:
        """Wrap a bitsandbytes ``Linear4bit``/``Linear8bitLt`` (kept, not copied; frozen), with no adapter yet."""
        if not is_quantized_linear(linear):
            raise ValueError(
                f"QuantizedMultiLoRALinear wraps a bitsandbytes Linear4bit or Linear8bitLt, got {type(linear)}"
            )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_from(linear)
        del layer.weight, layer.bias  # adopted by _init_from; they stay the bitsandbytes layer's own
        layer.base_layer = linear.requires_grad_(False)
        _register_key_hooks(layer)
        return layer

    weight = QuantizedLoRALinear.weight
    bias = QuantizedLoRALinear.bias
    base_weight = QuantizedLoRALinear.base_weight
    _in_weight_layout = QuantizedLoRALinear._in_weight_layout
    _write_weight = QuantizedLoRALinear._write_weight
    _factor_options = QuantizedLoRALinear._factor_options
    to_base_layer = QuantizedLoRALinear.to_base_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``(..., in_features)`` -> ``(..., out_features)`` in x's dtype."""
        if active_row_adapters(self) is None and self._layer_row_adapters is None:
            if self.active_adapter is None:
                return self.base_layer(x)
            name = self.active_adapter
            lora_A, lora_B, _, _, dropout = self.factors(name)
            return quantized_lora_linear(x, self.base_layer, lora_A, lora_B, self.scaling(name), dropout,
                                         self.training, self.magnitude(name))  # fmt: skip
        dtype = compute_dtype(self.base_layer, x)
        factors_dtype = next(iter(self.lora_A.values())).dtype if self.lora_A else dtype
        # fp32 factors on a half-precision compute dtype: autocast stacks them in that dtype once, as it does for
        # a dense base
        cast = torch.autocast(x.device.type, dtype=dtype) if factors_dtype != dtype else contextlib.nullcontext()
        out_dtype = x.dtype if autocast_dtype(x) is None else dtype
        with _dense_base(self, dtype), cast:
            return super().forward(x.to(dtype)).to(out_dtype)

    def adapter_to_merge(self) -> tuple | None:
        """``(lora_A, lora_B, scaling, magnitude or None)`` of the active adapter, None with no active adapter."""
        name = self.active_adapter
        if name is None:
            return None
        lora_A, lora_B, *_ = self.factors(name)
        return lora_A, lora_B, self.scaling(name), self.magnitude(name)


@contextlib.contextmanager
def _dense_base(layer: QuantizedMultiLoRALinear, dtype: torch.dtype):
    """While the block runs, ``layer.base_weight()``/``layer.bias`` are W0 dequantized to ``dtype`` and the bias in
    it (dequantized once per call)."""
    bias = layer.base_layer.bias
    layer._dense = (dequantize_weight(layer.base_layer, dtype), None if bias is None else bias.to(dtype))
    try:
        yield
    finally:
        del layer._dense


def _register_key_hooks(layer: nn.Module) -> None:
    layer.register_state_dict_post_hook(_base_keys_as_own)
    layer.register_load_state_dict_pre_hook(_own_keys_to_base)
    layer.register_load_state_dict_post_hook(_reported_keys_as_own)


def _base_keys_as_own(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: ``<prefix>base_layer.<key>`` -> ``<prefix><key>``."""
    inner = prefix + _BASE + "."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _own_keys_to_base(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: the quantized linear's keys go to ``base_layer``; the factors stay."""
    module._load_prefix = prefix
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if rest.split(".", 1)[0] not in ("lora_A", "lora_B", _BASE):
            state_dict[prefix + _BASE + "." + rest] = state_dict.pop(key)


def _reported_keys_as_own(module: nn.Module, incompatible_keys) -> None:
    """load_state_dict post-hook: missing/unexpected keys of ``base_layer`` reported under the layer's own names."""
    inner = getattr(module, "_load_prefix", "") + _BASE + "."
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [k.replace(inner, inner[: -len(_BASE) - 1], 1) if k.startswith(inner) else k for k in keys]


def merged_weight(weight: torch.Tensor, adapter: tuple | None) -> torch.Tensor:
    """fp32 ``weight`` ``(out, in)`` with ``adapter`` = ``(lora_A, lora_B, scaling, magnitude or None)`` merged as
    PEFT merges: ``W0 + s·B·A``, DoRA ``g·(W0 + s·B·A)`` (``weight`` itself is updated for plain LoRA)."""
    if adapter is None:
        return weight
    lora_A, lora_B, scaling, magnitude = adapter
    if magnitude is not None:
        return dora.merged_weight(weight, lora_A, lora_B, magnitude, scaling)[0]
    return weight.add_(_scaled_product(lora_A, lora_B, scaling))


__all__ = [
    "QuantizedLoRALinear",
    "QuantizedMultiLoRALinear",
    "compute_dtype",
    "dequantize_weight",
    "is_quantized_linear",
    "merged_weight",
    "quantized_dora_linear",
    "quantized_lora_linear",
]
