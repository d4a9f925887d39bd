"""Fused LoRA linear forward: ``y = x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ`` in one pass over x.

Shapes: x ``(M, K)``, W0 ``(N, K)``, b ``(N,)``, A ``(R, K)``, B ``(N, R)``, y ``(M, N)``,
xa ``(M, R)``; s is a runtime scalar (a new alpha does not recompile).

Each program owns a ``(BLOCK_M, BLOCK_N)`` tile of y. Every x tile it loads feeds both
``x·W0ᵀ`` and ``x·Aᵀ`` (fp32 accumulators); after the K loop the rank-R product with the
tile's columns of B is added, with the bias, before the tile is written. The programs of
column 0 also write ``xa = x·Aᵀ`` for backward. With LoRA dropout, xa is computed beforehand
by ``dropout_xa`` (regenerating the mask in every column tile would cost more than the one
extra read of x) and passed in; the kernel then only applies it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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


@triton.jit
def fused_lora_forward_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, xa_ptr, y_ptr,
    M, N, K, R,
    scaling,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_xam, stride_xar, stride_ym, stride_yn, stride_bias,
    HAS_BIAS: tl.constexpr, XA_GIVEN: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    m_mask = offs_m < M
    n_mask = offs_n < N
    r_mask = offs_r < R

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    wt_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    at_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(wt_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = dot(x, wt, acc, DOT_PRECISION)
        if not XA_GIVEN:
            at = tl.load(at_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            xa_acc = dot(x, at, xa_acc, DOT_PRECISION)
            at_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        wt_ptrs += BLOCK_K * stride_wk

    xa_ptrs = xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar
    xa_mask = m_mask[:, None] & r_mask[None, :]
    if XA_GIVEN:
        xa = tl.load(xa_ptrs, mask=xa_mask, other=0.0)
    else:
        xa = xa_acc.to(xa_ptr.dtype.element_ty)
        if pid_n == 0:
            tl.store(xa_ptrs, xa, mask=xa_mask)
    bt = tl.load(
        b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
        mask=r_mask[:, None] & n_mask[None, :],
        other=0.0,
    )
    acc += scaling * dot(xa, bt, None, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


fused_lora_forward_tuned = triton.autotune(
    configs=gemm_configs(), key=["N", "K", "R_PAD", "XA_GIVEN"], prune_configs_by={"early_config_prune": prune_for_rank}
)(fused_lora_forward_kernel)


def fused_lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    xa: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused forward.

    Args:
        x: ``(M, K)``, any strides.
        weight: W0 ``(N, K)``; bias: ``(N,)`` or None.
        lora_A: ``(R, K)``; lora_B: ``(N, R)``; scaling: s = alpha / r.
        xa: precomputed ``drop(x)·Aᵀ`` ``(M, R)`` (dropout); None computes ``x·Aᵀ`` in the pass.
        config: pin one of the kernel's configs (tests); None autotunes on CUDA.

    Returns:
        ``(y, xa)``: y ``(M, N)`` and xa ``(M, R)``, both in x's dtype.
    """
    check_input("x", x)
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    check_tensor("weight", weight, (N, K), x)
    check_tensor("lora_A", lora_A, (R, K), x)
    check_tensor("lora_B", lora_B, (N, R), x)
    if bias is not None:
        check_tensor("bias", bias, (N,), x)
    xa_given = xa is not None
    if xa_given:
        check_tensor("xa", xa, (M, R), x)
    else:
        xa = torch.empty(M, R, dtype=x.dtype, device=x.device)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y, xa

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    args = (
        x, weight, bias if bias is not None else weight, lora_A, lora_B, xa, y,
        M, N, K, R,
        float(scaling),
        *x.stride(), *weight.stride(), *lora_A.stride(), *lora_B.stride(), *xa.stride(), *y.stride(),
        bias.stride(0) if bias is not None else 0,
        bias is not None, xa_given, rank_block(R), dot_precision(x.dtype),
    )  # fmt: skip
    launch(fused_lora_forward_kernel, fused_lora_forward_tuned, grid, args, config)
    return y, xa
