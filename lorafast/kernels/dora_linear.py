"""DoRA's forward from the Triton kernels: the shrink kernel for ``xa = drop(x)·Aᵀ``, then the fused LoRA GEMM with
DoRA's ``g = m/‖W0 + s·BA‖_row`` as a column scale in its epilogue, ``y = g ⊙ (x·W0ᵀ + s·xa·Bᵀ) + b`` in one pass
over x, or, where :mod:`.gemm_choice` measures it faster (``LORAFAST_GEMM`` forces either), cuBLAS's x·W0ᵀ beside the
epilogue kernel and one pass over y for g and b. (Backward runs the LoRA kernels on ``dY ⊙ g``: see
:mod:`lorafast.dora`.) Under torch.compile it runs as the operator ``lorafast::dora_forward``.
"""

from __future__ import annotations

import torch
import triton

from .dropout_xa import lora_project
from .entry import kernel_entry
from .fused_lora_matmul import check_operands, cublas_lora_matmul, fused_lora_matmul
from .gemm_choice import choose_path, gemm_key
from .launch import check_tensor
from .lora_linear import host_seed, seed_tensor


@kernel_entry("the DoRA forward")
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
    fp32 -> ``(y (n, out), xa (n, r))`` in x's dtype; ``config`` pins a config of the fused GEMM (tests; None: the
    GEMM path :func:`.gemm_choice.choose_path` picks, autotuned on CUDA)."""
    check_operands(x, weight, lora_A, lora_B, bias, dropout_p)
    check_tensor("col_scale", col_scale, (weight.shape[0],), col_scale.new_empty(0, device=x.device))
    if col_scale.dtype != torch.float32:
        raise ValueError(f"col_scale must be float32 (DoRA's g at full precision), got {col_scale.dtype}")
    xa = lora_project(x, lora_A, dropout_p, host_seed(seed))
    return dora_matmul(x, weight.t(), xa, lora_B.t(), bias, scaling, col_scale, config), xa


def dora_matmul(u, v, up, q, bias, scale, col_scale, config=None):
    """``C = col_scale ⊙ (U·V + s·UP·Q) + b`` for U ``(M, K)``, V ``(K, N)``, UP ``(M, R)``, Q ``(R, N)`` by the path
    :func:`.gemm_choice.choose_path` picks (op ``"dora_forward"``); a pinned ``config`` runs the fused kernel."""
    args = (u, v, up, q, bias, scale)
    candidates = {
        "triton": lambda: fused_lora_matmul(*args, 0.0, 0, config, col_scale=col_scale),
        "cublas": lambda: cublas_dora_matmul(*args, col_scale),
    }
    if config is not None or u.shape[0] == 0:
        return candidates["triton"]()
    return candidates[choose_path(gemm_key("dora_forward", u, v, up, bias, 0.0), candidates, u.device)]()


def cublas_dora_matmul(u, v, up, q, bias, scale, col_scale):
    """:func:`dora_matmul`'s C from ``fused_lora_matmul.cublas_lora_matmul`` without bias (the epilogue kernel and
    cuBLAS's U·V), then one pass over C for g and b."""
    c = cublas_lora_matmul(u, v, up, q, None, scale, 0.0, 0)
    return c.mul_(col_scale) if bias is None else torch.addcmul(bias, c, col_scale, out=c)


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
