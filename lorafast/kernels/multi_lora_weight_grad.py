"""Per-adapter LoRA weight gradients of a mixed-adapter batch: ``C_k = s_k/(1−p_k)·Σ_{i: k_i = k} (U_i ⊙ keep_i)ᵀ·V_i``.

Shapes: U ``(n, P)``, V ``(n, R)``, scalings s ``(K,)`` float32, C ``(K, P, R)`` (or, transposed,
``(K, R, P)``), with n the (long) token dimension and k_i the adapter of row i; optional
dropout p ``(K,)`` float32 (runtime values in [0, 1)) with keep_i adapter k's dropout mask of
U's row i (``dropout_mask.keep_mask`` with p_k, i the row's index in U), else p = 0, keep = 1:
- ``dA_k = s_k/(1 − p_k)·Σ g_iᵀ·(x_i ⊙ keep_i)``: U = x ``(n, in)``, V = g = dY·B_k, C = dA
  ``(K, R, in)`` (transposed), keep = the forward's mask (regenerated from the seed);
- ``dB_k = s_k·Σ dY_iᵀ·xa_i``: U = dY ``(n, out)``, V = xa (already ``drop(x)_i·A_kᵀ``),
  C = dB ``(K, out, R)``, no mask.

The work is split over row blocks of the sorted order, not over adapters: the grid is
``(P / BLOCK_P, num_chunks)`` over the chunk table of ``adapter_segments`` (each adapter's rows
cut into chunks of ``chunk_rows``), so an adapter holding most of a batch gets most of the
programs. Each program walks its chunk of the rows sorted by adapter, gathers ``BLOCK_M`` rows
of U and V at a time, reduces them into fp32 for ``BLOCK_P`` columns of U, and writes its
partial sum, scaled by s_k / (1 − p_k) (exactly s_k where p_k = 0). A second kernel adds each
adapter's chunk partials in chunk order, so the result is deterministic (no atomics), and writes it
into the adapter's own ``(r_k, P)`` or ``(P, r_k)`` place of one flat buffer (no padding). Adapters
without rows get zeros; rows with k = −1 count for none.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adapter_segments import (
    AdapterSegments,
    RowChunks,
    adapter_segments,
    check_dropout,
    check_row_ids,
    check_segments,
    row_chunks,
)
from .dropout_mask import keep_mask
from .launch import (
    check_input,
    check_tensor,
    dot,
    dot_precision,
    launch,
    rank_block,
    token_bucket,
)
from .lora_weight_grad import lora_weight_grad_tuned, prune
from .multi_factors import grad_layout
from .multi_lora_matmul import BLOCK_M
from .shared_memory import on_device


@triton.jit(do_not_specialize=["seed", "M_BUCKET"])
def multi_lora_weight_grad_kernel(
    u_ptr, v_ptr, scale_ptr, dropout_ptr, order_ptr, bounds_ptr, chunk_adapter_ptr, chunk_bounds_ptr, partial_ptr,
    P, R, seed, chunk_rows,
    stride_um, stride_up, stride_vm, stride_vr, stride_scale, stride_dropout,
    stride_cs, stride_cp, stride_cr, M_BUCKET,
    DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    pid_p = tl.program_id(0)
    chunk = tl.program_id(1)
    adapter = tl.load(chunk_adapter_ptr + chunk)
    if adapter < 0:  # past the last chunk
        return
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.arange(0, R_PAD)
    p_mask = offs_p < P
    r_mask = offs_r < R
    start = tl.load(bounds_ptr + adapter) + (chunk - tl.load(chunk_bounds_ptr + adapter)) * chunk_rows
    end = tl.minimum(start + chunk_rows, tl.load(bounds_ptr + adapter + 1))
    scale = tl.load(scale_ptr + adapter * stride_scale)
    if DROPOUT:
        p = tl.load(dropout_ptr + adapter * stride_dropout)
        scale = scale / (1.0 - p)  # exactly s_k where p_k = 0
    acc = tl.zeros((BLOCK_P, R_PAD), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs < end
        rows = tl.load(order_ptr + offs, mask=m_mask, other=0).to(tl.int64)
        u = tl.load(
            u_ptr + rows[:, None] * stride_um + offs_p[None, :] * stride_up,
            mask=m_mask[:, None] & p_mask[None, :],
            other=0.0,
        )
        if DROPOUT:
            u = tl.where(keep_mask(seed, rows, pid_p * BLOCK_P, BLOCK_P, p), u, 0.0)
        v = tl.load(
            v_ptr + rows[:, None] * stride_vm + offs_r[None, :] * stride_vr,
            mask=m_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        acc = dot(tl.trans(u), v, acc, DOT_PRECISION)
    acc *= scale
    c_ptrs = partial_ptr + chunk * stride_cs
    c_ptrs += offs_p[:, None] * stride_cp + offs_r[None, :] * stride_cr
    tl.store(c_ptrs, acc, mask=p_mask[:, None] & r_mask[None, :])


@triton.jit
def chunk_sum_kernel(
    partial_ptr, chunk_bounds_ptr, layout_ptr, out_ptr, P, stride_cs, stride_cp, stride_cr,
    TRANSPOSE: tl.constexpr, R_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Adapter k's gradient ``Σ_{j: chunks of k, in order} partial[j, :, :r_k]`` (``partial`` ``(chunks, P, R)``) into
    its own place in the flat ``out``: offset and r_k from ``layout`` (``multi_factors.grad_layout``), laid out
    ``(r_k, P)`` with ``TRANSPOSE`` (dA), else ``(P, r_k)`` (dB)."""
    adapter = tl.program_id(1)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.arange(0, R_PAD)
    offset = tl.load(layout_ptr + adapter * 2)
    rank = tl.load(layout_ptr + adapter * 2 + 1)
    mask = (offs_p < P)[:, None] & (offs_r < rank)[None, :]
    tile = offs_p[:, None] * stride_cp + offs_r[None, :] * stride_cr
    acc = tl.zeros((BLOCK_P, R_PAD), dtype=tl.float32)
    for chunk in range(tl.load(chunk_bounds_ptr + adapter), tl.load(chunk_bounds_ptr + adapter + 1)):
        acc += tl.load(partial_ptr + chunk * stride_cs + tile, mask=mask, other=0.0)  # chunk: int64, as chunk_bounds
    if TRANSPOSE:
        out_ptrs = out_ptr + offset + offs_r[None, :] * P + offs_p[:, None]
    else:
        out_ptrs = out_ptr + offset + offs_p[:, None] * rank + offs_r[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


_SUM_TILE = 4096  # elements of a chunk_sum program's (BLOCK_P, R_PAD) tile


multi_lora_weight_grad_tuned = triton.autotune(
    configs=list(lora_weight_grad_tuned.configs),
    key=["M_BUCKET", "P", "R_PAD", "DROPOUT"],
    prune_configs_by={"early_config_prune": on_device(prune)},
    cache_results=True,
)(multi_lora_weight_grad_kernel)


def multi_lora_weight_grad(
    u: torch.Tensor,
    v: torch.Tensor,
    scalings: torch.Tensor,
    row_adapter: torch.Tensor,
    transpose: bool = False,
    segments: AdapterSegments | None = None,
    chunk_rows: int | None = None,
    config: triton.Config | None = None,
    dropout: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """C ``(K, P, R)`` in u's dtype (``(K, R, P)`` with ``transpose``: dA) for u ``(n, P)``, v ``(n, R)`` (any strides),
    scalings ``(K,)`` float32, row_adapter ``(n,)`` int64 (or int32) ids in [-1, K); deterministic for the same inputs
    and chunk_rows. ``segments``: ``adapter_segments(row_adapter, K, ...)`` if built (any block_m); ``chunk_rows``:
    rows per program (None: the segments'); ``config`` pins a config (tests); ``dropout``, ``seed``: None (dB) or the
    forward's (dA from u = x)."""
    check_input("u", u)
    n = u.shape[0]
    R = v.shape[1] if v.dim() == 2 else -1
    check_tensor("v", v, (n, R), u)
    num_adapters = check_row_ids(row_adapter, scalings, n, u)
    check_dropout(dropout, seed, num_adapters, u)
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be at least 1")
    if segments is None:
        segments = adapter_segments(row_adapter, num_adapters, BLOCK_M, chunk_rows)
    else:
        check_segments(segments, n, num_adapters, u.device)
    ranks = (R,) * num_adapters
    flat = multi_weight_grad(u, v, scalings, segments, ranks, u.dtype, transpose, chunk_rows, config, dropout, seed)
    P = u.shape[1]
    return flat.view((num_adapters, R, P) if transpose else (num_adapters, P, R))


def multi_weight_grad(
    u, v, scalings, segments, ranks, dtype, transpose=False, chunk_rows=None, config=None, dropout=None, seed=0
):
    """:func:`multi_lora_weight_grad` unchecked, with the segments built, for adapters of ``ranks`` (r_k <= v's R):
    the flat ``(Σ r_k·P,)`` buffer of ``dtype`` holding each adapter's C_k without padding (``multi_factors``)."""
    (n, P), R, num_adapters = u.shape, v.shape[1], scalings.shape[0]
    rank_pad = rank_block(R)
    out = torch.empty(sum(ranks) * P, dtype=dtype, device=u.device)
    if n == 0:
        return out.zero_()
    chunks: RowChunks = segments.chunks
    if chunk_rows is not None and chunk_rows != chunks.chunk_rows:
        chunks = row_chunks(segments.bounds, n, chunk_rows)
    shape = (R, P) if transpose else (P, R)
    partial = torch.empty(chunks.num_chunks, *shape, dtype=torch.float32, device=u.device)
    # The kernel writes (P, R) tiles: a transposed view of the partials puts them as (R, P).
    partial_pr = partial.transpose(1, 2) if transpose else partial

    def grid(meta):
        return (triton.cdiv(P, meta["BLOCK_P"]), chunks.num_chunks)

    has_dropout = dropout is not None
    args = (
        u, v, scalings, dropout if has_dropout else scalings, segments.order, segments.bounds,
        chunks.chunk_adapter, chunks.chunk_bounds, partial_pr,
        P, R, int(seed), chunks.chunk_rows,
        *u.stride(), *v.stride(), scalings.stride(0), dropout.stride(0) if has_dropout else 0, *partial_pr.stride(),
        token_bucket(n),
        has_dropout, rank_pad, dot_precision(u.dtype),
    )  # fmt: skip
    launch(multi_lora_weight_grad_kernel, multi_lora_weight_grad_tuned, grid, args, config)
    block_p = max(1, _SUM_TILE // rank_pad)
    chunk_sum_kernel[(triton.cdiv(P, block_p), num_adapters)](
        partial_pr, chunks.chunk_bounds, grad_layout(ranks, P, u.device), out, P, *partial_pr.stride(),
        TRANSPOSE=transpose, R_PAD=rank_pad, BLOCK_P=block_p,
    )  # fmt: skip
    return out
