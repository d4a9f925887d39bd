"""PyTorch implementation of the mixed-adapter LoRA linear: every row of x has its own adapter.

``y_i = x_i·W0ᵀ + b + s_k·(x_i·A_kᵀ)·B_kᵀ`` with ``k = row_adapter[i]`` (−1: base only), for K
adapters stacked and zero-padded to one rank R. No loop over adapters and no gather of x: the
K adapters act as one adapter of rank K·R whose rank-R block k is kept, for row i, only where
``k = row_adapter[i]`` (a block-one-hot mask on the skinny ``(n, K·R)`` products). That costs
K times the skinny LoRA products of one adapter, a small share of the frozen ``x·W0ᵀ`` for the
few adapters a batch mixes; every product stays one large GEMM.

Shapes: x ``(n, in)``, weight ``(out, in)``, bias ``(out,)`` or None, lora_A ``(K, R, in)``,
lora_B ``(K, out, R)``, scalings ``(K,)``, row_adapter ``(n,)`` integers in [-1, K), y
``(n, out)``, xa ``(n, R)`` (``x_i·A_kᵀ``, zero for rows without adapter).
"""

from __future__ import annotations

import torch

from .torch_backend import matmul_wt, rows_transposed_matmul


def _row_blocks(row_adapter: torch.Tensor, num_adapters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, adapter, present)``: row numbers, each row's adapter (−1 read as 0), and whether it has one."""
    rows = torch.arange(row_adapter.shape[0], device=row_adapter.device)
    present = row_adapter >= 0
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


def _stacked_b(lora_B: torch.Tensor) -> torch.Tensor:
    """lora_B ``(K, out, R)`` as ``(out, K·R)``, the column order of the wide products."""
    num_adapters, out_features, rank = lora_B.shape
    return lora_B.permute(1, 0, 2).reshape(out_features, num_adapters * rank)


def multi_lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor,
    row_adapter: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, xa)`` of the mixed-adapter LoRA linear for x ``(n, in)``; shapes in the module docstring."""
    num_adapters, rank, in_features = lora_A.shape
    rows, adapter, present = _row_blocks(row_adapter, num_adapters)
    xa_all = matmul_wt(x, lora_A.reshape(num_adapters * rank, in_features)).view(-1, num_adapters, rank)
    xa = xa_all[rows, adapter].mul_(present.unsqueeze(1))
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
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor,
    row_adapter: torch.Tensor,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dX (n, in), dA (K, R, in), dB (K, out, R))``, None where ``needs_grad`` says not wanted.

    Each adapter's dA and dB sum over its own rows only: exactly the gradient it would get if
    its rows were run alone. ``dW0`` and ``db`` are never formed.
    """
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

    g_all = matmul_wt(grad_y, _stacked_b(lora_B).t()).view(-1, num_adapters, rank)
    g_wide = _scatter_blocks(g_all[rows, adapter].mul_(row_scale), rows, adapter, num_adapters)
    a_stacked = lora_A.reshape(num_adapters * rank, in_features)
    if need_da:
        grad_a = rows_transposed_matmul(g_wide, x).view(num_adapters, rank, in_features)
    if need_dx:
        grad_x = torch.mm(g_wide, a_stacked)
        grad_x.addmm_(grad_y, weight)
    return grad_x, grad_a, grad_b
