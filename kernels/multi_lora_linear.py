"""The mixed-adapter LoRA linear's forward and backward composed from the Triton kernels.

Same contract as ``lorafast.multi_torch_backend`` (x ``(n, in)``, lora_A ``(K, R, in)``, lora_B
``(K, out, R)``, scalings ``(K,)`` float32, row_adapter ``(n,)`` ids in [-1, K), dropout None or
``(K,)`` float32 p_k in [0, 1), seed an int; see there), so the autograd Function can call
either. With k = row_adapter[i] and keep_i adapter k's dropout mask of x's row i (the
single-adapter kernels' ``dropout_keep_mask(seed, (n, in), p_k)[i]``, regenerated from the
seed in every kernel, never stored):

    drop(x)_i = x_i ⊙ keep_i / (1 − p_k)
    y_i = x_i·W0ᵀ + b + s_k·(drop(x)_i·A_kᵀ)·B_kᵀ,   xa_i = drop(x)_i·A_kᵀ (zeros where k = −1)
    dX_i = dY_i·W0 + s_k/(1 − p_k)·keep_i ⊙ ((dY_i·B_k)·A_k)
    dA_k = s_k/(1 − p_k)·Σ_{i: k_i = k} (dY_i·B_k)ᵀ·(x_i ⊙ keep_i),   dB_k = s_k·Σ_{i: k_i = k} dY_iᵀ·xa_i

One launch per kernel for all adapters:

- forward: under dropout, ``multi_dropout_xa`` first projects the masked rows of the adapters
  with p_k > 0; then ``fused_multi_lora_forward`` (one pass over x computes ``x·W0ᵀ``, the other
  rows' ``x_i·A_kᵀ`` and the rank-R update);
- backward: ``fused_multi_lora_dx`` (one pass over dY computes ``dY·W0``, ``g_i = dY_i·B_k``
  and the masked rank-R update of dX), then the per-adapter ``multi_lora_weight_grad``
  reductions for dA (masked x) and dB.

The rows sorted by adapter and the block table (:func:`batch_segments`) are built once per
batch by the caller and passed to forward and backward alike (built here when not given).
"""

from __future__ import annotations

import torch

from .adapter_segments import BLOCK_M, AdapterSegments, adapter_segments
from .multi_lora_matmul import fused_multi_lora_dx, fused_multi_lora_forward
from .multi_lora_weight_grad import multi_lora_weight_grad


def batch_segments(row_adapter: torch.Tensor, num_adapters: int) -> AdapterSegments:
    """The row tables of a batch (row_adapter ``(n,)`` ids in [-1, K)) that every kernel below reads."""
    return adapter_segments(row_adapter, num_adapters, BLOCK_M)


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
    dropout: torch.Tensor | None = None,
    seed: int = 0,
    segments: AdapterSegments | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, xa)`` for x ``(n, in)``: y ``(n, out)``, ``xa_i = drop(x)_i·A_kᵀ`` ``(n, R)`` (zeros where k = −1).

    ``dropout``: None, or ``(K,)`` float32 drop probabilities on x's device (p_k = 0: exactly
    no dropout for adapter k); ``seed``: ``lorafast.dropout.draw_seed()``; ``segments``:
    :func:`batch_segments` of row_adapter if already built.
    """
    return fused_multi_lora_forward(
        x, weight, bias, lora_A, lora_B, scalings, row_adapter, segments=segments, dropout=dropout, seed=seed
    )


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
    dropout: torch.Tensor | None = None,
    seed: int = 0,
    segments: AdapterSegments | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dX (n, in), dA (K, R, in), dB (K, out, R))``, each None where ``needs_grad`` says not wanted.

    Each adapter's dA and dB sum over its own rows only (zeros for an adapter without rows).
    ``dropout``, ``seed`` and ``segments`` are the forward's; xa is the forward's (it holds the dropout).
    """
    need_dx, need_da, need_db = needs_grad
    grad_x = grad_a = grad_b = None
    if not (need_dx or need_da or need_db):
        return grad_x, grad_a, grad_b
    if segments is None:
        segments = batch_segments(row_adapter, lora_A.shape[0])
    if need_dx or need_da:
        grad_x, g = fused_multi_lora_dx(
            grad_y, weight, lora_A, lora_B, scalings, row_adapter, with_dx=need_dx, segments=segments,
            dropout=dropout, seed=seed,
        )  # fmt: skip
        if need_da:
            grad_a = multi_lora_weight_grad(
                x, g, scalings, row_adapter, transpose=True, segments=segments, dropout=dropout, seed=seed
            )
    if need_db:
        grad_b = multi_lora_weight_grad(grad_y, xa, scalings, row_adapter, segments=segments)
    return grad_x, grad_a, grad_b
