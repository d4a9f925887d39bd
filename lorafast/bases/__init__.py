"""Frozen bases a LoRA layer holds, one small module per kind behind this registry: ``nn.Linear`` (:mod:`.dense`),
transformers' ``Conv1D`` (:mod:`.conv1d`), read in place; bitsandbytes 4-bit (:mod:`.bnb4`) and 8-bit
(:mod:`.bnb8`) and transformers' FP8 (:mod:`.fp8`), dequantized per call.

Every kind has ``recognises(module)``. A kind read in place has ``weight_view(module)`` (W0 ``(out, in)``, a view)
and ``in_layout(module, delta)`` (an ``(out, in)`` tensor as its weight is stored), and ``features(module)`` when
its weight is not ``(out, in)``. A quantized kind has ``check_ready(module)`` (ValueError while there is nothing
to dequantize yet), ``dequantize(module, dtype)`` (W0 ``(out, in)`` as a new dense tensor, never kept),
``requantize(module, merged)`` (replace the stored weight by the quantization of the fp32 ``(out, in)``
``merged``) and optionally ``compute_dtype(module)`` (the module's own preference, or None). Adding a kind is one
file plus its entry in :data:`KINDS`. The layers (:mod:`lorafast.layer`) use only the functions below.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..validation import autocast_dtype
from . import bnb4, bnb8, conv1d, dense, fp8

QUANTIZED = (bnb4, bnb8, fp8)
# name -> kind, in the order they are asked (bitsandbytes' and FP8's linears are nn.Linear subclasses)
KINDS = {kind.__name__.rpartition(".")[2]: kind for kind in (*QUANTIZED, conv1d, dense)}


def kind_name(module: nn.Module) -> str | None:
    """The name in :data:`KINDS` of the kind that recognises ``module``, None for any other module."""
    return next((name for name, kind in KINDS.items() if kind.recognises(module)), None)


def kind_of(module: nn.Module, name: str | None = None):
    """The kind of ``module`` (``name``: its known :func:`kind_name`); ValueError for a module of no kind."""
    name = name or kind_name(module)
    if name is None:
        raise ValueError(
            f"lorafast adds LoRA to nn.Linear, transformers' Conv1D and FP8Linear, and bitsandbytes' Linear4bit and "
            f"Linear8bitLt layers, got {type(module).__name__}"
        )
    return KINDS[name]


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized linear lorafast dequantizes per call: a bitsandbytes ``Linear4bit`` (or
    subclass: ``LinearNF4``, ``LinearFP4``) or ``Linear8bitLt``, or transformers' ``FP8Linear``."""
    return any(kind.recognises(module) for kind in QUANTIZED)


def _quantized(module: nn.Module, name: str | None = None):
    kind = kind_of(module, name)
    if kind not in QUANTIZED:
        raise ValueError(
            "expected a bitsandbytes Linear4bit or Linear8bitLt or a transformers FP8Linear, "
            f"got {type(module).__name__}"
        )
    return kind


def check_quantized(module: nn.Module) -> None:
    """ValueError unless ``module`` is a quantized linear whose weight is quantized already (bitsandbytes quantizes
    when the module is moved to a device, or transformers when it loads)."""
    _quantized(module).check_ready(module)


def features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a base of any kind."""
    own = getattr(kind_of(module), "features", None)
    return own(module) if own else (module.in_features, module.out_features)


@torch.no_grad()
def dequantize_weight(module: nn.Module, dtype: torch.dtype, name: str | None = None) -> torch.Tensor:
    """W0 ``(out, in)`` of a quantized linear as a new dense tensor in ``dtype`` (``name``: its kind's, if known)."""
    return _quantized(module, name).dequantize(module, dtype)


def base_weight(module: nn.Module, name: str | None = None) -> torch.Tensor:
    """W0 ``(out, in)`` of a base of any kind (``name``: its kind's): the weight itself or a view of it, or for a
    quantized base a new fp32 tensor."""
    kind = kind_of(module, name)
    return dequantize_weight(module, torch.float32, name) if kind in QUANTIZED else kind.weight_view(module)


def adapter_dtype_basis(module: nn.Module) -> torch.dtype:
    """The dtype new factors follow by default (:func:`lorafast.layer.default_adapter_dtype`): the weight's, fp32
    for a quantized base (its weight's dtype is storage)."""
    return torch.float32 if is_quantized_linear(module) else module.weight.dtype


def in_weight_layout(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """An fp32 ``(out, in)`` delta as PEFT's ``get_delta_weight`` gives it: in the stored weight's dtype and layout
    (``(in, out)`` for a Conv1D), fp32 ``(out, in)`` over a quantized base."""
    kind = kind_of(module)
    return delta if kind in QUANTIZED else kind.in_layout(module, delta)


def compute_dtype(module: nn.Module, x: torch.Tensor, name: str | None = None) -> torch.dtype:
    """The dtype a LoRA linear over ``module`` computes in for input x: the autocast dtype under ``torch.autocast``,
    else the module's own (a ``Linear4bit``'s ``compute_dtype``), else x's dtype (``name``: its kind's, if known)."""
    own = getattr(kind_of(module, name), "compute_dtype", None)
    return autocast_dtype(x) or (own and own(module)) or x.dtype


def reset(module: nn.Module) -> None:
    """Re-initialise a base read in place by its own ``reset_parameters`` (``nn.Linear``'s: Kaiming-uniform W,
    uniform b), if it has one; a quantized base is left as it is (there is nothing to draw it from)."""
    if not is_quantized_linear(module) and hasattr(module, "reset_parameters"):
        module.reset_parameters()


@torch.no_grad()
def write_weight(module: nn.Module, merged: torch.Tensor | None = None, delta: torch.Tensor | None = None) -> None:
    """Make W0 the fp32 ``merged`` weight ``(out, in)``, or W0 + the fp32 ``delta``: in place for a dense base, by
    re-quantizing with the kind's own storage for a quantized one (PEFT's merge; warns: lossy)."""
    kind = kind_of(module)
    if kind not in QUANTIZED:
        if merged is not None:
            module.weight.copy_(kind.in_layout(module, merged))
        else:
            module.weight.add_(kind.in_layout(module, delta))
        return
    warnings.warn(
        f"merging LoRA into a quantized {type(module).__name__} re-quantizes the weight: the result differs from "
        "the merged weight by rounding; lorafast.merge_lora_dense() merges into a dense copy instead",
        stacklevel=4,
    )
    if merged is None:
        merged = dequantize_weight(module, torch.float32).add_(delta.to(torch.float32))
    kind.requantize(module, merged.to(torch.float32))


__all__ = [
    "KINDS",
    "base_weight",
    "check_quantized",
    "compute_dtype",
    "dequantize_weight",
    "features",
    "is_quantized_linear",
    "kind_name",
    "kind_of",
    "reset",
    "write_weight",
]
