"""LoRA on a stack of experts: per expert ``y_e = x_e·W_eᵀ + b_e + s·(drop(x_e)·A_eᵀ)·B_eᵀ`` as an autograd Function,
and its entry point :func:`expert_lora_linear`.

Rows arrive grouped by expert (``counts[e]`` consecutive rows for expert e, as a router's tokens sorted by expert
id). No ``E×out×in`` tensor (no ``B·A``, no ``W + ΔW``) is ever formed and no gradient for W or b is computed.
Backward keeps x (the caller's), ``xa = drop(x)·Aᵀ`` ``(S, r)`` and the dropout seed.

- PyTorch path: on CPU without dropout, one ``grouped_mm`` per product over all experts
  (:mod:`lorafast.expert_grouped`); otherwise each expert's segment runs the dense path
  (:mod:`lorafast.torch_backend`) on its own weight (a view). Under dropout expert e's mask is the dense path's mask
  for seed ``seed·E + e`` over its segment, a function of (expert, row in segment), regenerated block by block in
  backward.
- Triton path (the ``triton`` backend, without dropout, r up to 64 in fp32 and 128 in fp16/bf16):
  :mod:`lorafast.kernels.expert_lora_matmul` runs forward and dX grouped over the expert segments, base GEMM and
  LoRA shrink/expand fused; dA and dB are per-segment GEMMs on the kept ``xa`` and the kernel's ``g = dY·B_e``.
  Other calls take the PyTorch path on every device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .backend import front_door
from .expert_grouped import grouped_backward, grouped_forward, grouped_usable
from .torch_backend import lora_backward, lora_forward
from .validation import check_dropout, check_rank, check_same_dtype_and_device, check_scaling, check_tensors


def segment_bounds(counts: Sequence[int] | torch.Tensor, rows: int, experts: int) -> tuple[tuple[int, int], ...]:
    """``((start, stop), ...)`` of each expert's rows from ``counts`` (E,) non-negative ints summing to ``rows``.

    ValueError naming the problem otherwise. A tensor of counts is read on the host (one sync on a GPU).
    """
    if isinstance(counts, torch.Tensor):
        if counts.dim() != 1 or counts.is_floating_point() or counts.is_complex():
            raise ValueError(f"counts must be a 1-D integer tensor (E,), got {counts.dim()}-D {counts.dtype}")
        counts = counts.tolist()
    counts = list(counts)
    if len(counts) != experts:
        raise ValueError(f"counts has {len(counts)} entries but the weight holds {experts} experts")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise ValueError(f"counts must be non-negative ints, got {counts[:8]}")
    if sum(counts) != rows:
        raise ValueError(f"counts sum to {sum(counts)} but x has {rows} rows")
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    return tuple(bounds)


def expert_seed(seed: int, expert: int, experts: int) -> int:
    """The dense path's dropout seed for ``expert``'s segment of a call drawn ``seed``: distinct per (call, expert)."""
    return seed * experts + expert


def _expert_weight(weight: torch.Tensor, e: int, transposed: bool) -> torch.Tensor:
    """Expert e's weight as ``(out, in)`` (a transposed view of an ``(E, in, out)`` stack)."""
    return weight[e].t() if transposed else weight[e]


class ExpertLoRAFunction(torch.autograd.Function):
    """x ``(S, in)`` grouped by ``bounds``, weight ``(E, out, in)`` (``(E, in, out)`` if ``transposed``), bias
    ``(E, out)``/None, lora_A ``(E, r, in)``, lora_B ``(E, out, r)``, scaling, dropout_p, seed -> ``(S, out)``;
    unchecked (see :func:`expert_lora_linear`). Gradients for x, lora_A, lora_B only."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, bounds, scaling, dropout_p, seed, transposed, backend="torch"):
        ctx.bounds, ctx.scaling, ctx.dropout_p, ctx.seed, ctx.transposed = bounds, scaling, dropout_p, seed, transposed
        ctx.segments, ctx.grouped = None, False
        if backend == "triton" and dropout_p == 0.0 and _kernel_fits(x.dtype, lora_A.shape[1]):
            from .kernels.expert_lora_matmul import expert_forward, expert_segments

            ctx.segments = expert_segments([stop - start for start, stop in bounds], x.device)
            y, xa = expert_forward(x, weight, bias, lora_A, lora_B, scaling, ctx.segments, transposed)
            ctx.save_for_backward(x, xa, weight, lora_A, lora_B)
            return y
        if dropout_p == 0.0 and grouped_usable(x, weight, lora_A):
            ctx.grouped = True
            y, xa = grouped_forward(x, weight, bias, lora_A, lora_B, scaling, bounds, transposed)
            ctx.save_for_backward(x, xa, weight, lora_A, lora_B)
            return y
        experts = weight.shape[0]
        out_features = weight.shape[2] if transposed else weight.shape[1]
        y = x.new_empty(x.shape[0], out_features)
        xa = x.new_empty(x.shape[0], lora_A.shape[1])
        for e, (start, stop) in enumerate(bounds):
            if start == stop:
                continue
            y[start:stop], xa[start:stop] = lora_forward(
                x[start:stop], _expert_weight(weight, e, transposed), None if bias is None else bias[e],
                lora_A[e], lora_B[e], scaling, dropout_p, expert_seed(seed, e, experts),
            )  # fmt: skip
        ctx.save_for_backward(x, xa, weight, lora_A, lora_B)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, xa, weight, lora_A, lora_B = ctx.saved_tensors
        need_dx, need_da, need_db = (ctx.needs_input_grad[i] for i in (0, 3, 4))
        if ctx.segments is not None:
            grads = _triton_backward(ctx, grad_y, x, xa, weight, lora_A, lora_B, need_dx, need_da, need_db)
            return grads[0], None, None, grads[1], grads[2], None, None, None, None, None, None
        if ctx.grouped:
            grads = grouped_backward(grad_y, x, xa, weight, lora_A, lora_B, ctx.scaling, ctx.bounds, ctx.transposed,
                                     (need_dx, need_da, need_db))  # fmt: skip
            return grads[0], None, None, grads[1], grads[2], None, None, None, None, None, None
        experts = weight.shape[0]
        grad_x = torch.empty_like(x) if need_dx else None
        grad_a = torch.zeros_like(lora_A) if need_da else None
        grad_b = torch.zeros_like(lora_B) if need_db else None
        for e, (start, stop) in enumerate(ctx.bounds):
            if start == stop:
                continue
            dx, da, db = lora_backward(
                grad_y[start:stop], x[start:stop], xa[start:stop], _expert_weight(weight, e, ctx.transposed),
                lora_A[e], lora_B[e], ctx.scaling, ctx.dropout_p, expert_seed(ctx.seed, e, experts),
                (need_dx, need_da, need_db),
            )  # fmt: skip
            if need_dx:
                grad_x[start:stop] = dx
            if need_da:
                grad_a[e] = da
            if need_db:
                grad_b[e] = db
        return grad_x, None, None, grad_a, grad_b, None, None, None, None, None, None


def _kernel_fits(dtype: torch.dtype, r: int) -> bool:
    from .kernels.expert_lora_matmul import kernel_rank_fits

    return kernel_rank_fits(dtype, r)


def _triton_backward(ctx, grad_y, x, xa, weight, lora_A, lora_B, need_dx, need_da, need_db):
    """``(dX, dA, dB)`` on the Triton path: dX and g = dY·B_e from the kernel, then per segment
    ``dA_e = s·g_eᵀ·x_e``, ``dB_e = s·dY_eᵀ·xa_e``."""
    from .kernels.expert_lora_matmul import expert_dx

    grad_y = grad_y.contiguous()
    grad_x, g = expert_dx(grad_y, weight, lora_A, lora_B, ctx.scaling, ctx.segments, ctx.transposed)
    grad_a = torch.zeros_like(lora_A) if need_da else None
    grad_b = torch.zeros_like(lora_B) if need_db else None
    for e, (start, stop) in enumerate(ctx.bounds):
        if start < stop and need_da:
            torch.mm(g[start:stop].t(), x[start:stop], out=grad_a[e]).mul_(ctx.scaling)
        if start < stop and need_db:
            torch.mm(grad_y[start:stop].t(), xa[start:stop], out=grad_b[e]).mul_(ctx.scaling)
    return grad_x if need_dx else None, grad_a, grad_b


def check_expert_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    transposed: bool,
) -> tuple[int, int, int]:
    """Raise ValueError unless the shapes, dtypes and devices fit :func:`expert_lora_linear`; ``(E, in, out)``."""
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    check_tensors(named, bias)
    layout = "(E, in, out)" if transposed else "(E, out, in)"
    if weight.dim() != 3:
        raise ValueError(f"weight must be a 3-D stack of expert weights {layout}, got shape {tuple(weight.shape)}")
    experts = weight.shape[0]
    in_features, out_features = (weight.shape[1], weight.shape[2]) if transposed else (weight.shape[2], weight.shape[1])
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(
            f"x must have shape (rows, in_features={in_features}) for weight {layout}, got {tuple(x.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (experts, out_features):
        raise ValueError(
            f"bias must have shape (E, out_features) = ({experts}, {out_features}), got {tuple(bias.shape)}"
        )
    if lora_A.dim() != 3 or lora_A.shape[0] != experts or lora_A.shape[2] != in_features:
        raise ValueError(
            f"lora_A must have shape (E={experts}, r, in_features={in_features}), got {tuple(lora_A.shape)}"
        )
    r = lora_A.shape[1]
    check_rank(r, in_features, out_features)
    if tuple(lora_B.shape) != (experts, out_features, r):
        raise ValueError(
            f"lora_B must have shape (E, out_features, r) = ({experts}, {out_features}, {r}), got {tuple(lora_B.shape)}"
        )
    check_scaling(scaling)
    check_dropout(dropout_p)
    check_same_dtype_and_device(named, x)
    return experts, in_features, out_features


def expert_lora_linear(
    x: torch.Tensor,
    counts: Sequence[int] | torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    bias: torch.Tensor | None = None,
    transposed: bool = False,
) -> torch.Tensor:
    """LoRA on E experts: x ``(S, in)``, rows grouped by expert -> ``(S, out)`` in x's dtype.

    Args:
        counts: ``(E,)`` rows of each expert, in order (``counts[0]`` rows of expert 0 first; zero for an unused
            expert); ints or an integer tensor.
        weight: frozen expert weights ``(E, out, in)`` (transformers' ``gate_up_proj`` ``(E, 2·I, H)`` and
            ``down_proj`` ``(E, H, I)``), or ``(E, in, out)`` with ``transposed``.
        lora_A: ``(E, r, in)``; lora_B: ``(E, out, r)`` (any strides: PEFT's factors are views, see
            :func:`lorafast.experts.peft_expert_factors`); bias: frozen ``(E, out)`` or None.
        scaling: ``alpha / r``. dropout_p: dropout on the LoRA branch's input in [0, 1), applied when ``training``.

    CUDA tensors run the Triton kernels (without dropout), others the PyTorch path (``LORAFAST_BACKEND`` overrides,
    see :mod:`lorafast.backend`). Under ``torch.autocast`` the inputs are first cast as ``F.linear``'s would be.
    ValueError on a shape, dtype or device mismatch, counts that do not cover x's rows, r < 1, dropout outside
    [0, 1), or a weight or bias that requires grad (no gradient is computed for them).
    """

    def check(x, weight, bias, lora_A, lora_B):
        check_expert_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, transposed)
        return training and dropout_p > 0.0, float(dropout_p) if training else 0.0

    def run(tensors, p, backend, seed):
        x, weight, bias, lora_A, lora_B = tensors
        bounds = segment_bounds(counts, x.shape[0], weight.shape[0])
        return ExpertLoRAFunction.apply(
            x, weight, bias, lora_A, lora_B, bounds, float(scaling), p, seed, transposed, backend
        )

    return front_door(x, weight, bias, lora_A, lora_B, check, run)
