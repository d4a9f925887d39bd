"""``y = x·W0ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` as an autograd Function, and its entry point ``lora_linear``.

Backward keeps the caller's x (no copy: layers sharing an input share it), ``xa = drop(x)·Aᵀ`` ``(n, r)`` and
the dropout seed; W0 and the factors are parameters, not activations. Gradients for x, A and B only.
"""

from __future__ import annotations

import torch

from .backend import front_door, implementation
from .validation import lora_inputs_check


class LoRALinearFunction(torch.autograd.Function):
    """x ``(..., in)``, weight ``(out, in)``, bias ``(out,)``/None, lora_A ``(r, in)``, lora_B ``(out, r)``, scaling,
    dropout_p, seed (unused at p = 0), backend ``"triton"``/``"torch"``, reload -> ``(..., out)``; unchecked (see
    lora_linear). ``reload``: None, or for a transient weight (a W0 dequantized for this call) a callable giving it
    again: the weight is then not saved, and backward calls ``reload()`` where dX needs it. Factors in another dtype
    than x are cast here (their gradients arrive in their own dtype, and no cast copy is saved).
    A 2-D x gives an output that is no view, so it may be changed in place (lora_linear passes x flattened).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, reload=None):
        y, xa = implementation(backend)[0](
            x.reshape(-1, x.shape[-1]), weight, bias, lora_A.to(x.dtype), lora_B.to(x.dtype), scaling, dropout_p, seed
        )
        ctx.save_for_backward(x, xa, None if reload else weight, lora_A, lora_B)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.backend, ctx.reload = scaling, dropout_p, seed, backend, reload
        return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x, xa, weight, lora_A, lora_B = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if ctx.reload is not None and needs[0]:
            weight = ctx.reload()
        grad_x, grad_a, grad_b = implementation(ctx.backend)[1](
            grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1]), xa, weight, lora_A.to(x.dtype),
            lora_B.to(x.dtype), ctx.scaling, ctx.dropout_p, ctx.seed, (needs[0], needs[3], needs[4]),
        )  # fmt: skip
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        grad_a = None if grad_a is None else grad_a.to(lora_A.dtype)
        grad_b = None if grad_b is None else grad_b.to(lora_B.dtype)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """The LoRA linear: x ``(..., in)`` any strides -> ``(..., out)`` in x's dtype.

    Args:
        weight: frozen W0 ``(out, in)``; bias: frozen ``(out,)`` or None; lora_A ``(r, in)``; lora_B ``(out, r)``.
        scaling: ``alpha / r``, a runtime number (changing it never recompiles a kernel).
        dropout_p: dropout on the LoRA branch's input, in [0, 1), applied only when ``training``, with a seed
            from torch's default generator (``torch.manual_seed`` makes it reproducible).

    CUDA tensors run the Triton kernels, others the PyTorch path (``LORAFAST_BACKEND`` overrides, see
    :mod:`lorafast.backend`). Under ``torch.autocast`` all inputs are first cast as ``F.linear``'s would be.
    Raises ValueError on a shape, dtype or device mismatch, r < 1, dropout_p outside
    [0, 1), a weight or bias that requires grad (no gradient is computed for them), or an unusable backend.
    """

    check = lora_inputs_check(scaling, dropout_p, training)

    def run(tensors, p, backend, seed):
        x, *others = tensors
        # Flattened outside the Function: its output is then no view made inside it, so callers may change it in
        # place (as PEFT's wrapping tuner layers do).
        y = LoRALinearFunction.apply(x.reshape(-1, x.shape[-1]), *others, float(scaling), p, seed, backend)
        return y.view(*x.shape[:-1], y.shape[-1])

    return front_door(x, weight, bias, lora_A, lora_B, check, run)
