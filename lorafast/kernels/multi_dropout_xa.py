"""Mixed-adapter LoRA down-projection with per-adapter dropout: ``xa_i = (x_i ⊙ keep_i / (1 − p_k))·A_kᵀ``.

Shapes: x ``(n, in)``, per adapter A_k ``(r_k, in)`` read in place through the factor table of ``multi_factors``,
dropout p ``(K,)`` float32 (runtime values in [0, 1)), xa ``(n, R)`` (R the largest rank, zeros past r_k); k =
row_adapter[i], and ``xa_i = 0`` where k = −1. keep is the single-adapter mask of the same element
for adapter k's p (i the row's index in x): ``keep_i == dropout_keep_mask(seed, (n, in), p_k)[i]``.

One program per row block of the ``adapter_segments`` table (``BLOCK_M`` rows of one adapter) walks ``in`` once:
each x tile is gathered once, masked in registers (never stored) and multiplied into an fp32 ``(BLOCK_M, R_PAD)``
accumulator with A_k's tile; p_k is a per-program scalar from ``dropout[k]``. Memory-bound: one read of x, one small
write. The mixed-adapter forward under dropout runs it first with ``dropped_only`` (only the blocks of adapters with
p_k > 0) and the fused forward computes the other rows' xa itself, so an adapter with p_k = 0 gets exactly the result
without dropout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adapter_segments import (
    BLOCK_M,
    UNUSED_BLOCK,
    AdapterSegments,
    check_dropout,
    check_ids,
    resolve_segments,
)
from .dropout_mask import keep_mask
from .launch import (
    check_input,
    check_tensor,
    dot,
    dot_precision,
    launch,
    projection_tiles,
    rank_block,
    skinny_prune,
    token_bucket,
)
from .multi_factors import A_COL, RANK_COL, TABLE_WIDTH, AdapterFactors, adapter_factors, factor_pointer
from .shared_memory import SmallTiles, on_device

_UNUSED_BLOCK = tl.constexpr(UNUSED_BLOCK)
_TABLE_WIDTH = tl.constexpr(TABLE_WIDTH)
_A_COL = tl.constexpr(A_COL)
_RANK_COL = tl.constexpr(RANK_COL)


def _config(bk, stages, warps) -> triton.Config:
    # BLOCK_M is the block table's; the rest is free.
    return triton.Config({"BLOCK_M": BLOCK_M, "BLOCK_K": bk}, num_stages=stages, num_warps=warps)


# For large ranks, whose (BLOCK_K, R_PAD) tiles of A_kᵀ outgrow an RTX card (2-byte) or an A100 (4-byte).
SMALL_TILES = SmallTiles((_config(32, 3, 4), _config(32, 2, 4)))


def _configs() -> list[triton.Config]:
    return [_config(*shape) for shape in [(128, 3, 4), (64, 4, 4), (64, 3, 8)]] + list(SMALL_TILES.configs)


@triton.jit(do_not_specialize=["seed", "M_BUCKET"])
def multi_dropout_xa_kernel(
    x_ptr, table_ptr, factor_ptr, dropout_ptr, block_adapter_ptr, block_rows_ptr, xa_ptr,
    K, R, seed,
    stride_xm, stride_xk, stride_dropout, stride_xam, stride_xar, M_BUCKET,
    DROPPED_ONLY: tl.constexpr, UNIT_STRIDE: tl.constexpr, ALIGNED: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    adapter = tl.load(block_adapter_ptr + pid)
    if adapter == _UNUSED_BLOCK:
        return
    lora = tl.maximum(adapter, 0).to(tl.int64)
    p = tl.load(dropout_ptr + lora * stride_dropout)
    if DROPPED_ONLY:  # the other blocks' xa is written by the fused forward
        if (adapter < 0) | (p == 0.0):
            return
    rows = tl.load(block_rows_ptr + pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_mask = rows >= 0
    mask_rows = tl.maximum(rows, 0)  # padding slots (−1) draw for row 0, never stored
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    if adapter >= 0:
        keep_scale = 1.0 / (1.0 - p)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        # A_k's pointer, strides and rank (multi_factors)
        rank = tl.load(table_ptr + lora * _TABLE_WIDTH + _RANK_COL).to(tl.int32)
        a_base, stride_ar, stride_ak = factor_pointer(
            table_ptr, lora, _A_COL, factor_ptr, K, rank, UNIT_STRIDE, ALIGNED
        )
        at_ptrs = a_base + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
        r_mask = offs_r < rank  # ranks r_k..R-1 read as zeros
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            keep = keep_mask(seed, mask_rows, k0, BLOCK_K, p)
            dropped = tl.where(keep, x.to(tl.float32) * keep_scale, 0.0).to(x.dtype)
            at = tl.load(at_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0).to(dropped.dtype)
            acc = dot(dropped, at, acc, DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            at_ptrs += BLOCK_K * stride_ak
    xa_ptrs = xa_ptr + rows[:, None] * stride_xam + offs_r[None, :] * stride_xar
    tl.store(xa_ptrs, acc.to(xa_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_r < R)[None, :])


multi_dropout_xa_tuned = triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "K", "R_PAD", "DROPPED_ONLY"],
    prune_configs_by={"early_config_prune": on_device(skinny_prune("x_ptr", "BLOCK_K", SMALL_TILES, projection_tiles))},
    cache_results=True,
)(multi_dropout_xa_kernel)


def launch_multi_dropout_xa(
    x: torch.Tensor,
    factors: AdapterFactors,
    dropout: torch.Tensor,
    seed: int,
    segments: AdapterSegments,
    xa: torch.Tensor,
    dropped_only: bool,
    config: triton.Config | None,
) -> None:
    """Write ``drop(x)·A_kᵀ`` into ``xa`` ``(n, R)`` (checked arguments, the adapters' ``factors``; all rows, or
    with ``dropped_only`` only those of adapters with p_k > 0)."""
    n, K = x.shape
    R = factors.rank
    if n == 0:
        return
    num_blocks = segments.num_blocks
    args = (
        x, factors.table, factors.a_factors[0], dropout, segments.block_adapter, segments.block_rows, xa,
        K, R, int(seed),
        *x.stride(), dropout.stride(0), *xa.stride(), token_bucket(n),
        dropped_only, factors.unit_stride, factors.aligned, rank_block(R), dot_precision(x.dtype),
    )  # fmt: skip
    launch(multi_dropout_xa_kernel, multi_dropout_xa_tuned, lambda meta: (num_blocks,), args, config)


def multi_dropout_xa(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    row_adapter: torch.Tensor,
    dropout: torch.Tensor,
    seed: int,
    segments: AdapterSegments | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """xa ``(n, R)`` in x's dtype for x ``(n, in)`` (any strides), lora_A ``(K, R, in)``, row_adapter ``(n,)`` int64
    (or int32) ids in [-1, K), dropout ``(K,)`` float32 (p_k = 0: the row is not masked) and seed
    (``lorafast.dropout.draw_seed()``); ``segments``: ``adapter_segments(row_adapter, K, BLOCK_M)`` if already built;
    ``config`` pins one of the kernel's configs (tests; None autotunes on CUDA)."""
    check_input("x", x)
    n, in_features = x.shape
    if lora_A.dim() != 3:
        raise ValueError(f"lora_A must be 3-D stacked adapters (K, R, in), got shape {tuple(lora_A.shape)}")
    num_adapters, R = lora_A.shape[:2]
    rank_block(R)
    check_tensor("lora_A", lora_A, (num_adapters, R, in_features), x)
    check_ids(row_adapter, n, x)
    check_dropout(dropout, seed, num_adapters, x)
    if dropout is None:
        raise ValueError("dropout must be a (K,) torch.float32 tensor here, got None")
    segments = resolve_segments(segments, row_adapter, num_adapters, n, x.device, config)
    xa = torch.empty(n, R, dtype=x.dtype, device=x.device)
    adapters = lora_A.unbind(0)
    factors = adapter_factors(adapters, adapters)  # the B columns of the table are not read here
    launch_multi_dropout_xa(x, factors, dropout, seed, segments, xa, False, config)
    return xa
