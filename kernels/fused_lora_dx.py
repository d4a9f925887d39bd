"""Fused LoRA input gradient: ``dX = dY·W0 + (keep / (1 - p)) ⊙ [s·(dY·B)·A]`` in one pass over dY.

Shapes: dY ``(M, N)``, W0 ``(N, K)``, B ``(N, R)``, A ``(R, K)``, dX ``(M, K)``,
g = dY·B ``(M, R)``; keep is the forward's dropout mask (all ones when p = 0).

Each program owns a ``(BLOCK_M, BLOCK_K)`` tile of dX. Every dY tile it loads feeds both
``dY·W0`` and ``dY·B`` (fp32 accumulators); after the N loop the rank-R product with the
tile's columns of A is added (masked and rescaled under dropout, the mask regenerated from
the seed for just this tile) before the tile is written. The programs of column 0 also
write g for the ``dA`` reduction. ``dW0`` is never formed.
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
    gemm_configs,
    grouped_tile,
    launch,
    prune_for_rank,
    rank_block,
)


@triton.jit(do_not_specialize=["seed"])
def fused_lora_dx_kernel(
    dy_ptr, w_ptr, a_ptr, b_ptr, g_ptr, dx_ptr,
    M, N, K, R,
    lora_scale, seed, p,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_gm, stride_gr, stride_dxm, stride_dxk,
    DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # The output tile is (BLOCK_M, BLOCK_N) over dX's (M, K): BLOCK_N tiles dX's columns (K)
    # and BLOCK_K the reduction over dY's columns (N), as in the forward's configs.
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    m_mask = offs_m < M
    k_mask = offs_k < K
    r_mask = offs_r < R

    dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    g_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        n_mask = offs_n < N - n0
        dy = tl.load(dy_ptrs, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        acc = dot(dy, w, acc, DOT_PRECISION)
        g_acc = dot(dy, b, g_acc, DOT_PRECISION)
        dy_ptrs += BLOCK_K * stride_dyn
        w_ptrs += BLOCK_K * stride_wn
        b_ptrs += BLOCK_K * stride_bn

    g = g_acc.to(g_ptr.dtype.element_ty)
    g_ptrs = g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr
    if pid_k == 0:
        tl.store(g_ptrs, g, mask=m_mask[:, None] & r_mask[None, :])
    a = tl.load(
        a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
        mask=r_mask[:, None] & k_mask[None, :],
        other=0.0,
    )
    lora = lora_scale * dot(g, a, None, DOT_PRECISION)
    if DROPOUT:
        lora = tl.where(keep_mask(seed, offs_m, offs_k, K, p), lora, 0.0)
    acc += lora
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :])


fused_lora_dx_tuned = triton.autotune(
    configs=gemm_configs(), key=["N", "K", "R_PAD", "DROPOUT"], prune_configs_by={"early_config_prune": prune_for_rank}
)(fused_lora_dx_kernel)


def fused_lora_dx(
    grad_y: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    config: triton.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused input gradient.

    Args:
        grad_y: dY ``(M, N)``, any strides.
        weight: W0 ``(N, K)``; lora_A: ``(R, K)``; lora_B: ``(N, R)``; scaling: s = alpha / r.
        dropout_p, seed: the forward's LoRA dropout (p = 0: none).
        config: pin one of the kernel's configs (tests); None autotunes on CUDA.

    Returns:
        ``(dx, g)``: dX ``(M, K)`` and ``g = dY·B`` ``(M, R)``, both in dY's dtype.
    """
    check_input("grad_y", grad_y)
    M, N = grad_y.shape
    K, R = weight.shape[1], lora_A.shape[0]
    check_tensor("weight", weight, (N, K), grad_y)
    check_tensor("lora_A", lora_A, (R, K), grad_y)
    check_tensor("lora_B", lora_B, (N, R), grad_y)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout probability {dropout_p} must be in [0, 1)")
    g = torch.empty(M, R, dtype=grad_y.dtype, device=grad_y.device)
    dx = torch.empty(M, K, dtype=grad_y.dtype, device=grad_y.device)
    if M == 0:
        return dx, g

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)

    args = (
        grad_y, weight, lora_A, lora_B, g, dx,
        M, N, K, R,
        float(scaling) / (1.0 - dropout_p), int(seed), float(dropout_p),
        *grad_y.stride(), *weight.stride(), *lora_A.stride(), *lora_B.stride(), *g.stride(), *dx.stride(),
        dropout_p > 0.0, rank_block(R), dot_precision(grad_y.dtype),
    )  # fmt: skip
    launch(fused_lora_dx_kernel, fused_lora_dx_tuned, grid, args, config)
    return dx, g
