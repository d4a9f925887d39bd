"""DoRA's forward from the Triton kernels: the shrink kernel for ``xa = drop(x)·Aᵀ``, then the fused LoRA GEMM with
DoRA's ``g = m/‖W0 + s·BA‖_row`` as a column scale in its epilogue, ``y = g ⊙ (x·W0ᵀ + s·xa·Bᵀ) + b`` in one pass
over x. (Backward runs the LoRA kernels on ``dY ⊙ g``: see :mod:`lorafast.dora`.) Under torch.compile it runs as the
operator ``lorafast::dora_forward``.
"""

from __future__ import annotations

import torch
import triton

from .dropout_xa import lora_project
from .fused_lora_matmul import check_operands, fused_lora_matmul
from .launch import check_tensor
from .lora_linear import host_seed, seed_tensor


def dora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int | torch.Tensor,
    col_scale: torch.Tensor,
    config: triton.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``(n, in)``, W0 ``(out, in)``, bias ``(out,)``/None, A ``(r, in)``, B ``(out, r)``, col_scale g ``(out,)``
    fp32 -> ``(y (n, out), xa (n, r))`` in x's dtype; ``config`` pins a GEMM config (tests; None autotunes on CUDA)."""
    check_operands(x, weight, lora_A, lora_B, bias, dropout_p)
    check_tensor("col_scale", col_scale, (weight.shape[0],), col_scale.new_empty(0, device=x.device))
    if col_scale.dtype != torch.float32:
        raise ValueError(f"col_scale must be float32 (DoRA's g at full precision), got {col_scale.dtype}")
    xa = lora_project(x, lora_A, dropout_p, host_seed(seed))
    y = fused_lora_matmul(x, weight.t(), xa, lora_B.t(), bias, scaling, 0.0, 0, config, col_scale=col_scale)
    return y, xa


@torch.library.custom_op("lorafast::dora_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
    col_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return dora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, col_scale)


@_forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, col_scale):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, col_scale):
    """:func:`dora_forward` for the library's DoRA Function: as an operator in a torch.compile graph, else direct."""
    if not torch.compiler.is_compiling():
        return dora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, col_scale)
    return _forward_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_tensor(seed), col_scale)
