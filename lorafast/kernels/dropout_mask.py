"""Dropout keep mask of the LoRA branch, regenerated from a seed wherever it is needed, never stored.

``keep(m, k) = philox(seed; k // 4, m, 0, 0)[k % 4] >= p·2³²`` (one Philox-4x32-10 call per four columns): a
pure function of the seed and element (m, k), whatever the width, strides, tiling or kernel, so the shrink
kernel, the dX GEMM, dA and their mixed-adapter forms all regenerate the same mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .entry import device_guard
from .launch import check_device


@triton.jit
def keep_mask(seed, offs_m, col_start, BLOCK_COLS: tl.constexpr, p):
    """``(BM, BLOCK_COLS)`` keep mask of rows ``offs_m`` and columns ``col_start + arange(BLOCK_COLS)`` (both ×4)."""
    quads = (col_start // 4 + tl.arange(0, BLOCK_COLS // 4)).to(tl.uint32)
    zeros = tl.zeros((offs_m.shape[0], BLOCK_COLS // 4), dtype=tl.uint32)
    c0 = quads[None, :] + zeros
    c1 = offs_m.to(tl.uint32)[:, None] + zeros
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zeros, zeros)
    # P(r >= threshold) = 1 - p for a uniform 32-bit r; p·2³² is exact in fp32 and below 2³².
    threshold = (tl.to_tensor(p).to(tl.float32) * 4294967296.0).to(tl.uint32)
    # Column 4j + t takes output t of quad j: join to (BM, Q, 2, 2) indexed [t // 2, t % 2], then flatten.
    pairs_even = tl.join(r0 >= threshold, r2 >= threshold)
    pairs_odd = tl.join(r1 >= threshold, r3 >= threshold)
    return tl.reshape(tl.join(pairs_even, pairs_odd), (offs_m.shape[0], BLOCK_COLS))


@triton.jit(do_not_specialize=["seed"])
def _keep_mask_kernel(out_ptr, seed, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = keep_mask(seed, offs_m, tl.program_id(1) * BLOCK_K, BLOCK_K, p)
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def dropout_keep_mask(seed: int, shape: tuple[int, int], p: float, device="cuda") -> torch.Tensor:
    """The kernels' bool ``(M, K)`` keep mask for ``seed``, materialised (tests and debugging)."""
    M, K = shape
    check_device("mask", device)
    out = torch.empty(M, K, dtype=torch.int8, device=device)
    grid = (triton.cdiv(M, 64), triton.cdiv(K, 64))
    with device_guard(out.device):
        _keep_mask_kernel[grid](out, seed, M, K, float(p), BLOCK_M=64, BLOCK_K=64)
    return out.bool()
