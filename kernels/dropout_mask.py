"""Dropout keep mask of the LoRA branch, regenerated from a seed wherever it is needed.

``keep(m, k) = philox(seed; k // 4, m, 0, 0)[k % 4] >= p·2³²`` for element (m, k) of an input:
one 32-bit Philox-4x32-10 call per four columns of a row, all four outputs used. A pure
function of the seed and the element's logical position (row, column), independent of the
input's width, strides, tiling and kernel, so every kernel that needs the mask (the shrink
kernel, the dX GEMM, dA, and their mixed-adapter forms) regenerates the same one and nothing
is stored between them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import check_device


@triton.jit
def keep_mask(seed, offs_m, col_start, BLOCK_COLS: tl.constexpr, p):
    """Keep mask (True = kept) for rows ``offs_m`` (BM,) and the columns ``col_start + arange(BLOCK_COLS)``.

    Returns ``(BM, BLOCK_COLS)``; col_start must be a multiple of 4 and BLOCK_COLS of 4.
    """
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
    """Materialise the keep mask the kernels use for ``seed``: bool ``(M, K)``.

    For tests and debugging; the kernels never store it.
    """
    M, K = shape
    check_device("mask", device)
    out = torch.empty(M, K, dtype=torch.int8, device=device)
    grid = (triton.cdiv(M, 64), triton.cdiv(K, 64))
    _keep_mask_kernel[grid](out, seed, M, K, float(p), BLOCK_M=64, BLOCK_K=64)
    return out.bool()
