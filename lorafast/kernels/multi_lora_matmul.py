"""Mixed-adapter fused LoRA matmul: ``C_i = U_i·V + b + s_k·keep_i ⊙ ((U_i·P_k)·Q_k)`` with ``k = adapter[i]``.

Shapes: U ``(M, K)``, V ``(K, N)``, per adapter P_k ``(K, r_k)`` and Q_k ``(r_k, N)``, read in place through the
factor table of ``multi_factors`` (each adapter's own pointer, strides and rank; no stacked copy), scalings s ``(A,)``
and dropout p ``(A,)`` float32 for A adapters (runtime values, p_k in [0, 1)), b ``(N,)``, C ``(M, N)``, UP ``(M, R)``
(R the largest rank) with ``UP_i = U_i·P_k`` (zeros past r_k, and where k = −1: those rows get ``U_i·V + b`` only).
keep is adapter k's dropout mask of C's positions (``dropout_mask.keep_mask`` with p_k, row i's index in U), or all
ones. Both big products of the mixed-adapter LoRA linear have this form, with ``drop(x)_i = x_i ⊙ keep_i / (1 − p_k)``:
- forward ``y = x·W0ᵀ + b + s_k·(drop(x)_i·A_kᵀ)·B_kᵀ``: U = x, V = W0ᵀ, P = Aᵀ, Q = Bᵀ, UP = xa, no mask on C.
  Under dropout the rows of adapters with p_k > 0 read their UP = ``drop(x)_i·A_kᵀ``, written before by
  ``multi_dropout_xa``; the others compute it here;
- input gradient ``dX_i = dY_i·W0 + s_k/(1 − p_k)·keep_i ⊙ ((dY_i·B_k)·A_k)``: U = dY, V = W0, P = B, Q = A, UP = g,
  keep over C = dX (regenerated from the seed, never stored).

Rows are gathered through the block table of ``adapter_segments`` (built for the kernel's fixed ``BLOCK_M``): program
row block j owns the rows ``block_rows[j·BLOCK_M:(j+1)·BLOCK_M]`` (−1: padding), all of adapter ``block_adapter[j]``,
and one ``BLOCK_N`` column tile of C. As in ``fused_lora_matmul``, each U tile it loads feeds both U·V and U·P_k;
after the K loop the rank-r_k product with the tile's columns of Q_k, scaled by s_k, is added with the bias and the tile
is scattered back to its rows. The programs of column tile 0 also write UP. Blocks of base rows (k = −1) skip the LoRA
products; blocks past the last segment exit at once. p_k and s_k are per-program scalars loaded for the block's
adapter; an adapter with p_k = 0 gets exactly the result without dropout.

Its cuBLAS twin (:func:`cublas_multi_lora_matmul`) takes every row's UP from a launch without C (``up_given``: no K
loop for U·P_k) and runs the kernel with K = 0 for ``s_k·keep_i ⊙ (UP_i·Q_k) + b`` alone, then lets cuBLAS add U·V in
place; :mod:`.gemm_choice` measures both on CUDA and keeps the faster per shape (:func:`chosen_multi_matmul`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adapter_segments import BLOCK_M, UNUSED_BLOCK, AdapterSegments, check_dropout, check_row_ids, resolve_segments
from .dropout_mask import keep_mask
from .gemm_choice import choose_path, gemm_key
from .launch import (
    SMALL_GEMM_TILES,
    check_input,
    check_tensor,
    dot,
    dot_precision,
    epilogue_config,
    gemm_configs,
    grouped_tile,
    launch,
    rank_block,
    rank_suited,
    snug_tiles,
    token_bucket,
)
from .multi_dropout_xa import launch_multi_dropout_xa
from .multi_factors import A_COL, B_COL, RANK_COL, TABLE_WIDTH, factor_pointer, stacked_factors
from .shared_memory import DEFAULT_SHARED_MEMORY, SmallTiles, config_key, fitting, on_device, shared_memory_need

# Rows per program: BLOCK_M (from adapter_segments); the block table is built for it, so every config keeps it.
_UNUSED_BLOCK = tl.constexpr(UNUSED_BLOCK)
_TABLE_WIDTH = tl.constexpr(TABLE_WIDTH)
_RANK_COL = tl.constexpr(RANK_COL)


def _config(bn, bk, stages, warps) -> triton.Config:
    kwargs = {"BLOCK_M": BLOCK_M, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
    return triton.Config(kwargs, num_stages=stages, num_warps=warps)


# For 4-byte inputs at large ranks, whose (BLOCK_M, R_PAD) UP and (BLOCK_K, R_PAD) P_k tiles outgrow an RTX card:
# kept only where no regular tile fits (``_prune``).
SMALL_TILES = SmallTiles((_config(32, 16, 2, 4), _config(16, 16, 2, 4)))


def _configs() -> list[triton.Config]:
    """``gemm_configs()`` (without its own small tiles) with BLOCK_M pinned to the block table's, duplicates
    dropped, then ``SMALL_TILES``.

    The first, run when not autotuning (the others in order where it does not fit), is the
    ``(BLOCK_M, 128, 32)`` tile, the narrowest K step of the 128-wide ones.
    """
    configs = {}
    # + 64×64 tiles for 4-byte inputs from rank 64 (see _prune): 8 warps (the dX mask), 3 stages
    extra = [_config(64, 32, s, w) for s in (3, 4) for w in (4, 8)]
    for c in [*SMALL_GEMM_TILES.split(gemm_configs())[0], *extra]:
        pinned = _config(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps)
        configs.setdefault(config_key(pinned), pinned)
    ordered = sorted(configs.values(), key=lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) != (128, 32))
    return ordered + list(SMALL_TILES.configs)


def _shared_memory(config: triton.Config, element_size: int, named_args: dict, shared_limit: int) -> int:
    """:func:`.shared_memory.shared_memory_need` of a config: U, V (with C) and P_k (unless UP is given) tiles in
    the main loop; UP ``(BLOCK_M, R_PAD)`` and Q_k ``(R_PAD, BLOCK_N)`` in the epilogue (with C)."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    r_pad = named_args.get("R_PAD", 16)
    write_c = named_args.get("WRITE_C", True)
    loop = [(bm, bk)] + [(bk, bn)] * write_c + [(bk, r_pad)] * (not named_args.get("UP_GIVEN", False))
    epilogue = [(bm, r_pad), (r_pad, bn)] if write_c else []
    return shared_memory_need(config, element_size, loop, epilogue, shared_limit)


def _prune(configs, named_args, shared_limit=DEFAULT_SHARED_MEMORY):
    """``prune_for_rank``'s rules, and from rank 64 with 4-byte inputs 64×64×32 tiles only (8 warps
    when dX draws a mask, 3 stages when the forward reads the dropped rows' xa or the adapters'
    ranks differ): the (BLOCK_M, R_PAD) accumulator of U·P_k sits beside the output's in the K
    loop. Of those, the ones that fit ``shared_limit``, else the ``SMALL_TILES`` that fit
    (``bench/kernel_report.py --arch`` checks every kept config offline)."""
    u = named_args.get("u_ptr")
    element_size = u.element_size() if isinstance(u, torch.Tensor) else 2
    regular, small = SMALL_TILES.split(configs)
    narrow = []
    if element_size == 4 and named_args.get("R_PAD", 16) >= 64:
        warps = 8 if named_args.get("DROPOUT_C", False) else 4  # the mask drawn beside both accumulators
        # the factor table's values beside the xa branch, or the adapter's own rank
        stages = 3 if named_args.get("DROPOUT_UP", False) or not named_args.get("EQUAL_RANKS", True) else 4
        narrow = [
            c
            for c in regular
            if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) == (64, 32, warps, stages)
        ]

    def need(config):
        return _shared_memory(config, element_size, named_args, shared_limit)

    if narrow:
        return fitting(narrow, small, need, shared_limit)
    return snug_tiles(fitting(rank_suited(regular, named_args), small, need, shared_limit), named_args)


@triton.jit
def _k_loop(
    u_ptrs, v_ptrs, p_ptrs, m_mask, n_mask, r_mask, K, stride_uk, stride_vk, stride_pk,
    BASE: tl.constexpr, LORA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
):  # fmt: skip
    """``(U·V, U·P)`` of one row block in fp32, each computed only if BASE / LORA, in one pass over U."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        u = tl.load(u_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if BASE:
            v = tl.load(v_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = dot(u, v, acc, DOT_PRECISION)
            v_ptrs += BLOCK_K * stride_vk
        if LORA:
            pk = tl.load(p_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0).to(u.dtype)
            up_acc = dot(u, pk, up_acc, DOT_PRECISION)
            p_ptrs += BLOCK_K * stride_pk
        u_ptrs += BLOCK_K * stride_uk
    return acc, up_acc


@triton.jit(do_not_specialize=["seed", "M_BUCKET"])
def multi_lora_matmul_kernel(
    u_ptr, v_ptr, table_ptr, factor_ptr, bias_ptr, scale_ptr, dropout_ptr, block_adapter_ptr, block_rows_ptr, up_ptr,
    c_ptr, num_blocks, N, K, R, seed,
    stride_um, stride_uk, stride_vk, stride_vn, stride_upm, stride_upr, stride_cm, stride_cn, stride_bias,
    stride_scale, stride_dropout, M_BUCKET,
    P_COL: tl.constexpr, Q_COL: tl.constexpr, UNIT_STRIDE: tl.constexpr, ALIGNED: tl.constexpr,
    EQUAL_RANKS: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_C: tl.constexpr, DROPOUT_UP: tl.constexpr,
    DROPOUT_C: tl.constexpr, UP_GIVEN: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    if WRITE_C:
        pid_m, pid_n = grouped_tile(tl.program_id(0), num_blocks * BLOCK_M, N, BLOCK_M, BLOCK_N, GROUP_M)
    else:  # UP only: one program per row block
        pid_m = tl.program_id(0)
        pid_n = 0
    adapter = tl.load(block_adapter_ptr + pid_m)
    if adapter == _UNUSED_BLOCK:
        return
    rows = tl.load(block_rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    m_mask = rows >= 0
    n_mask = offs_n < N
    lora = tl.maximum(adapter, 0)  # int32: it only indexes K-long tables
    # adapter k's own P_k and Q_k, through the factor table (multi_factors): pointer, stride over r, over features
    # the adapter's rank: R itself where every r_k = R, else read (ranks r_k..R-1 then read rank r_k − 1, so no
    # rank mask is kept live in the K loop; their U·P_k is zeroed after it)
    rank = R if EQUAL_RANKS else tl.load(table_ptr + lora * _TABLE_WIDTH + _RANK_COL).to(tl.int32)
    # A's in_features: K where A is P (forward), N where A is Q (dX)
    p_base, stride_pr, stride_pk = factor_pointer(table_ptr, lora, P_COL, factor_ptr, K, rank, UNIT_STRIDE, ALIGNED)
    r_mask = offs_r < R
    if EQUAL_RANKS:
        p_ptrs = p_base + offs_k[:, None] * stride_pk + offs_r[None, :] * stride_pr
    else:
        p_ptrs = p_base + offs_k[:, None] * stride_pk + tl.minimum(offs_r, rank - 1)[None, :] * stride_pr

    u_ptrs = u_ptr + rows[:, None] * stride_um + offs_k[None, :] * stride_uk
    v_ptrs = v_ptr + offs_k[:, None] * stride_vk + offs_n[None, :] * stride_vn
    # U·P_k is computed here, except under DROPOUT_UP for adapters with p_k > 0: their UP is given.
    lora_here = adapter >= 0
    if DROPOUT_UP:
        lora_here = lora_here & (tl.load(dropout_ptr + lora * stride_dropout) == 0.0)
    if lora_here:
        acc, up_acc = _k_loop(
            u_ptrs, v_ptrs, p_ptrs, m_mask, n_mask, r_mask, K, stride_uk, stride_vk, stride_pk,
            WRITE_C, True, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, R_PAD,
        )  # fmt: skip
    elif WRITE_C:
        acc, up_acc = _k_loop(
            u_ptrs, v_ptrs, p_ptrs, m_mask, n_mask, r_mask, K, stride_uk, stride_vk, stride_pk,
            True, False, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, R_PAD,
        )  # fmt: skip
    else:  # base rows, UP only: zeros
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    if not EQUAL_RANKS:
        r_mask = offs_r < rank
        up_acc = tl.where(r_mask[None, :], up_acc, 0.0)

    up = up_acc.to(up_ptr.dtype.element_ty)
    up_ptrs = up_ptr + rows[:, None] * stride_upm + offs_r[None, :] * stride_upr
    up_mask = m_mask[:, None] & (offs_r < R)[None, :]
    if UP_GIVEN:  # every row's UP comes from before (the cuBLAS path's epilogue, K = 0)
        up = tl.load(up_ptrs, mask=up_mask, other=0.0)
    elif DROPOUT_UP:
        if lora_here | (adapter < 0):
            if pid_n == 0:
                tl.store(up_ptrs, up, mask=up_mask)
        else:  # drop(U)·P_k, from multi_dropout_xa
            up = tl.load(up_ptrs, mask=up_mask, other=0.0)
    elif pid_n == 0:
        tl.store(up_ptrs, up, mask=up_mask)
    if WRITE_C:
        if adapter >= 0:
            # Q_k: the other factor
            q_base, stride_qr, stride_qn = factor_pointer(
                table_ptr, lora, Q_COL, factor_ptr, N, rank, UNIT_STRIDE, ALIGNED
            )
            q = tl.load(
                q_base + offs_r[:, None] * stride_qr + offs_n[None, :] * stride_qn,
                mask=r_mask[:, None] & n_mask[None, :],
                other=0.0,
            ).to(up.dtype)
            scale = tl.load(scale_ptr + lora * stride_scale)
            if DROPOUT_C:
                p = tl.load(dropout_ptr + lora * stride_dropout)
                scale = scale / (1.0 - p)  # exactly s_k where p_k = 0
            low_rank = scale * dot(up, q, None, DOT_PRECISION)
            if DROPOUT_C:  # padding slots (row −1) draw for row 0, never stored
                keep = keep_mask(seed, tl.maximum(rows, 0), pid_n * BLOCK_N, BLOCK_N, p)
                low_rank = tl.where(keep, low_rank, 0.0)
            acc += low_rank
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


multi_lora_matmul_tuned = triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "N", "K", "R_PAD", "HAS_BIAS", "WRITE_C", "DROPOUT_UP", "DROPOUT_C", "UP_GIVEN"],
    prune_configs_by={"early_config_prune": on_device(_prune)},
    cache_results=True,
)(multi_lora_matmul_kernel)


def check_operands(u, weight, lora_A, lora_B, scalings, row_adapter, bias=None, dropout=None, seed=0, dx=False) -> int:
    """ValueError unless W0 ``(out, in)``, A ``(K, R, in)``, B ``(K, out, R)``, scalings, ids, bias ``(out,)`` and
    dropout fit u, x ``(n, in)`` or with ``dx`` dY ``(n, out)``; returns K."""
    check_input("grad_y" if dx else "x", u)
    if dx:
        out_features, in_features = u.shape[1], weight.shape[1] if weight.dim() == 2 else -1
    else:
        in_features, out_features = u.shape[1], weight.shape[0]
    check_tensor("weight", weight, (out_features, in_features), u)
    if bias is not None:
        check_tensor("bias", bias, (out_features,), u)
    if lora_A.dim() != 3:
        raise ValueError(f"lora_A must be 3-D stacked adapters (K, R, in), got shape {tuple(lora_A.shape)}")
    num_adapters, R = lora_A.shape[:2]
    rank_block(R)
    check_tensor("lora_A", lora_A, (num_adapters, R, in_features), u)
    check_tensor("lora_B", lora_B, (num_adapters, out_features, R), u)
    if check_row_ids(row_adapter, scalings, u.shape[0], u) != num_adapters:
        raise ValueError(f"scalings has {scalings.shape[0]} values but there are {num_adapters} stacked adapters")
    check_dropout(dropout, seed, num_adapters, u)
    return num_adapters


def multi_lora_matmul(
    u, v, factors, p_col, bias, scalings, segments, write_c, config, dropout=None, seed=0, dropout_up=False, up=None,
    up_given=False,
):  # fmt: skip
    """Unchecked launch of the kernel for U ``(M, K)``, V ``(K, N)`` (any strides) and the adapters ``factors``
    (:class:`AdapterFactors`): P_k is factor ``p_col`` (``A_COL``: Aᵀ, forward; ``B_COL``: B, dX), Q_k the other.

    ``dropout_up``: ``up`` holds the UP rows of the adapters with p_k > 0 (forward); otherwise,
    with ``dropout`` and ``write_c``, C's low-rank term is masked and scaled (dX). ``up_given``: ``up`` holds every
    row's UP (nothing of it is computed or written).
    Returns ``(C, UP)``; C is None unless ``write_c``; UP ``(M, R)``, R the largest rank.
    """
    M, K = u.shape
    N, R = v.shape[1], factors.rank
    if up is None:
        up = torch.empty(M, R, dtype=u.dtype, device=u.device)
    c = torch.empty(M, N, dtype=u.dtype, device=u.device) if write_c else None
    if M == 0:
        return c, up
    num_blocks = segments.num_blocks

    def grid(meta):
        return (num_blocks * (triton.cdiv(N, meta["BLOCK_N"]) if write_c else 1),)

    out = c if write_c else up
    has_dropout = dropout is not None
    args = (
        u, v, factors.table, factors.a_factors[0], bias if bias is not None else v, scalings,
        dropout if has_dropout else scalings, segments.block_adapter, segments.block_rows, up,
        out, num_blocks, N, K, R, int(seed),
        *u.stride(), *v.stride(), *up.stride(), *out.stride(),
        bias.stride(0) if bias is not None else 0, scalings.stride(0), dropout.stride(0) if has_dropout else 0,
        token_bucket(M),
        p_col, B_COL if p_col == A_COL else A_COL, factors.unit_stride, factors.aligned, factors.equal_ranks,
        bias is not None, write_c,
        has_dropout and dropout_up, has_dropout and write_c and not dropout_up, up_given,
        rank_block(R), dot_precision(u.dtype),
    )  # fmt: skip
    launch(multi_lora_matmul_kernel, multi_lora_matmul_tuned, grid, args, config)
    return c, up


def fused_multi_lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor,
    row_adapter: torch.Tensor,
    segments: AdapterSegments | None = None,
    config: triton.Config | None = None,
    dropout: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward in one pass over x (under dropout ``multi_dropout_xa`` first projects the rows of adapters with
    p_k > 0: a second, memory-bound pass over those rows) -> ``(y (n, out), xa (n, R))`` in x's dtype.

    Args:
        x: ``(n, in)``, any strides; weight: W0 ``(out, in)``; bias: ``(out,)`` or None.
        lora_A: ``(K, R, in)``; lora_B: ``(K, out, R)`` (adapters of lower rank zero-padded); read in place.
        scalings: ``(K,)`` float32, s_k = alpha_k / r_k; row_adapter: ``(n,)`` int64 (or int32) ids in [-1, K).
        segments: ``adapter_segments(row_adapter, K, BLOCK_M)`` if already built, else built here.
        config: pin one of the kernel's configs (tests); None autotunes on CUDA.
        dropout: None, or ``(K,)`` float32 p_k in [0, 1) on x's device (p_k = 0: exactly no dropout); seed: the
            dropout seed (``lorafast.dropout.draw_seed()``) of every adapter's masks.
    """
    num_adapters = check_operands(x, weight, lora_A, lora_B, scalings, row_adapter, bias, dropout, seed)
    segments = resolve_segments(segments, row_adapter, num_adapters, x.shape[0], x.device, config)
    factors = stacked_factors(lora_A, lora_B)
    return multi_forward(x, weight, bias, factors, scalings, segments, config, dropout, seed)


def cublas_multi_lora_matmul(u, v, factors, p_col, bias, scalings, segments, dropout, seed, up):
    """:func:`multi_lora_matmul`'s C from every row's given UP ``(M, R)``: the kernel at K = 0 writes
    ``s_k·keep_i ⊙ (UP_i·Q_k) + b`` (the same mask), then one cuBLAS GEMM adds U·V in place (beta = 1)."""
    config = epilogue_config(BLOCK_M, rank_block(factors.rank), u.element_size())  # K = 0: memory-bound, untuned
    c, _ = multi_lora_matmul(
        u[:, :0], v[:0], factors, p_col, bias, scalings, segments, True, config, dropout, seed, up=up,
        up_given=True,
    )  # fmt: skip
    return torch.addmm(c, u, v, out=c)


def chosen_multi_matmul(op, u, v, factors, p_col, bias, scalings, segments, config, dropout, seed, up, dropout_up):
    """``(C, UP)`` by the path :func:`.gemm_choice.choose_path` picks for ``op`` (a pinned ``config``: the fused
    kernel). The cuBLAS path first writes UP alone (the kernel without C), then the epilogue and U·V from it."""
    args = (u, v, factors, p_col, bias, scalings, segments)

    def fused():
        return multi_lora_matmul(*args, True, config, dropout, seed, dropout_up=dropout_up, up=up)

    def composite():
        multi_lora_matmul(*args, False, None, dropout, seed, dropout_up=dropout_up, up=up)
        epilogue_dropout = None if dropout_up else dropout  # the forward's mask is in xa, dX's on C
        return cublas_multi_lora_matmul(*args, epilogue_dropout, seed, up), up

    if config is not None or u.shape[0] == 0:
        return fused()
    candidates = {"triton": fused, "cublas": composite}
    key = gemm_key(op, u, v, up, bias, float(dropout is not None))  # p_k are runtime values: dropout or not
    return candidates[choose_path(key, candidates, u.device)]()


def multi_forward(x, weight, bias, factors, scalings, segments, config=None, dropout=None, seed=0):
    """:func:`fused_multi_lora_forward` unchecked, for :class:`AdapterFactors`, with the segments built."""
    xa = torch.empty(x.shape[0], factors.rank, dtype=x.dtype, device=x.device)
    if dropout is not None:
        launch_multi_dropout_xa(x, factors, dropout, seed, segments, xa, True, None)
    return chosen_multi_matmul(
        "multi_forward", x, weight.t(), factors, A_COL, bias, scalings, segments, config, dropout, seed, xa, True
    )


def multi_dx(grad_y, weight, factors, scalings, segments, config=None, dropout=None, seed=0):
    """:func:`fused_multi_lora_dx` with ``with_dx`` unchecked: ``(dX (n, in), g (n, R))``."""
    g = torch.empty(grad_y.shape[0], factors.rank, dtype=grad_y.dtype, device=grad_y.device)
    return chosen_multi_matmul(
        "multi_dx", grad_y, weight, factors, B_COL, None, scalings, segments, config, dropout, seed, g, False
    )


def fused_multi_lora_dx(
    grad_y: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor,
    row_adapter: torch.Tensor,
    with_dx: bool = True,
    segments: AdapterSegments | None = None,
    config: triton.Config | None = None,
    dropout: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The input gradient dX in one pass over dY ``(n, out)`` (any strides); the other arguments as in
    :func:`fused_multi_lora_forward`, ``dropout`` and ``seed`` the forward's (g does not depend on them).
    ``with_dx``: False computes only g (for dA when x needs no gradient), skipping dY·W0. Returns ``(dX (n, in) or
    None without with_dx, g (n, R))`` in dY's dtype, ``g_i = dY_i·B_k`` (zeros where k = −1).
    """
    num_adapters = check_operands(grad_y, weight, lora_A, lora_B, scalings, row_adapter, None, dropout, seed, True)
    segments = resolve_segments(segments, row_adapter, num_adapters, grad_y.shape[0], grad_y.device, config)
    factors = stacked_factors(lora_A, lora_B)
    if with_dx:
        return multi_dx(grad_y, weight, factors, scalings, segments, config, dropout, seed)
    return multi_lora_matmul(grad_y, weight, factors, B_COL, None, scalings, segments, False, config, dropout, seed)
