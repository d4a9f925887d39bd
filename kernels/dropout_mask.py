"""Dropout keep mask of the LoRA branch, regenerated from a seed wherever it is needed.

``keep(m, k) = philox_uniform(seed, m·K + k) >= p`` for element (m, k) of a ``(M, K)`` input:
a pure function of the seed and the element's logical position, independent of strides,
tiling and kernel, so the forward kernel and both backward kernels regenerate the same mask
and nothing is stored between them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import check_device


@triton.jit
def keep_mask(seed, offs_m, offs_k, K, p):
    """Keep mask (True = kept) for rows ``offs_m`` (BM,) and columns ``offs_k`` (BK,) -> (BM, BK)."""
    offsets = offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    return tl.rand(seed, offsets) >= p


@triton.jit(do_not_specialize=["seed"])
def _keep_mask_kernel(out_ptr, seed, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = keep_mask(seed, offs_m, offs_k, K, p)
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def dropout_keep_mask(seed: int, shape: tuple[int, int], p: float, device="cuda") -> torch.Tensor:
    """Materialise the keep mask the kernels use for ``seed``: bool ``(M, K)``.

    For tests and debugging; the kernels never store it.
    """
    M, K = shape
    check_device("mask", device)
    out = torch.empty(M, K, dtype=torch.int8, device=device)
    grid = (triton.cdiv(M, 64), triton.cdiv(K, 64))
    _keep_mask_kernel[grid](out, seed, M, K, float(p), BLOCK_M=64, BLOCK_K=64)
    return out.bool()
