"""bitsandbytes' ``Linear8bitLt`` as a frozen base: W0 = CB·SCB/127 per call, as bitsandbytes' CPU/XPU training
path computes it (on CUDA its int8 matmul also quantizes the activations and splits out outlier columns)."""

from __future__ import annotations

import torch
from torch import nn

from .bnb4 import bnb_class


def recognises(module: nn.Module) -> bool:
    cls = bnb_class("Linear8bitLt")
    return cls is not None and isinstance(module, cls)


def check_ready(module: nn.Module) -> None:
    if module.weight.dtype != torch.int8 and not getattr(module.weight, "has_fp16_weights", False):
        raise ValueError(
            f"{type(module).__name__} is not quantized yet (its weight is {module.weight.dtype}, not int8): move it "
            "to a device (.to(...)) or load the model with a BitsAndBytesConfig first"
        )


def dequantize(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    weight, state = module.weight, module.state
    if weight.dtype != torch.int8:  # has_fp16_weights: the weight was never quantized
        return weight.detach().to(dtype, copy=True)
    scb = getattr(weight, "SCB", None)
    scb = state.SCB if scb is None else scb
    if scb is None:
        raise ValueError("Linear8bitLt has an int8 weight but no SCB row scales: it was not quantized by bitsandbytes")
    return weight.data.to(dtype).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))


def requantize(module: nn.Module, merged: torch.Tensor) -> None:
    import bitsandbytes as bnb

    device = module.weight.device
    module.weight = bnb.nn.Int8Params(merged.to("cpu"), requires_grad=False, has_fp16_weights=False).to(device)
    module.state.reset_grads()
    module.state.CB, module.state.SCB = None, None
