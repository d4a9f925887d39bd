"""The LoRA shrink kernel: ``xa = (x ⊙ keep / (1 - p))·Aᵀ`` (``x·Aᵀ`` at p = 0), keep from ``dropout_mask``.

x ``(M, K)``, A ``(R, K)`` (any strides: ``dY·B`` is this with A = Bᵀ), xa ``(M, R)``. One program per
``BLOCK_M`` rows reads x once, masks it in registers and accumulates an fp32 ``(BLOCK_M, R_PAD)`` tile
(memory-bound), so the fused GEMM gets the rank-R projection once per row, not once per output column tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
from .shared_memory import SmallTiles, on_device


def _config(bm, bk, stages, warps) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_stages=stages, num_warps=warps)


# For large ranks, whose (BLOCK_K, R_PAD) tiles of Aᵀ outgrow an RTX card (2-byte) or an A100 (4-byte).
SMALL_TILES = SmallTiles((_config(64, 32, 3, 4), _config(64, 32, 2, 4)))


def _configs() -> list[triton.Config]:
    shapes = [(64, 128, 3, 4), (128, 64, 3, 4), (64, 64, 4, 4), (32, 128, 3, 4)]
    return [_config(*shape) for shape in shapes] + list(SMALL_TILES.configs)


@triton.jit(do_not_specialize=["seed", "M_BUCKET"])
def dropout_xa_kernel(
    x_ptr, a_ptr, xa_ptr,
    M, K, R, M_BUCKET,
    seed, p, keep_scale,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_xam, stride_xar,
    DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    m_mask = offs_m < M
    r_mask = offs_r < R
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    at_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if DROPOUT:
            keep = keep_mask(seed, offs_m, k0, BLOCK_K, p)
            x = tl.where(keep, x.to(tl.float32) * keep_scale, 0.0).to(x.dtype)
        at = tl.load(at_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = dot(x, at, acc, DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        at_ptrs += BLOCK_K * stride_ak
    xa_ptrs = xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar
    tl.store(xa_ptrs, acc.to(xa_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])


dropout_xa_tuned = triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "K", "R_PAD", "DROPOUT"],
    prune_configs_by={"early_config_prune": on_device(skinny_prune("x_ptr", "BLOCK_K", SMALL_TILES, projection_tiles))},
    cache_results=True,
)(dropout_xa_kernel)


def lora_project(
    x: torch.Tensor, lora_A: torch.Tensor, p: float = 0.0, seed: int = 0, config: triton.Config | None = None
) -> torch.Tensor:
    """x ``(M, K)``, lora_A ``(R, K)`` (any strides, checked), p in [0, 1) -> ``drop(x)·Aᵀ`` ``(M, R)``."""
    M, K = x.shape
    R = lora_A.shape[0]
    xa = torch.empty(M, R, dtype=x.dtype, device=x.device)
    if M == 0:
        return xa

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]),)

    args = (
        x, lora_A, xa, M, K, R, token_bucket(M), int(seed), float(p), 1.0 / (1.0 - p),
        *x.stride(), *lora_A.stride(), *xa.stride(), p > 0.0, rank_block(R), dot_precision(x.dtype),
    )  # fmt: skip
    launch(dropout_xa_kernel, dropout_xa_tuned, grid, args, config)
    return xa


def dropout_xa(
    x: torch.Tensor, lora_A: torch.Tensor, p: float, seed: int, config: triton.Config | None = None
) -> torch.Tensor:
    """``drop(x)·Aᵀ``: x ``(M, K)``, lora_A ``(R, K)``, drop probability p in (0, 1) -> ``(M, R)``."""
    check_input("x", x)
    K = x.shape[1]
    R = lora_A.shape[0]
    check_tensor("lora_A", lora_A, (R, K), x)
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability {p} must be in (0, 1) here")
    return lora_project(x, lora_A, p, seed, config)
