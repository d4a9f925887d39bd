"""The expert LoRA op on CPU without dropout: every product of all experts in one ``torch.nn.functional.grouped_mm``
over the expert segments (``offs``: cumulative row counts), instead of a Python loop of small GEMMs.

Forward ``xa = x·A_eᵀ``, ``y = x·W_eᵀ + b_e + s·xa·B_eᵀ``; backward ``g = dY·B_e``, ``dX = dY·W_e + s·g·A_e``, and
the per-expert factor gradients ``dA_e = s·g_eᵀ·x_e``, ``dB_e = s·dY_eᵀ·xa_e`` as grouped products over the rows
(``(r, S)·(S, in)`` cut at ``offs``). Shapes as :class:`lorafast.expert_function.ExpertLoRAFunction`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_usable(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor) -> bool:
    """Whether grouped_mm runs these operands: CPU, fp32/bf16/fp16, 16-byte aligned rows of every operand and result
    (in, out and r times the element size) and 16-byte aligned data."""
    if not hasattr(F, "grouped_mm") or x.device.type != "cpu" or x.dtype not in _DTYPES:
        return False
    size = x.element_size()
    dims = (*weight.shape[1:], lora_A.shape[1])
    strides = [s for t in (x, weight) for s in t.stride() if s != 1]
    return all(d * size % 16 == 0 for d in dims + tuple(strides)) and x.data_ptr() % 16 == weight.data_ptr() % 16 == 0


def _offsets(bounds, device) -> torch.Tensor:
    return torch.tensor([stop for _, stop in bounds], dtype=torch.int32, device=device)


def _bias_rows(bias: torch.Tensor, bounds) -> torch.Tensor:
    """Each row's expert bias ``(S, out)`` from ``(E, out)``."""
    counts = torch.tensor([stop - start for start, stop in bounds], device=bias.device)
    return torch.repeat_interleave(bias, counts, dim=0)


def grouped_forward(x, weight, bias, lora_A, lora_B, scaling, bounds, transposed):
    """``(y (S, out), xa (S, r))``."""
    offs = _offsets(bounds, x.device)
    w_t = weight if transposed else weight.transpose(1, 2)  # (E, in, out)
    xa = F.grouped_mm(x, lora_A.contiguous().transpose(1, 2), offs=offs)
    y = F.grouped_mm(x, w_t, offs=offs)
    y += F.grouped_mm(xa, lora_B.contiguous().transpose(1, 2), offs=offs).mul_(scaling)
    if bias is not None:
        y += _bias_rows(bias, bounds)
    return y, xa


def grouped_backward(grad_y, x, xa, weight, lora_A, lora_B, scaling, bounds, transposed, needs):
    """``(dX, dA (E, r, in), dB (E, out, r))``, None where not ``needs``."""
    need_dx, need_da, need_db = needs
    offs = _offsets(bounds, x.device)
    grad_y = grad_y.contiguous()
    grad_x = grad_a = grad_b = None
    if need_db:
        grad_b = F.grouped_mm(grad_y.t(), xa, offs=offs).mul_(scaling)
    if need_dx or need_da:
        g = F.grouped_mm(grad_y, lora_B.contiguous(), offs=offs)
        if need_da:
            grad_a = F.grouped_mm(g.t(), x, offs=offs).mul_(scaling)
        if need_dx:
            w = weight.transpose(1, 2) if transposed else weight  # (E, out, in)
            grad_x = F.grouped_mm(grad_y, w, offs=offs)
            grad_x += F.grouped_mm(g, lora_A.contiguous(), offs=offs).mul_(scaling)
    return grad_x, _zero_empty(grad_a, bounds), _zero_empty(grad_b, bounds)


def _zero_empty(grad: torch.Tensor | None, bounds) -> torch.Tensor | None:
    """Exact zeros for experts without rows: grouped_mm's documentation leaves their slices of a 2-D × 2-D product
    unspecified (the CPU kernel zeroes them today)."""
    if grad is not None:
        for e, (start, stop) in enumerate(bounds):
            if start == stop:
                grad[e].zero_()
    return grad
