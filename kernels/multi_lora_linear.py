"""The mixed-adapter LoRA linear's forward and backward composed from the Triton kernels.

Same contract as ``lorafast.multi_torch_backend`` (x ``(n, in)``, lora_A ``(K, R, in)``, lora_B
``(K, out, R)``, scalings ``(K,)`` float32, row_adapter ``(n,)`` ids in [-1, K); see there), so
the autograd Function can call either. One launch per kernel for all adapters:

- forward: ``fused_multi_lora_forward`` (one pass over x computes ``x·W0ᵀ``, each row's
  ``x_i·A_kᵀ`` and the rank-R update);
- backward: ``fused_multi_lora_dx`` (one pass over dY computes ``dY·W0``, ``g_i = dY_i·B_k``
  and the rank-R update of dX), then the per-adapter ``multi_lora_weight_grad`` reductions
  for dA and dB. The rows are sorted by adapter once per call and the table shared.
"""

from __future__ import annotations

import torch

from .adapter_segments import adapter_segments
from .multi_lora_matmul import BLOCK_M, fused_multi_lora_dx, fused_multi_lora_forward
from .multi_lora_weight_grad import multi_lora_weight_grad


# torch.compile runs these eagerly (a graph break) rather than tracing the launchers' checks.
@torch.compiler.disable
def multi_lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor,
    row_adapter: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, xa)`` for x ``(n, in)``: y ``(n, out)``, ``xa_i = x_i·A_kᵀ`` ``(n, R)`` (zeros where k = −1)."""
    return fused_multi_lora_forward(x, weight, bias, lora_A, lora_B, scalings, row_adapter)


@torch.compiler.disable
def multi_lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor,
    row_adapter: torch.Tensor,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dX (n, in), dA (K, R, in), dB (K, out, R))``, each None where ``needs_grad`` says not wanted.

    Each adapter's dA and dB sum over its own rows only (zeros for an adapter without rows).
    """
    need_dx, need_da, need_db = needs_grad
    grad_x = grad_a = grad_b = None
    if not (need_dx or need_da or need_db):
        return grad_x, grad_a, grad_b
    segments = adapter_segments(row_adapter, lora_A.shape[0], BLOCK_M)
    if need_dx or need_da:
        grad_x, g = fused_multi_lora_dx(
            grad_y, weight, lora_A, lora_B, scalings, row_adapter, with_dx=need_dx, segments=segments
        )
        if need_da:
            grad_a = multi_lora_weight_grad(x, g, scalings, row_adapter, transpose=True, segments=segments)
    if need_db:
        grad_b = multi_lora_weight_grad(grad_y, xa, scalings, row_adapter, segments=segments)
    return grad_x, grad_a, grad_b
