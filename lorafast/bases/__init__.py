"""Frozen bases that lorafast reads as a dense weight per call: bitsandbytes 4-bit (:mod:`.bnb4`) and 8-bit
(:mod:`.bnb8`), transformers' FP8 (:mod:`.fp8`).

A kind is a module with ``recognises(module)``, ``check_ready(module)`` (ValueError while there is nothing to
dequantize yet), ``dequantize(module, dtype)`` (W0 ``(out, in)`` as a new dense tensor, never kept),
``requantize(module, merged)`` (replace the stored weight by the quantization of the fp32 ``(out, in)`` ``merged``)
and optionally ``compute_dtype(module)`` (the module's own preference, or None). The module keeps its own state_dict
keys (the layer over it shows them as its own). Adding a kind is one file plus its entry in :data:`KINDS`.
Dense and Conv1D bases are read in place (views) by :mod:`lorafast.layer`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..validation import autocast_dtype
from . import bnb4, bnb8, fp8

KINDS = (bnb4, bnb8, fp8)


def kind_of(module: nn.Module):
    """The kind (a module of this package) that recognises ``module``, None for any other module."""
    return next((kind for kind in KINDS if kind.recognises(module)), None)


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized linear lorafast dequantizes per call: a bitsandbytes ``Linear4bit`` (or
    subclass: ``LinearNF4``, ``LinearFP4``) or ``Linear8bitLt``, or transformers' ``FP8Linear``."""
    return kind_of(module) is not None


def _kind(module: nn.Module):
    kind = kind_of(module)
    if kind is None:
        raise ValueError(
            "expected a bitsandbytes Linear4bit or Linear8bitLt or a transformers FP8Linear, "
            f"got {type(module).__name__}"
        )
    return kind


def check_quantized(module: nn.Module) -> None:
    """ValueError unless ``module`` is a quantized linear whose weight is quantized already (bitsandbytes quantizes
    when the module is moved to a device, or transformers when it loads)."""
    _kind(module).check_ready(module)


@torch.no_grad()
def dequantize_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """W0 ``(out, in)`` of a quantized linear as a new dense tensor in ``dtype``."""
    return _kind(module).dequantize(module, dtype)


def compute_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype a LoRA linear over ``module`` computes in for input x: the autocast dtype under ``torch.autocast``,
    else the module's own (a ``Linear4bit``'s ``compute_dtype``), else x's dtype."""
    own = getattr(_kind(module), "compute_dtype", None)
    return autocast_dtype(x) or (own and own(module)) or x.dtype


@torch.no_grad()
def requantize(module: nn.Module, delta: torch.Tensor | None = None, merged: torch.Tensor | None = None) -> None:
    """Replace ``module``'s quantized weight by the quantization of ``dequant(W0) + delta`` (fp32 math), or of the
    ``merged`` weight ``(out, in)`` (DoRA), with the kind's own storage (PEFT's merge). Warns: lossy."""
    warnings.warn(
        f"merging LoRA into a quantized {type(module).__name__} re-quantizes the weight: the result differs from "
        "the merged weight by rounding; lorafast.merge_lora_dense() merges into a dense copy instead",
        stacklevel=4,
    )
    if merged is None:
        merged = dequantize_weight(module, torch.float32).add_(delta.to(torch.float32))
    _kind(module).requantize(module, merged.to(torch.float32))


__all__ = ["KINDS", "check_quantized", "compute_dtype", "dequantize_weight", "is_quantized_linear", "kind_of"]
