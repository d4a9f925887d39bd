"""``nn.Linear`` as a frozen base: W0 is the module's own ``(out, in)`` weight, read in place; merges write into it."""

from __future__ import annotations

import torch
from torch import nn


def recognises(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def features(module: nn.Module) -> tuple[int, int]:
    return module.weight.shape[1], module.weight.shape[0]


def weight_view(module: nn.Module) -> torch.Tensor:
    return module.weight


def in_layout(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """An ``(out, in)`` tensor as the stored weight holds it: its dtype (and layout)."""
    return delta.to(module.weight.dtype)
