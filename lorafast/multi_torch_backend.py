"""PyTorch mixed-adapter LoRA linear: ``y_i = x_i·W0ᵀ + b + s_k·(drop_k(x_i)·A_kᵀ)·B_kᵀ``, k = row_adapter[i].

K adapters, each with its dropout p_k (``drop_k(x_i) = x_i ⊙ keep_i / (1 − p_k)``,
rows masked as ``lorafast.dropout.keep_mask`` draws for p_k, regenerated in backward); k = −1: base only. No loop
over adapters, no gather of x: they act as one rank-K·R adapter whose block k a block-one-hot mask keeps for the
rows of k, so every product stays one GEMM, at K times one adapter's skinny products (small beside x·W0ᵀ).
Shapes: x ``(n, in)``, weight ``(out, in)``, bias ``(out,)``/None, the adapters as K A's ``(r_k, in)`` and B's
``(out, r_k)`` (the layer's own Parameters, stacked for the call only and never kept: nothing outlives it that a
write to a factor could leave stale; gradients come back per adapter) or already stacked ``lora_A`` ``(K, R, in)``,
``lora_B`` ``(K, out, R)`` (gradients stacked too), scalings ``(K,)``, row_adapter ``(n,)`` in [-1, K), dropout
``(K,)`` float32/None, y ``(n, out)``, xa ``(n, R)`` (R the largest rank; zero without adapter).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .dropout import keep_blocks
from .torch_backend import input_and_down_grads, matmul_wt, rows_transposed_matmul


def _call_stack(lora_A, lora_B, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (K, R, in), B (K, out, R))`` in ``dtype``: stacked tensors as given, K factors stacked (zero-padded to the
    largest rank) for this call only."""
    if isinstance(lora_A, torch.Tensor):
        return lora_A, lora_B
    rank = max(a.shape[0] for a in lora_A)
    if all(a.shape[0] == rank for a in lora_A):
        return torch.stack([a.to(dtype) for a in lora_A]), torch.stack([b.to(dtype) for b in lora_B])
    stacked_a = torch.stack([F.pad(a.to(dtype), (0, 0, 0, rank - a.shape[0])) for a in lora_A])
    stacked_b = torch.stack([F.pad(b.to(dtype), (0, rank - b.shape[1])) for b in lora_B])
    return stacked_a, stacked_b


def _per_adapter(grad: torch.Tensor | None, factors, rank_dim: int):
    """A stacked gradient back in the factors' form: as it is for stacked factors, else adapter k's rows (A) or
    columns (B) 0..r_k-1 in its own dtype."""
    if grad is None or isinstance(factors, torch.Tensor):
        return grad
    return [grad[k].narrow(rank_dim, 0, f.shape[rank_dim]).to(f.dtype) for k, f in enumerate(factors)]


def _row_blocks(row_adapter: torch.Tensor, num_adapters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, adapter, present)``: row numbers, adapters (−1 read as 0), has one; ids outside [-1, K) count as −1."""
    rows = torch.arange(row_adapter.shape[0], device=row_adapter.device)
    present = (row_adapter >= 0) & (row_adapter < num_adapters)
    return rows, row_adapter.clamp(0, num_adapters - 1), present


def _scatter_blocks(values: torch.Tensor, rows, adapter, num_adapters: int) -> torch.Tensor:
    """``(n, K·R)`` zeros with row i's block ``adapter[i]`` set to ``values[i]`` ``(n, R)``."""
    n, rank = values.shape
    wide = values.new_zeros(n, num_adapters, rank)
    wide[rows, adapter] = values
    return wide.view(n, num_adapters * rank)


def _row_scalings(scalings: torch.Tensor, adapter, present, dtype) -> torch.Tensor:
    """``(n, 1)``: each row's adapter scaling, 0 for rows without adapter."""
    return torch.where(present, scalings[adapter], 0.0).to(dtype).unsqueeze(1)


def _row_dropout(dropout: torch.Tensor | None, adapter, present) -> torch.Tensor | None:
    """``(n,)`` drop probability per row (0 without adapter), or None without dropout (callers pass None for zeros)."""
    if dropout is None:
        return None
    return torch.where(present, dropout[adapter], 0.0).float()


def _stacked_b(lora_B: torch.Tensor) -> torch.Tensor:
    """lora_B ``(K, out, R)`` as ``(out, K·R)``, the column order of the wide products."""
    num_adapters, out_features, rank = lora_B.shape
    return lora_B.permute(1, 0, 2).reshape(out_features, num_adapters * rank)


def multi_lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor | Sequence[torch.Tensor],
    lora_B: torch.Tensor | Sequence[torch.Tensor],
    scalings: torch.Tensor,
    row_adapter: torch.Tensor,
    dropout: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, xa)`` of the mixed-adapter LoRA linear for x ``(n, in)``; shapes in the module docstring."""
    lora_A, lora_B = _call_stack(lora_A, lora_B, x.dtype)
    num_adapters, rank, in_features = lora_A.shape
    rows, adapter, present = _row_blocks(row_adapter, num_adapters)
    a_stacked = lora_A.reshape(num_adapters * rank, in_features)
    row_p = _row_dropout(dropout, adapter, present)
    if row_p is None:
        xa_all = matmul_wt(x, a_stacked)
    else:  # drop(x)·Aᵀ block by block: the masked copy of x never exceeds one cache-sized block
        xa_all = torch.empty(x.shape[0], num_adapters * rank, dtype=x.dtype, device=x.device)
        for block, keep in keep_blocks(seed, row_p, x.shape, x.dtype, x.device):
            torch.mm(keep.mul_(x[block]), a_stacked.t(), out=xa_all[block])
        xa_all.div_((1.0 - row_p).to(x.dtype).unsqueeze(1))
    xa = xa_all.view(-1, num_adapters, rank)[rows, adapter].mul_(present.unsqueeze(1))
    wide = _scatter_blocks(xa * _row_scalings(scalings, adapter, present, x.dtype), rows, adapter, num_adapters)
    b_stacked = _stacked_b(lora_B)
    y = torch.mm(wide, b_stacked.t()) if bias is None else torch.addmm(bias, wide, b_stacked.t())
    y.addmm_(x, weight.t())
    return y, xa


def multi_lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor | Sequence[torch.Tensor],
    lora_B: torch.Tensor | Sequence[torch.Tensor],
    scalings: torch.Tensor,
    row_adapter: torch.Tensor,
    needs_grad: tuple[bool, bool, bool],
    dropout: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dX (n, in), dA, dB)``, None where not ``needs_grad``; dW0 and db never formed. dA, dB: ``(K, R, in)``,
    ``(K, out, R)`` for stacked factors, else K ``(r_k, in)``, ``(out, r_k)`` in the factors' dtypes. Each adapter's
    dA, dB sum over its own rows: the gradient of its rows run alone."""
    grad_x, grad_a, grad_b = _stacked_backward(
        grad_y, x, xa, weight, *_call_stack(lora_A, lora_B, grad_y.dtype), scalings, row_adapter, needs_grad, dropout,
        seed,
    )  # fmt: skip
    return grad_x, _per_adapter(grad_a, lora_A, 0), _per_adapter(grad_b, lora_B, 1)


def _stacked_backward(grad_y, x, xa, weight, lora_A, lora_B, scalings, row_adapter, needs_grad, dropout, seed):
    need_dx, need_da, need_db = needs_grad
    num_adapters, rank, in_features = lora_A.shape
    rows, adapter, present = _row_blocks(row_adapter, num_adapters)
    row_scale = _row_scalings(scalings, adapter, present, grad_y.dtype)
    grad_x = grad_a = grad_b = None
    if need_db:
        xa_wide = _scatter_blocks(xa * row_scale, rows, adapter, num_adapters)
        grad_b = rows_transposed_matmul(grad_y, xa_wide).view(-1, num_adapters, rank).permute(1, 0, 2).contiguous()
    if not (need_dx or need_da):
        return grad_x, grad_a, grad_b

    row_p = _row_dropout(dropout, adapter, present)
    if row_p is not None:
        row_scale = row_scale / (1.0 - row_p).to(grad_y.dtype).unsqueeze(1)
    g_all = matmul_wt(grad_y, _stacked_b(lora_B).t()).view(-1, num_adapters, rank)
    g_wide = _scatter_blocks(g_all[rows, adapter].mul_(row_scale), rows, adapter, num_adapters)
    a_stacked = lora_A.reshape(num_adapters * rank, in_features)
    masks = keep_blocks(seed, row_p, x.shape, x.dtype, x.device) if row_p is not None else None
    grad_x, grad_a = input_and_down_grads(grad_y, x, weight, g_wide, a_stacked, need_dx, need_da, masks)
    if grad_a is not None:
        grad_a = grad_a.view(num_adapters, rank, in_features)
    return grad_x, grad_a, grad_b
