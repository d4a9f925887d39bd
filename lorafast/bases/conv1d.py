"""transformers' ``Conv1D`` (GPT-2's projections) as a frozen base: the weight is stored ``(in, out)`` and read
transposed, without a copy (PEFT's ``fan_in_fan_out``)."""

from __future__ import annotations

import sys

import torch
from torch import nn

FAN_IN_FAN_OUT = True


def conv1d_class() -> type | None:
    """transformers' ``Conv1D`` if transformers is loaded, else None."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def recognises(module: nn.Module) -> bool:
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def features(module: nn.Module) -> tuple[int, int]:
    return tuple(module.weight.shape)


def weight_view(module: nn.Module) -> torch.Tensor:
    return module.weight.t()


def in_layout(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    return delta.t().to(module.weight.dtype)
