"""PyTorch LoRA linear (CPU, and fallback): ``y = x·W0ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` and dX, dA, dB.

No ``B·A``, dropped copy of x or mask beyond one cache-sized row block is materialised: forward writes the
rank-r term and bias into y, then the big GEMM accumulates onto it (``addmm_``, beta=1; backward likewise for dX);
the dropout mask is regenerated from the seed block by block (forward for xa, backward for dA and dX; under
torch.compile as one whole-input block, see :func:`lorafast.dropout.keep_blocks`).
Shapes: x ``(n, in)``, weight ``(out, in)``, bias ``(out,)``/None, lora_A ``(r, in)``, lora_B ``(out, r)``,
y ``(n, out)``, xa ``(n, r)``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .dropout import keep_blocks

_SLABS = 8  # row slabs of a batched uᵀ·v; see rows_transposed_matmul


def rows_transposed_matmul(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``uᵀ·v`` ``(p, q)`` for skinny u ``(n, p)`` or v ``(n, q)``; summed over row slabs (MKL would use one core)."""
    n = u.shape[0]
    if u.device.type != "cpu" or n < 4 * _SLABS:
        return torch.mm(u.t(), v)
    even = n - n % _SLABS
    out = torch.bmm(u[:even].view(_SLABS, -1, u.shape[1]).transpose(1, 2), v[:even].view(_SLABS, -1, v.shape[1])).sum(0)
    if even < n:
        out.addmm_(u[even:].t(), v[even:])
    return out


_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def matmul_wt(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a·wᵀ`` ``(m, r)`` for a ``(m, k)``, w ``(r, k)``: oneDNN's linear on CPU fp32 (2-3× MKL's GEMM here), else
    (and under torch.compile, which cannot lower it on plain weights) ``torch.mm`` with wᵀ column-major."""
    w = w.contiguous()
    if (
        _ONEDNN_LINEAR
        and a.device.type == "cpu"
        and a.dtype == torch.float32
        and a.is_contiguous()
        and not torch.compiler.is_compiling()
    ):
        return torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
    return torch.mm(a, w.t())


def _dropout_project(x: torch.Tensor, lora_A: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``drop(x)·Aᵀ`` block by block: x ``(n, in)``, lora_A ``(r, in)`` -> ``(n, r)``."""
    a_t = (lora_A * (1.0 / (1.0 - p))).t()  # column-major: MKL's fast layout
    xa = torch.empty(x.shape[0], lora_A.shape[0], dtype=x.dtype, device=x.device)
    for rows, keep in keep_blocks(seed, p, x.shape, x.dtype, x.device):
        torch.mm(keep.mul_(x[rows]), a_t, out=xa[rows])
    return xa


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``(n, in)`` -> ``(y (n, out), xa = drop(x)·Aᵀ (n, r))``, xa kept for backward."""
    if dropout_p > 0.0:
        xa = _dropout_project(x, lora_A, dropout_p, seed)
    else:
        xa = matmul_wt(x, lora_A)
    if bias is None:
        y = torch.mm(xa, (lora_B * scaling).t())
    else:
        y = torch.addmm(bias, xa, lora_B.t(), alpha=scaling)
    y.addmm_(x, weight.t())
    return y, xa


def lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dX, dA, dB)`` from grad_y ``(n, out)``, x ``(n, in)``, xa ``(n, r)``; None where not ``needs_grad``.
    dW0 and db are never formed."""
    need_dx, need_da, need_db = needs_grad
    grad_x = grad_a = grad_b = None
    if need_db:
        grad_b = rows_transposed_matmul(xa, grad_y).t().mul_(scaling).contiguous()
    if not (need_dx or need_da):
        return grad_x, grad_a, grad_b

    # g = s/(1-p)·dY·B: the one (n, r) factor both dA and the LoRA part of dX need.
    g = matmul_wt(grad_y, lora_B.t()).mul_(scaling / (1.0 - dropout_p))
    masks = keep_blocks(seed, dropout_p, x.shape, x.dtype, x.device) if dropout_p > 0.0 else None
    grad_x, grad_a = input_and_down_grads(grad_y, x, weight, g, lora_A, need_dx, need_da, masks)
    return grad_x, grad_a, grad_b


def input_and_down_grads(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    g: torch.Tensor,
    lora_A: torch.Tensor,
    need_dx: bool,
    need_da: bool,
    masks: Iterable[tuple[slice, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``dX = dY·W0 + keep ⊙ (g·A)``, ``dA = gᵀ·(x ⊙ keep)`` ``(r, in)`` (None unless needed), g ``(n, r)`` = dY·B
    scaled by s/(1-p); ``masks``: None, or ``keep_blocks``' ``(rows, keep)`` blocks, applied one at a time."""
    grad_x = grad_a = None
    if masks is None:
        if need_da:
            grad_a = rows_transposed_matmul(g, x)
        if need_dx:
            # g·A writes an (n, in) output: MKL's GEMM (A column-major) beats oneDNN's linear there
            grad_x = torch.mm(g, lora_A.t().contiguous().t())
            grad_x.addmm_(grad_y, weight)
        return grad_x, grad_a

    if need_da:
        # Sum the row blocks' contributions in at least fp32.
        grad_a = torch.zeros(lora_A.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    if need_dx:
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    a_t = lora_A.t().contiguous()
    for rows, keep in masks:
        if need_dx:
            torch.mm(g[rows], a_t.t(), out=grad_x[rows]).mul_(keep)
        if need_da:
            grad_a += rows_transposed_matmul(g[rows], keep.mul_(x[rows]))
    if need_dx:
        grad_x.addmm_(grad_y, weight)
    if need_da:
        grad_a = grad_a.to(x.dtype)
    return grad_x, grad_a
