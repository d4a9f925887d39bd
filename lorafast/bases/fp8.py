"""transformers' ``FP8Linear`` (fine-grained FP8 checkpoints) as a frozen base: an e4m3 weight ``(out, in)`` times
``weight_scale_inv``, per block ``block_size`` (e.g. 128×128: scales ``(⌈out/128⌉, ⌈in/128⌉)``) or per tensor
(``block_size`` None, a scalar scale), dequantized per call by lorafast itself (any device, CPU included). The
static activation scale, if any, is not used: the LoRA linear computes in a floating dtype.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def recognises(module: nn.Module) -> bool:
    cls = getattr(sys.modules.get("transformers.integrations.finegrained_fp8"), "FP8Linear", None)
    # an int8 weight is FP4-packed, which lorafast does not dequantize; a floating one is no FP8 base at all
    return cls is not None and isinstance(module, cls) and module.weight.dtype in _FP8_DTYPES


def check_ready(module: nn.Module) -> None:
    if module.weight.is_meta:
        raise ValueError(f"{type(module).__name__} has no weight yet (meta): load the checkpoint first")


def _scales(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``weight_scale_inv`` expanded to the weight's shape ``(out, in)`` (a broadcast view per tensor)."""
    scale = module.weight_scale_inv.to(dtype)
    out_features, in_features = module.weight.shape
    if module.block_size is None:
        return scale.expand(out_features, in_features)
    rows, cols = module.block_size
    return scale.repeat_interleave(rows, 0)[:out_features].repeat_interleave(cols, 1)[:, :in_features]


def dequantize(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    return module.weight.to(dtype).mul_(_scales(module, dtype))


def requantize(module: nn.Module, merged: torch.Tensor) -> None:
    """e4m3 weight and scales of ``merged`` ``(out, in)`` fp32: each block's (or the tensor's) max |w| maps to 448."""
    out_features, in_features = merged.shape
    rows, cols = module.block_size or (out_features, in_features)
    padded = merged.new_zeros(math.ceil(out_features / rows) * rows, math.ceil(in_features / cols) * cols)
    padded[:out_features, :in_features] = merged
    blocks = padded.unflatten(0, (-1, rows)).unflatten(2, (-1, cols))  # (R, rows, C, cols)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / _FP8_MAX
    scale_dtype = module.weight_scale_inv.dtype
    if scale_dtype != torch.float32:  # ue8m0 scales are powers of two: round up so no block overflows
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    scale = scale.to(scale_dtype).to(torch.float32)
    quantized = (blocks / scale[:, None, :, None]).flatten(2).flatten(0, 1)[:out_features, :in_features]
    weight = quantized.to(module.weight.dtype).to(module.weight.device)
    module.weight = nn.Parameter(weight, requires_grad=False)
    scale = scale.reshape(module.weight_scale_inv.shape) if module.block_size is None else scale
    module.weight_scale_inv = nn.Parameter(scale.to(scale_dtype).to(weight.device), requires_grad=False)
