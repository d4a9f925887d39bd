"""Fused LoRA matmul ``C = U·V + b + s·keep ⊙ (UP·Q)`` in one pass over U: both big products of the LoRA linear.

Forward ``y = x·W0ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ``: U = x, V = W0ᵀ, UP = xa, Q = Bᵀ. Input gradient
``dX = dY·W0 + s/(1-p)·keep ⊙ ((dY·B)·A)``: U = dY, V = W0, UP = g = dY·B, Q = A. Shapes: U ``(M, K)``,
V ``(K, N)``, UP ``(M, R)``, Q ``(R, N)``, b ``(N,)``, C ``(M, N)``; s a runtime scalar (no recompile), keep the
mask of C's positions (``dropout_mask``) or ones. UP comes once per row from the shrink kernel; a program's one
fp32 ``(BLOCK_M, BLOCK_N)`` accumulator starts from ``s·UP·Q`` + b, then adds ``U·V`` over K (no second fp32 tile).

Its cuBLAS twin (:func:`cublas_lora_matmul`) runs the same kernel with K = 0 for the epilogue term alone, then lets
cuBLAS add U·V in place; :mod:`.gemm_choice` measures both on CUDA and keeps the faster per shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dropout_mask import keep_mask
from .dropout_xa import lora_project
from .gemm_choice import choose_path, gemm_key
from .launch import (
    check_input,
    check_tensor,
    dot,
    dot_precision,
    epilogue_config,
    gemm_configs,
    grouped_tile,
    launch,
    prune_for_rank,
    rank_block,
    token_bucket,
)
from .shared_memory import on_device


@triton.jit(do_not_specialize=["seed", "M_BUCKET"])
def fused_lora_matmul_kernel(
    u_ptr, v_ptr, up_ptr, q_ptr, bias_ptr, c_ptr, col_scale_ptr,
    M, N, K, R,
    scale, seed, p,
    stride_um, stride_uk, stride_vk, stride_vn, stride_upm, stride_upr, stride_qr, stride_qn,
    stride_cm, stride_cn, stride_bias, stride_col_scale, M_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_COL_SCALE: tl.constexpr, DROPOUT: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    m_mask = offs_m < M
    n_mask = offs_n < N
    r_mask = offs_r < R

    # The accumulator starts as s·keep ⊙ (UP·Q) + b; the mask and the rank-R operands are dead
    # before the K loop, which then only holds the accumulator and its pipelined U, V tiles.
    up = tl.load(
        up_ptr + offs_m.to(tl.int64)[:, None] * stride_upm + offs_r[None, :] * stride_upr,
        mask=m_mask[:, None] & r_mask[None, :],
        other=0.0,
    )
    q = tl.load(
        q_ptr + offs_r[:, None] * stride_qr + offs_n[None, :] * stride_qn,
        mask=r_mask[:, None] & n_mask[None, :],
        other=0.0,
    )
    acc = dot(up, q, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION) * scale
    if DROPOUT:
        acc = tl.where(keep_mask(seed, offs_m, pid_n * BLOCK_N, BLOCK_N, p), acc, 0.0)
    if HAS_BIAS and not HAS_COL_SCALE:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]

    # Rows and columns past the edge wrap around (their results are never stored), as in Triton's
    # tutorial matmul: the K loop's loads need only the K mask, which keeps its registers free.
    u_ptrs = u_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_um + offs_k[None, :] * stride_uk
    v_ptrs = v_ptr + offs_k[:, None] * stride_vk + (offs_n % N)[None, :] * stride_vn
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        u = tl.load(u_ptrs, mask=k_mask[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=k_mask[:, None], other=0.0)
        acc = dot(u, v, acc, DOT_PRECISION)
        u_ptrs += BLOCK_K * stride_uk
        v_ptrs += BLOCK_K * stride_vk
    if HAS_COL_SCALE:  # DoRA's g ⊙ (U·V + s·UP·Q) + b: the column scale, then the (unscaled) bias
        acc *= tl.load(col_scale_ptr + offs_n * stride_col_scale, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


fused_lora_matmul_tuned = triton.autotune(
    configs=gemm_configs(),
    key=["M_BUCKET", "N", "K", "R_PAD", "HAS_BIAS", "HAS_COL_SCALE", "DROPOUT"],
    prune_configs_by={"early_config_prune": on_device(prune_for_rank)},
    cache_results=True,
)(fused_lora_matmul_kernel)


def fused_lora_matmul(u, v, up, q, bias, scale, dropout_p, seed, config, col_scale=None):
    """Unchecked launch for ``(M, K)·(K, N)`` operands and UP ``(M, R)`` (views with any strides); returns C.

    ``col_scale`` ``(N,)`` (DoRA's g, a runtime vector: no recompile per value): C = col_scale ⊙ (U·V + s·UP·Q) + b.
    """
    M, K = u.shape
    N, R = v.shape[1], up.shape[1]
    c = torch.empty(M, N, dtype=u.dtype, device=u.device)
    if M == 0:
        return c

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    args = (
        u, v, up, q, bias if bias is not None else v, c, col_scale if col_scale is not None else v,
        M, N, K, R,
        float(scale), int(seed), float(dropout_p),
        *u.stride(), *v.stride(), *up.stride(), *q.stride(), *c.stride(),
        bias.stride(0) if bias is not None else 0, col_scale.stride(0) if col_scale is not None else 0,
        token_bucket(M), bias is not None, col_scale is not None, dropout_p > 0.0, rank_block(R),
        dot_precision(u.dtype),
    )  # fmt: skip
    launch(fused_lora_matmul_kernel, fused_lora_matmul_tuned, grid, args, config)
    return c


def cublas_lora_matmul(u, v, up, q, bias, scale, dropout_p, seed):
    """:func:`fused_lora_matmul`'s result from the kernel at K = 0 (``s·keep ⊙ (UP·Q) + b``, the same mask) and
    one cuBLAS GEMM adding U·V in place (beta = 1): no buffer beyond C."""
    config = epilogue_config(64, rank_block(up.shape[1]), u.element_size())  # K = 0: memory-bound, untuned
    c = fused_lora_matmul(u[:, :0], v[:0], up, q, bias, scale, dropout_p, seed, config)
    return torch.addmm(c, u, v, out=c)


def lora_matmul(op, u, v, up, q, bias, scale, dropout_p, seed, config=None):
    """C by the path :func:`.gemm_choice.choose_path` picks for ``op``; a pinned ``config`` runs the Triton kernel."""
    args = (u, v, up, q, bias, scale, dropout_p, seed)
    if config is not None or u.shape[0] == 0:
        return fused_lora_matmul(*args, config)
    candidates = {"triton": lambda: fused_lora_matmul(*args, None), "cublas": lambda: cublas_lora_matmul(*args)}
    return candidates[choose_path(gemm_key(op, u, v, up, bias, dropout_p), candidates, u.device)]()


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
    """Forward: x ``(M, K)`` any strides, W0 ``(N, K)``, bias ``(N,)``/None, A ``(R, K)``, B ``(N, R)`` -> ``(y (M, N),
    xa (M, R))`` in x's dtype. ``xa``: precomputed ``drop(x)·Aᵀ`` (None: ``x·Aᵀ``); ``config`` pins a GEMM config
    (tests; None autotunes on CUDA)."""
    check_operands(x, weight, lora_A, lora_B, bias)
    if xa is not None:
        check_tensor("xa", xa, (x.shape[0], lora_A.shape[0]), x)
    else:
        xa = lora_project(x, lora_A)
    return forward_matmul(x, weight, bias, xa, lora_B, scaling, config), xa


def forward_matmul(x, weight, bias, xa, lora_B, scaling, config=None):
    """:func:`fused_lora_forward`'s GEMM unchecked, xa given: y ``(M, N)``."""
    return lora_matmul("forward", x, weight.t(), xa, lora_B.t(), bias, scaling, 0.0, 0, config)


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
    """Input gradient: dY ``(M, N)`` any strides, W0 ``(N, K)``, A ``(R, K)``, B ``(N, R)``, the forward's dropout_p
    and seed -> ``(dX (M, K), g = dY·B (M, R))`` in dY's dtype; ``config`` as in :func:`fused_lora_forward`."""
    check_operands(grad_y, weight, lora_A, lora_B, dropout_p=dropout_p, dx=True)
    return dx_matmul(grad_y, weight, lora_A, lora_B, scaling, dropout_p, seed, config)


def dx_matmul(grad_y, weight, lora_A, lora_B, scaling, dropout_p, seed, config=None):
    """:func:`fused_lora_dx` unchecked: ``(dX, g)``."""
    g = lora_project(grad_y, lora_B.t())
    dx = lora_matmul("dx", grad_y, weight, g, lora_A, None, scaling / (1.0 - dropout_p), dropout_p, seed, config)
    return dx, g


def check_operands(u, weight, lora_A, lora_B, bias=None, dropout_p=0.0, dx=False):
    """ValueError unless W0 ``(out, in)``, A ``(r, in)``, B ``(out, r)``, bias ``(out,)`` fit u, x ``(M, in)`` or with
    ``dx`` dY ``(M, out)``, and dropout_p is in [0, 1)."""
    check_input("grad_y" if dx else "x", u)
    N, K = (u.shape[1], weight.shape[1]) if dx else (weight.shape[0], u.shape[1])
    R = lora_A.shape[0]
    check_tensor("weight", weight, (N, K), u)
    check_tensor("lora_A", lora_A, (R, K), u)
    check_tensor("lora_B", lora_B, (N, R), u)
    if bias is not None:
        check_tensor("bias", bias, (N,), u)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout probability {dropout_p} must be in [0, 1)")
