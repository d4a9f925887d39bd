"""The LoRA linear's forward and backward composed from the Triton kernels.

Same contract as ``lorafast.torch_backend`` (2-D x ``(n, in)``; see there), so the autograd
Function can call either:

- forward: ``fused_lora_forward`` (one pass over x computes ``x·W0ᵀ``, ``x·Aᵀ`` and the
  rank-r update); with dropout, ``dropout_xa`` first projects the masked x;
- backward: ``fused_lora_dx`` (one pass over dY computes ``dY·W0``, ``g = dY·B`` and the
  masked rank-r update of dX), then the ``lora_weight_grad`` reductions for dA and dB.
"""

from __future__ import annotations

import torch

from .dropout_xa import dropout_xa
from .fused_lora_matmul import fused_lora_dx, fused_lora_forward
from .lora_weight_grad import lora_weight_grad


# torch.compile runs these eagerly (a graph break) rather than tracing the launchers' checks.
@torch.compiler.disable
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
    """``(y, xa)`` for x ``(n, in)``: y ``(n, out)``, ``xa = drop(x)·Aᵀ`` ``(n, r)``."""
    xa = dropout_xa(x, lora_A, dropout_p, seed) if dropout_p > 0.0 else None
    return fused_lora_forward(x, weight, bias, lora_A, lora_B, scaling, xa=xa)


@torch.compiler.disable
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
    """``(dX, dA, dB)``, each None where ``needs_grad`` says it is not wanted."""
    need_dx, need_da, need_db = needs_grad
    grad_x = grad_a = grad_b = g = None
    if need_dx:
        grad_x, g = fused_lora_dx(grad_y, weight, lora_A, lora_B, scaling, dropout_p, seed)
    elif need_da:
        g = torch.mm(grad_y, lora_B)
    if need_da:
        grad_a = lora_weight_grad(x, g, scaling / (1.0 - dropout_p), dropout_p, seed).t().contiguous()
    if need_db:
        grad_b = lora_weight_grad(grad_y, xa, scaling)
    return grad_x, grad_a, grad_b
