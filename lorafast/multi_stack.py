"""K adapters' factors stacked as one ``(K, R, in)`` A and ``(K, out, R)`` B (zero-padded to rank R), for callers
of :func:`lorafast.multi_lora_linear` that hold separate factors. A per-call, differentiable copy: nothing is kept
(``MultiLoRALinear`` reads its adapters in place and stacks nothing).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def stack_factors(lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor], dtype: torch.dtype):
    """``(A (K, R, in), B (K, out, R))`` in ``dtype`` from K A's ``(r_k, in)`` and B's ``(out, r_k)``, zero-padded to
    the largest rank R (differentiable)."""
    rank = max(a.shape[0] for a in lora_A)
    stacked_a = torch.stack([F.pad(a.to(dtype), (0, 0, 0, rank - a.shape[0])) for a in lora_A])
    stacked_b = torch.stack([F.pad(b.to(dtype), (0, rank - b.shape[1])) for b in lora_B])
    return stacked_a, stacked_b
