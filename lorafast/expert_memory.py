"""The largest tensor a computation writes: the check that expert LoRA never forms an ``E×out×in`` tensor."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _LargestWrite(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # a view allocates nothing
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_write(fn: Callable[[], object]) -> int:
    """Elements of the largest tensor any ATen op outputs while ``fn()`` runs (views excluded; allocations inside
    one op, not returned by it, are not seen)."""
    mode = _LargestWrite()
    with mode:
        fn()
    return mode.largest
