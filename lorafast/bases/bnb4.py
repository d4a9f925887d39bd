"""bitsandbytes' ``Linear4bit`` (NF4/FP4, double quant or not) as a frozen base: ``dequantize_4bit`` per call.

bitsandbytes is optional: nothing here imports it unless a model already holds its layers.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn


def bnb_class(name: str) -> type | None:
    """bitsandbytes' ``nn`` class ``name`` if bitsandbytes has been imported (a model can hold its layers only then)."""
    return getattr(sys.modules.get("bitsandbytes.nn.modules"), name, None)


def recognises(module: nn.Module) -> bool:
    cls = bnb_class("Linear4bit")
    return cls is not None and isinstance(module, cls)


def compute_dtype(module: nn.Module) -> torch.dtype | None:
    return module.compute_dtype


def _quant_state(module: nn.Module):
    """The QuantState in bitsandbytes' canonical layout (a copy where bitsandbytes' CPU inference has repacked the
    weight; the module keeps its own)."""
    weight = module.weight
    state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
    if state is None:
        raise ValueError(
            f"{type(module).__name__} is not quantized yet (no quant_state): move it to a device (.to(...)) or load "
            "the model with a BitsAndBytesConfig first"
        )
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    # Undo the code layout only: the repacked absmax (bf16, blocks transposed, no longer nested) is what bitsandbytes
    # itself now multiplies by, so it is used as it is rather than re-quantized.
    unpacked = copy.copy(state)
    unpacked.original_nested = False
    packed, unpacked = _convert_weight_packed_for_cpu_inverse(weight.data, unpacked)
    unpacked.absmax = state.absmax.T.reshape(-1).float()
    return packed, unpacked


def check_ready(module: nn.Module) -> None:
    _quant_state(module)  # raises when there is none


def dequantize(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    packed, state = _quant_state(module)
    return dequantize_4bit(packed, state).to(dtype)


def requantize(module: nn.Module, merged: torch.Tensor) -> None:
    import bitsandbytes as bnb

    weight = module.weight
    state = _quant_state(module)[1]
    kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k != "data"}
    kwargs.update(requires_grad=False, bnb_quantized=False)
    kwargs.pop("quant_state", None)
    module.weight = bnb.nn.Params4bit(merged.to(state.dtype).to("cpu"), **kwargs).to(weight.device)
