"""LoRA weight gradients as one skinny reduction over the M tokens: ``C = s·(U ⊙ keep)ᵀ·V``.

U ``(M, P)``, V ``(M, R)``, C ``(P, R)``: ``dA = s/(1-p)·gᵀ·(x ⊙ keep)`` (U = x, V = g = dY·B, C = dAᵀ, keep the
forward's mask) and ``dB = s·dYᵀ·xa`` (U = dY, V = xa). Grid ``(P / BLOCK_P, SPLIT)``: each program reduces
``M / SPLIT`` tokens of ``BLOCK_P`` columns in fp32. One slab is the result, written through C's strides (dA
as ``(R, P)``, no transposing copy); more are summed in a fixed order afterwards (deterministic, no atomics).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .dropout_mask import keep_mask
from .launch import (
    INTERPRETED,
    check_input,
    check_tensor,
    dot,
    dot_precision,
    launch,
    rank_block,
    skinny_prune,
    token_bucket,
    weight_grad_tiles,
)
from .shared_memory import SmallTiles, on_device


def _config(bm, bp, stages, warps) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_P": bp}, num_stages=stages, num_warps=warps)


# For large ranks, whose (BLOCK_M, R_PAD) tiles of V outgrow an RTX card (2-byte) or an A100 (4-byte).
SMALL_TILES = SmallTiles((_config(32, 64, 3, 4), _config(32, 64, 2, 4)))


def _configs() -> list[triton.Config]:
    shapes = [(64, 128, 3, 4), (128, 64, 3, 4), (64, 64, 4, 4), (128, 128, 3, 8)]
    return [_config(*shape) for shape in shapes] + list(SMALL_TILES.configs)


prune = skinny_prune("u_ptr", "BLOCK_P", SMALL_TILES, weight_grad_tiles)


@triton.jit(do_not_specialize=["seed", "M_BUCKET"])
def lora_weight_grad_kernel(
    u_ptr, v_ptr, partial_ptr,
    M, P, R, rows_per_split, M_BUCKET,
    scale, seed, p,
    stride_um, stride_up, stride_vm, stride_vr, stride_cs, stride_cp, stride_cr,
    DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    pid_p = tl.program_id(0)
    split = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.arange(0, R_PAD)
    p_mask = offs_p < P
    r_mask = offs_r < R
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_P, R_PAD), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_mask = offs_m < m_end
        u = tl.load(
            u_ptr + offs_m[:, None] * stride_um + offs_p[None, :] * stride_up,
            mask=m_mask[:, None] & p_mask[None, :],
            other=0.0,
        )
        if DROPOUT:
            u = tl.where(keep_mask(seed, offs_m, pid_p * BLOCK_P, BLOCK_P, p), u, 0.0)
        v = tl.load(
            v_ptr + offs_m[:, None] * stride_vm + offs_r[None, :] * stride_vr,
            mask=m_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        acc = dot(tl.trans(u), v, acc, DOT_PRECISION)
    c_ptrs = partial_ptr + split * stride_cs + offs_p[:, None] * stride_cp + offs_r[None, :] * stride_cr
    tl.store(c_ptrs, (acc * scale).to(partial_ptr.dtype.element_ty), mask=p_mask[:, None] & r_mask[None, :])


lora_weight_grad_tuned = triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "P", "R_PAD", "DROPOUT"],
    prune_configs_by={"early_config_prune": on_device(prune)},
    cache_results=True,
)(lora_weight_grad_kernel)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_count(M: int, p_tiles: int, device: torch.device) -> int:
    """Token slabs so that the grid fills the GPU about twice (2 slabs in the interpreter)."""
    if INTERPRETED:
        return min(2, max(1, M // 16))
    programs = 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(programs, p_tiles), triton.cdiv(M, 256)))


def lora_weight_grad(
    u: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    split: int | None = None,
    config: triton.Config | None = None,
    transpose: bool = False,
) -> torch.Tensor:
    """u ``(M, P)``, v ``(M, R)`` -> ``(P, R)`` in u's dtype, or contiguous ``(R, P)`` with ``transpose`` (dA);
    ``dropout_p > 0`` masks U with ``seed``'s mask; ``split`` (token slabs) and ``config`` pin the launch (tests)."""
    check_input("u", u)
    check_tensor("v", v, (u.shape[0], v.shape[1]), u)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout probability {dropout_p} must be in [0, 1)")
    return weight_grad(u, v, scale, dropout_p, seed, split, config, transpose)


def weight_grad(u, v, scale, dropout_p=0.0, seed=0, split=None, config=None, transpose=False):
    """:func:`lora_weight_grad` unchecked."""
    (M, P), R = u.shape, v.shape[1]
    shape = (R, P) if transpose else (P, R)
    if M == 0:
        return torch.zeros(shape, dtype=u.dtype, device=u.device)
    if split is None:
        split = _split_count(M, triton.cdiv(P, 64), u.device)
    rows_per_split = triton.cdiv(M, split)
    # One slab writes the result itself; more write fp32 partials, summed in order below.
    out = torch.empty((split, *shape), dtype=torch.float32 if split > 1 else u.dtype, device=u.device)
    out_pr = out.transpose(1, 2) if transpose else out  # the kernel writes (P, R) tiles

    def grid(meta):
        return (triton.cdiv(P, meta["BLOCK_P"]), split)

    args = (
        u, v, out_pr, M, P, R, rows_per_split, token_bucket(rows_per_split), float(scale), int(seed), float(dropout_p),
        *u.stride(), *v.stride(), *out_pr.stride(),
        dropout_p > 0.0, rank_block(R), dot_precision(u.dtype),
    )  # fmt: skip
    launch(lora_weight_grad_kernel, lora_weight_grad_tuned, grid, args, config)
    return out[0] if split == 1 else out.sum(0).to(u.dtype)
