"""The LoRA and DoRA linears over a frozen base module of any kind (:mod:`lorafast.bases`): the one place where a
base is read for a call.

A base read in place (``nn.Linear``, ``Conv1D``) hands its weight (a view) to :func:`lorafast.lora_linear` or
:func:`lorafast.dora.dora_linear`; the autograd Function keeps a reference to it (a Parameter's: no memory). A
quantized base is dequantized into a transient buffer in the compute dtype per call, and the Function gets a
``reload`` callable instead: the buffer is not saved, backward dequantizes again where dX needs W0. Kept for
backward either way: x and ``xa`` ``(n, r)`` (DoRA: also y and ``(out,)`` vectors).

Compute dtype over a quantized base: the autocast dtype under ``torch.autocast``, else a ``Linear4bit``'s
``compute_dtype`` (x's dtype if unset), else x's dtype; the output has x's dtype, as bitsandbytes' layers return.
8-bit: see :mod:`lorafast.bases.bnb8` for how its W0 differs from bitsandbytes' CUDA int8 matmul.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import nn

from . import dora
from .backend import front_door
from .bases import QUANTIZED, base_weight, compute_dtype, dequantize_weight, kind_name, kind_of
from .function import LoRALinearFunction, lora_linear
from .validation import autocast_dtype, lora_inputs_check


def base_lora_linear(
    x: torch.Tensor,
    module: nn.Module,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    magnitude: torch.Tensor | None = None,
    kind: str | None = None,
) -> torch.Tensor:
    """:func:`lorafast.lora_linear` over the frozen W0 and bias of ``module``, a base of any kind; with a DoRA
    ``magnitude`` m ``(out,)``, :func:`lorafast.dora.dora_linear` over it. ``kind``: the module's kind name, if
    known (:func:`lorafast.bases.kind_name`).

    x ``(..., in)`` -> ``(..., out)``; lora_A ``(r, in)``, lora_B ``(out, r)``, m in any floating dtype (cast to the
    compute dtype, gradients in their own). ValueError as lora_linear's (and dora_linear's), and for a module of no
    kind (or not quantized yet).
    """
    kind = kind_name(module) if kind is None else kind  # looked up once: forward, reload and backward use it
    if kind_of(module, kind) not in QUANTIZED:
        weight, lora_A, lora_B = base_weight(module, kind), lora_A.to(x.dtype), lora_B.to(x.dtype)
        if magnitude is None:
            return lora_linear(x, weight, module.bias, lora_A, lora_B, scaling, dropout_p, training)
        return dora.dora_linear(x, weight, module.bias, lora_A, lora_B, magnitude, scaling, dropout_p, training)
    if magnitude is not None:
        dora.check_magnitude(magnitude, module.out_features, x)
    dtype = compute_dtype(module, x, kind)
    under_autocast = autocast_dtype(x) is not None
    reload = functools.partial(dequantize_weight, module, dtype, kind)

    def run(tensors, p, backend, seed):
        if magnitude is None:  # the factors as given: the Function casts them itself (no cast copy kept)
            return LoRALinearFunction.apply(*tensors[:3], lora_A, lora_B, float(scaling), p, seed, backend, reload)
        # fp64 (references): the norms of the fp64 weight of this call, not the cached fp32 ones
        base_sq = quantized_row_norms_sq(module, kind) if dtype != torch.float64 else None
        return dora.ReloadedWeightDoRALinearFunction.apply(
            *tensors, magnitude, float(scaling), p, seed, backend, base_sq, reload
        )

    bias = module.bias
    with torch.autocast(device_type=x.device.type, enabled=False) if under_autocast else contextlib.nullcontext():
        # differentiable casts: the gradients arrive in A's and B's dtype
        tensors = x.to(dtype), reload(), None if bias is None else bias.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
        y = front_door(*tensors, lora_inputs_check(scaling, dropout_p, training), run)
    return y.to(dtype if under_autocast else x.dtype)


def quantized_row_norms_sq(module: nn.Module, kind: str | None = None) -> torch.Tensor:
    """``‖W0‖²`` per row ``(out,)`` fp32 of a quantized module's dequantized W0, cached per quantized weight (its
    Parameter's storage and version: a merge, which re-quantizes, or a device move invalidates it)."""
    return dora.base_row_norms_sq(module.weight, lambda: dequantize_weight(module, torch.float32, kind))


def on_dense_base(
    module: nn.Module,
    x: torch.Tensor,
    factors_dtype: torch.dtype | None,
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    kind: str | None = None,
) -> torch.Tensor:
    """``run(x, W0 (out, in), bias)`` with a base of any kind as a dense weight for one call: the weight (a view)
    itself, or a quantized W0 dequantized once in the compute dtype, with x and the bias in it (fp32
    ``factors_dtype`` then computes under autocast in that dtype; the output comes back in x's dtype). ``run``
    may keep what it is given for backward (a mixed batch keeps the dequantized W0)."""
    kind = kind_name(module) if kind is None else kind
    if kind_of(module, kind) not in QUANTIZED:
        return run(x, base_weight(module, kind), module.bias)
    dtype = compute_dtype(module, x, kind)
    cast = contextlib.nullcontext() if factors_dtype in (None, dtype) else torch.autocast(x.device.type, dtype=dtype)
    out_dtype = x.dtype if autocast_dtype(x) is None else dtype
    bias = None if module.bias is None else module.bias.to(dtype)
    with cast:
        return run(x.to(dtype), dequantize_weight(module, dtype, kind), bias).to(out_dtype)
