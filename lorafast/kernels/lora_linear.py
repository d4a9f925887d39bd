"""The LoRA linear's forward and backward from the Triton kernels, with ``lorafast.torch_backend``'s contract.

Forward: the shrink kernel, then ``fused_lora_forward``. Backward: ``fused_lora_dx`` (shrink for g = dY·B, one
GEMM pass over dY), then ``lora_weight_grad`` for dA and dB. Under torch.compile they run as the operators
``lorafast::lora_forward`` and ``lorafast::lora_backward``: no graph break at a LoRA layer.
"""

from __future__ import annotations

import torch

from .dropout_xa import lora_project
from .entry import kernel_entry
from .fused_lora_matmul import check_operands, dx_matmul, forward_matmul
from .launch import check_tensor
from .lora_weight_grad import weight_grad


def host_seed(seed: int | torch.Tensor) -> int:
    """The seed as an int: a 0-d int64 CPU tensor (the operators' form) is read on the host, no device sync."""
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype != torch.int64 or seed.device.type != "cpu":
            raise ValueError(f"seed must be an int or a 0-d int64 CPU tensor, got {seed.dtype} {tuple(seed.shape)} "
                             f"on {seed.device}")  # fmt: skip
        return int(seed)
    return seed


# The launchers' unchecked entries: lora_linear checked these inputs at its front door.
@kernel_entry("the LoRA forward")
def _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    xa = lora_project(x, lora_A, dropout_p, host_seed(seed))
    return forward_matmul(x, weight, bias, xa, lora_B, scaling), xa


@kernel_entry("the LoRA backward")
def _backward(grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_da, need_db):
    grad_x = grad_a = grad_b = g = None
    seed = host_seed(seed)
    if need_dx:
        grad_x, g = dx_matmul(grad_y, weight, lora_A, lora_B, scaling, dropout_p, seed)
    elif need_da:
        g = torch.mm(grad_y, lora_B)
    if need_da:
        grad_a = weight_grad(x, g, scaling / (1.0 - dropout_p), dropout_p, seed, transpose=True)
    if need_db:
        grad_b = weight_grad(grad_y, xa, scaling)
    return grad_x, grad_a, grad_b


def seed_tensor(seed: int | torch.Tensor) -> torch.Tensor:
    """The dropout seed as the operators take it: a 0-d int64 CPU tensor (ints are graph constants)."""
    return seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64)


# The launchers as PyTorch operators: torch.compile puts them in its graph as opaque nodes (no
# graph break, so neighbours still fuse and CUDA graphs still apply) and traces shapes through
# the fake implementations. Eager calls skip the dispatcher and run the launchers directly.
@torch.library.custom_op("lorafast::lora_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@_forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("lorafast::lora_backward", mutates_args=())
def _backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
    need_dx: bool,
    need_da: bool,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _backward(grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_da, need_db)
    return tuple(g if g is not None else grad_y.new_empty(0) for g in grads)  # operators return no None


@_backward_op.register_fake
def _(grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_da, need_db):
    shapes = (x.shape, lora_A.shape, lora_B.shape)
    return tuple(grad_y.new_empty(shape if need else (0,)) for shape, need in zip(shapes, (need_dx, need_da, need_db)))


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """:func:`lora_forward` unchecked: the library's entry (its front door checked the inputs)."""
    if not torch.compiler.is_compiling():
        return _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return _forward_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_tensor(seed))


def backward(grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, needs_grad):
    """:func:`lora_backward` unchecked."""
    args = (grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p)
    if not torch.compiler.is_compiling():
        return _backward(*args, seed, *needs_grad)
    grads = _backward_op(*args, seed_tensor(seed), *needs_grad)
    return tuple(g if need else None for g, need in zip(grads, needs_grad, strict=True))


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, xa)`` for x ``(n, in)``: y ``(n, out)``, ``xa = drop(x)·Aᵀ`` ``(n, r)``.

    ``seed``: an int, or the 0-d int64 CPU tensor ``lorafast.dropout.dropout_seed`` gives under torch.compile.
    """
    check_operands(x, weight, lora_A, lora_B, bias, dropout_p)
    return forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int | torch.Tensor,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dX, dA, dB)``, each None where ``needs_grad`` says it is not wanted; ``seed`` as for :func:`lora_forward`."""
    check_operands(grad_y, weight, lora_A, lora_B, dropout_p=dropout_p, dx=True)
    check_tensor("x", x, (grad_y.shape[0], weight.shape[1]), grad_y)
    check_tensor("xa", xa, (grad_y.shape[0], lora_A.shape[0]), grad_y)
    return backward(grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, needs_grad)
