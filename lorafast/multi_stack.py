"""A ``MultiLoRALinear``'s adapters stacked as one ``(K, R, in)`` A and ``(K, out, R)`` B (zero-padded to rank R).

Each adapter stays its own Parameters (for optimizers, ``state_dict``, PEFT files). :class:`StackedFactorsCache`
rebuilds the stack only when an adapter is added or removed, or a factor changes in place (its version counter
moves: optimizer steps, ``copy_``, ``load_state_dict``) or is replaced (``.to()``); after a ``param.data`` change
call :meth:`StackedFactorsCache.clear`. :class:`StackedFactors`' backward cuts the gradient back per adapter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class StackedFactors(torch.autograd.Function):
    """``(A (K, R, in), B (K, out, R))`` given, as an autograd node over the K A's and K B's Parameters."""

    @staticmethod
    def forward(ctx, stacked, *factors):
        ctx.num_adapters = len(factors) // 2
        ctx.shapes = [f.shape for f in factors]
        ctx.dtypes = [f.dtype for f in factors]
        lora_A, lora_B = stacked
        return lora_A.detach(), lora_B.detach()  # new tensor objects: the cached ones keep no graph

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        grads = []
        for k, (shape, dtype, needed) in enumerate(zip(ctx.shapes, ctx.dtypes, ctx.needs_input_grad[1:])):
            if not needed:
                grads.append(None)
            elif k < ctx.num_adapters:  # A_k (r, in): rows 0..r-1 of block k
                grads.append(None if grad_a is None else grad_a[k, : shape[0]].to(dtype))
            else:  # B_k (out, r): columns 0..r-1 of block k
                grads.append(None if grad_b is None else grad_b[k - ctx.num_adapters, :, : shape[1]].to(dtype))
        return None, *grads


def stack_factors(lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor], dtype: torch.dtype):
    """``(A (K, R, in), B (K, out, R))`` in ``dtype`` from K A's ``(r_k, in)`` and B's ``(out, r_k)``, zero-padded to
    the largest rank R (differentiable)."""
    rank = max(a.shape[0] for a in lora_A)
    stacked_a = torch.stack([F.pad(a.to(dtype), (0, 0, 0, rank - a.shape[0])) for a in lora_A])
    stacked_b = torch.stack([F.pad(b.to(dtype), (0, rank - b.shape[1])) for b in lora_B])
    return stacked_a, stacked_b


class StackedFactorsCache:
    """The stacked factors of one layer's adapters, rebuilt only when they change (see the module docstring)."""

    def __init__(self):
        self._entry: tuple | None = None  # (key, (A, B)), replaced whole: concurrent readers see one or the other

    def clear(self) -> None:
        """Forget the stacked copy (after a change the version counters do not see)."""
        self._entry = None

    def get(
        self, lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (K, R, in), B (K, out, R))`` in ``dtype``; connected to the factors' gradients when grad is on."""
        factors = (*lora_A, *lora_B)
        key = (dtype, tuple((id(f), f.data_ptr(), f._version, f.shape, f.dtype, f.device) for f in factors))
        entry = self._entry
        if entry is None or entry[0] != key:
            with torch.no_grad():  # the cached copy keeps no graph; StackedFactors connects the gradients
                entry = (key, stack_factors(lora_A, lora_B, dtype))
            self._entry = entry
        stacked = entry[1]
        if torch.is_grad_enabled() and any(f.requires_grad for f in factors):
            return StackedFactors.apply(stacked, *factors)
        return stacked
