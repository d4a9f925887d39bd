"""DoRA rows in a mixed-adapter batch: ``y_i = g_{k(i)} ⊙ z_i + b``, z the mixed LoRA output without bias
(:func:`lorafast.multi_function.apply_multi_lora`), ``g_k = m_k / ‖W0 + s_k·B_k·A_k‖_row`` for a DoRA adapter k (the
norm detached, as PEFT's) and g = 1 for plain adapters' rows and base rows (−1).

The norms of all DoRA adapters of a layer come from one skinny product ``W0·[A_1;…;A_D]ᵀ`` ``(out, ΣR)`` and the
identity of :mod:`lorafast.dora` (no ``(out, in)`` temporary); the per-row column scale is
:class:`RowScaleFunction`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .dora import base_row_norms_sq, norm_from_product


@torch.no_grad()
def dora_norms(
    weight: torch.Tensor, lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor], scalings: Sequence[float]
) -> torch.Tensor:
    """``‖W0 + s_j·B_j·A_j‖`` per row for D adapters: weight ``(out, in)``, A_j ``(r_j, in)``, B_j ``(out, r_j)`` ->
    ``(D, out)`` fp32 (fp64 for fp64), from one ``W0·[A_1;…;A_D]ᵀ`` product (``‖W0‖²`` cached per weight)."""
    base_sq = base_row_norms_sq(weight)
    stacked = torch.cat([a.to(weight.dtype) for a in lora_A])
    products = torch.mm(weight, stacked.t()).split([a.shape[0] for a in lora_A], dim=1)  # (out, r_j) each
    return torch.stack([
        norm_from_product(base_sq, wa, a, b, s) for a, b, s, wa in zip(lora_A, lora_B, scalings, products, strict=True)
    ])  # fmt: skip


class RowScaleFunction(torch.autograd.Function):
    """``y_i = G[slot_i] ⊙ z_i + b`` with ``G = [1; m_1/‖·‖_1; …; m_D/‖·‖_D]`` ``(D+1, out)``.

    z ``(..., out)`` (n rows), bias ``(out,)``/None (frozen), slot ``(n,)`` int64 in [0, D] (0: scale 1), norms
    ``(D, out)`` detached, then the D magnitudes m_j ``(out,)``. Backward: ``dz = dY ⊙ G[slot]`` and
    ``dm_j = Σ_{slot_i = j+1} dY_i ⊙ z_i / ‖·‖_j`` (in m_j's dtype). Kept for backward: slot (8n bytes), G and the
    norms (``(2D+1)·out`` floats) and, only when some m_j needs a gradient, z itself (the mixed LoRA output, which
    nothing else keeps: ``n·out`` elements of z's dtype); no ``(n, out)`` row-scale tensor is kept.
    """

    @staticmethod
    def forward(ctx, z, bias, slot, norms, *magnitudes):
        out_features = z.shape[-1]
        table = torch.cat([norms.new_ones(1, out_features), torch.stack([m.detach() for m in magnitudes]) / norms])
        z2 = z.reshape(-1, out_features)
        y = table.to(z.dtype).index_select(0, slot).mul_(z2)  # the row scales become y: one (n, out) allocation
        if bias is not None:
            y.add_(bias.to(y.dtype))
        keep_z = any(ctx.needs_input_grad[4:])
        ctx.save_for_backward(z if keep_z else None, slot, table, norms)
        ctx.z_shape, ctx.magnitude_dtypes = z.shape, [m.dtype for m in magnitudes]
        return y.view(*z.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_y):
        z, slot, table, norms = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_y2 = grad_y.reshape(-1, grad_y.shape[-1])
        grad_z = None
        if needs[0]:
            grad_z = table.to(grad_y.dtype).index_select(0, slot).mul_(grad_y2).view(ctx.z_shape)
        grad_m = [None] * (len(needs) - 4)
        if z is not None:
            acc = norms.dtype
            products = grad_y2.to(acc) * z.reshape(grad_y2.shape).to(acc)
            sums = products.new_zeros(table.shape).index_add_(0, slot, products)  # (D+1, out): Σ per slot
            grad_m = [
                (sums[j + 1] / norms[j]).to(dtype) if need else None
                for j, (need, dtype) in enumerate(zip(needs[4:], ctx.magnitude_dtypes))
            ]
        return grad_z, None, None, None, *grad_m


def scale_dora_rows(
    z: torch.Tensor,
    bias: torch.Tensor | None,
    slot: torch.Tensor,
    norms: torch.Tensor,
    magnitudes: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``y_i = g ⊙ z_i + b`` (see :class:`RowScaleFunction`): z ``(..., out)`` -> ``(..., out)`` in z's dtype; the
    magnitudes' gradients arrive in their own dtype."""
    return RowScaleFunction.apply(z, bias, slot, norms, *magnitudes)


def row_slots(rows: torch.Tensor, adapter_slots: torch.Tensor) -> torch.Tensor:
    """Each row's slot ``(n,)`` int64 for rows' adapter ids ``(n,)``: ``adapter_slots[k]`` ``(K,)`` (0 for a plain
    adapter, j+1 for DoRA adapter j), 0 for −1 and for ids outside [-1, K) (which count as −1, as in the mixed
    LoRA kernels)."""
    num_adapters = adapter_slots.shape[0]
    present = (rows >= 0) & (rows < num_adapters)
    return torch.where(present, adapter_slots[rows.clamp(0, num_adapters - 1)], 0)
