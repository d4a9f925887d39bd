"""Expert LoRA matmul: ``C_i = U_i·V_e + b_e + s·(U_i·P_e)·Q_e`` with ``e = expert[i]``, grouped over expert segments.

Shapes: U ``(M, K)``; per expert e, read in place from stacked tensors at ``e·stride``: V_e ``(K, N)`` (the expert's
base weight, either layout), P_e ``(K, r)``, Q_e ``(r, N)``, b_e ``(N,)``; C ``(M, N)``, UP ``(M, r)`` with
``UP_i = U_i·P_e``. Both big products of the expert LoRA linear have this form:
- forward ``y = x·W_eᵀ + b_e + s·(x·A_eᵀ)·B_eᵀ``: U = x, V = W_eᵀ, P = A_eᵀ, Q = B_eᵀ, UP = xa;
- input gradient ``dX = dY·W_e + s·(dY·B_e)·A_e``: U = dY, V = W_e, P = B_e, Q = A_e, UP = g.

Rows arrive grouped by expert; the block table of ``adapter_segments`` (experts as its adapters, ``BLOCK_M`` rows a
block) gives each program one row block of one expert and one ``BLOCK_N`` column tile of C. As in
``multi_lora_matmul`` (whose K loop it shares), each U tile feeds both U·V_e and U·P_e; after the loop the rank-r
product with Q_e, scaled by s, is added with the bias, and the programs of column tile 0 write UP. No ``E×out×in``
tensor is formed; empty experts get no block. Dropout is not fused here (the PyTorch path runs it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adapter_segments import BLOCK_M, UNUSED_BLOCK, adapter_segments
from .entry import kernel_entry
from .launch import check_input, dot, dot_precision, grouped_tile, launch, rank_block, token_bucket
from .multi_lora_matmul import SMALL_TILES, _configs, _k_loop
from .multi_lora_matmul import _prune as _multi_prune
from .multi_lora_matmul import _shared_memory as multi_shared_memory
from .shared_memory import DEFAULT_SHARED_MEMORY, fitting, on_device

_UNUSED_BLOCK = tl.constexpr(UNUSED_BLOCK)
# The largest rank per input element size whose configs spill no more than the tutorial matmul on sm_90a (from rank 128
# in fp32, 256 in bf16, the rank-R_PAD operands beside both accumulators spill); larger ranks take the PyTorch path.
_MAX_RANK = {4: 64, 2: 128}


def kernel_rank_fits(dtype: torch.dtype, r: int) -> bool:
    """Whether the expert kernel runs rank r in ``dtype`` without spilling."""
    return r <= _MAX_RANK.get(torch.empty((), dtype=dtype).element_size(), 0)


def _prune(configs, named_args, shared_limit=DEFAULT_SHARED_MEMORY):
    """The mixed-adapter kernel's pruning for ``shared_limit`` bytes of shared memory, but from rank 64 with 4-byte
    inputs only the 64×64×32 tiles of 8 warps that fit (else its small tiles): with 4 warps, the two accumulators
    beside the (BLOCK_M, R_PAD) operand spill (``bench/kernel_report.py``'s build for sm_90a)."""
    u = named_args.get("u_ptr")
    if isinstance(u, torch.Tensor) and u.element_size() == 4 and named_args.get("R_PAD", 16) >= 64:
        regular, small = SMALL_TILES.split(configs)
        narrow = [c for c in regular if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) == (64, 32, 8)]
        if narrow:
            need = lambda c: multi_shared_memory(c, 4, named_args, shared_limit)  # noqa: E731
            return fitting(narrow, small, need, shared_limit)
    return _multi_prune(configs, named_args, shared_limit)


@triton.jit(do_not_specialize=["M_BUCKET"])
def expert_lora_matmul_kernel(
    u_ptr, v_ptr, p_ptr, q_ptr, bias_ptr, block_expert_ptr, block_rows_ptr, up_ptr, c_ptr,
    num_blocks, N, K, R, scaling,
    stride_um, stride_uk, stride_ve, stride_vk, stride_vn, stride_pe, stride_pk, stride_pr,
    stride_qe, stride_qr, stride_qn, stride_be, stride_bn, stride_upm, stride_upr, stride_cm, stride_cn, M_BUCKET,
    HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_blocks * BLOCK_M, N, BLOCK_M, BLOCK_N, GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert == _UNUSED_BLOCK:
        return
    e = tl.maximum(expert, 0).to(tl.int64)  # every row has an expert: no base-only block in use
    rows = tl.load(block_rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    m_mask = rows >= 0
    n_mask = offs_n < N
    r_mask = offs_r < R
    u_ptrs = u_ptr + rows[:, None] * stride_um + offs_k[None, :] * stride_uk
    v_ptrs = v_ptr + e * stride_ve + offs_k[:, None] * stride_vk + offs_n[None, :] * stride_vn
    p_ptrs = p_ptr + e * stride_pe + offs_k[:, None] * stride_pk + offs_r[None, :] * stride_pr
    acc, up_acc = _k_loop(
        u_ptrs, v_ptrs, p_ptrs, m_mask, n_mask, r_mask, K, stride_uk, stride_vk, stride_pk,
        True, True, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, R_PAD,
    )  # fmt: skip
    up = up_acc.to(up_ptr.dtype.element_ty)
    if pid_n == 0:
        up_ptrs = up_ptr + rows[:, None] * stride_upm + offs_r[None, :] * stride_upr
        tl.store(up_ptrs, up, mask=m_mask[:, None] & r_mask[None, :])
    q = tl.load(
        q_ptr + e * stride_qe + offs_r[:, None] * stride_qr + offs_n[None, :] * stride_qn,
        mask=r_mask[:, None] & n_mask[None, :],
        other=0.0,
    ).to(up.dtype)
    acc += scaling * dot(up, q, None, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e * stride_be + offs_n * stride_bn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


expert_lora_matmul_tuned = triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "N", "K", "R_PAD", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": on_device(_prune)},
    cache_results=True,
)(expert_lora_matmul_kernel)


def expert_segments(counts: list[int], device: torch.device):
    """The block table of rows grouped by expert (``counts[e]`` rows of expert e, in order)."""
    experts = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
    return adapter_segments(experts, len(counts), BLOCK_M)


def _expert_strides(t: torch.Tensor, transpose: bool) -> tuple[int, int, int]:
    """``(per expert, rows, columns)`` strides of each expert's matrix in a stack, transposed or not."""
    return (t.stride(0), t.stride(2), t.stride(1)) if transpose else t.stride()


def expert_lora_matmul(u, v, v_transposed, p, p_transposed, q, q_transposed, bias, scaling, segments, config=None):
    """Unchecked launch: U ``(M, K)``; stacks v, p, q whose expert matrices, transposed where asked, are V_e
    ``(K, N)``, P_e ``(K, r)``, Q_e ``(r, N)``; bias ``(E, N)`` or None. Returns ``(C (M, N), UP (M, r))``."""
    M, K = u.shape
    N = v.shape[1] if v_transposed else v.shape[2]
    R = p.shape[1] if p_transposed else p.shape[2]
    c = torch.empty(M, N, dtype=u.dtype, device=u.device)
    up = torch.empty(M, R, dtype=u.dtype, device=u.device)
    if M == 0:
        return c, up
    num_blocks = segments.num_blocks

    def grid(meta):
        return (num_blocks * triton.cdiv(N, meta["BLOCK_N"]),)

    args = (
        u, v, p, q, bias if bias is not None else v, segments.block_adapter, segments.block_rows, up, c,
        num_blocks, N, K, R, float(scaling), *u.stride(),
        *_expert_strides(v, v_transposed), *_expert_strides(p, p_transposed), *_expert_strides(q, q_transposed),
        *(bias.stride() if bias is not None else (0, 0)), *up.stride(), *c.stride(), token_bucket(M),
        bias is not None, rank_block(R), dot_precision(u.dtype),
    )  # fmt: skip
    launch(expert_lora_matmul_kernel, expert_lora_matmul_tuned, grid, args, config)
    return c, up


@kernel_entry("the expert LoRA forward")
def expert_forward(x, weight, bias, lora_A, lora_B, scaling, segments, transposed=False, config=None):
    """The forward: x ``(S, in)`` grouped by expert, weight ``(E, out, in)`` (``(E, in, out)`` if ``transposed``),
    bias ``(E, out)``/None, lora_A ``(E, r, in)``, lora_B ``(E, out, r)`` -> ``(y (S, out), xa (S, r))``."""
    check_input("x", x)
    return expert_lora_matmul(x, weight, not transposed, lora_A, True, lora_B, True, bias, scaling, segments, config)


@kernel_entry("the expert LoRA input gradient")
def expert_dx(grad_y, weight, lora_A, lora_B, scaling, segments, transposed=False, config=None):
    """The input gradient: dY ``(S, out)`` -> ``(dX (S, in), g = dY·B_e (S, r))``; other arguments as the forward's."""
    check_input("grad_y", grad_y)
    return expert_lora_matmul(grad_y, weight, transposed, lora_B, False, lora_A, False, None, scaling, segments, config)
