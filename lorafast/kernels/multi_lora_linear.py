"""The mixed-adapter LoRA linear's forward and backward composed from the Triton kernels.

Same contract as ``lorafast.multi_torch_backend`` (x ``(n, in)``, the K adapters' own A_k ``(r_k, in)`` and B_k
``(out, r_k)`` — stacked ``(K, R, in)``/``(K, out, R)`` at the checked entries — scalings ``(K,)`` float32,
row_adapter ``(n,)`` ids in [-1, K), dropout None or ``(K,)`` float32 p_k in [0, 1),
seed an int or a 0-d int64 CPU tensor). With k = row_adapter[i] and keep_i adapter k's dropout mask of x's row i
(``dropout_keep_mask(seed, (n, in), p_k)[i]``, regenerated from the seed in every kernel, never stored):

    drop(x)_i = x_i ⊙ keep_i / (1 − p_k)
    y_i = x_i·W0ᵀ + b + s_k·(drop(x)_i·A_kᵀ)·B_kᵀ,   xa_i = drop(x)_i·A_kᵀ (zeros where k = −1)
    dX_i = dY_i·W0 + s_k/(1 − p_k)·keep_i ⊙ ((dY_i·B_k)·A_k)
    dA_k = s_k/(1 − p_k)·Σ_{i: k_i = k} (dY_i·B_k)ᵀ·(x_i ⊙ keep_i),   dB_k = s_k·Σ_{i: k_i = k} dY_iᵀ·xa_i

One launch per kernel for all adapters, each reading the adapters' own storage through their factor table
(``multi_factors``: pointers, strides, ranks; no stacked copy that could go stale). Forward: under dropout
``multi_dropout_xa`` first projects the masked rows of the adapters with p_k > 0, then ``fused_multi_lora_forward``
(one pass over x: ``x·W0ᵀ``, the other rows' ``x_i·A_kᵀ``, the rank-R update). Backward: ``fused_multi_lora_dx``
(one pass over dY: ``dY·W0``, ``g_i = dY_i·B_k``, the masked rank-R update of dX), then the per-adapter
``multi_lora_weight_grad`` reductions for dA and dB, written into each adapter's own place of one flat buffer per kind.
The row tables (:func:`batch_segments`) are built once per batch by the caller and shared by forward and backward
(built here when not given). Under torch.compile both run as the operators ``lorafast::multi_lora_forward`` and
``lorafast::multi_lora_backward``: no graph break at a mixed-adapter layer.
"""

from __future__ import annotations

import torch

from .adapter_segments import BLOCK_M, AdapterSegments, RowChunks, adapter_segments, resolve_segments
from .entry import kernel_entry
from .launch import check_tensor
from .lora_linear import host_seed, seed_tensor
from .multi_factors import B_COL, adapter_factors, split_grads
from .multi_lora_matmul import check_operands, multi_dx, multi_forward, multi_lora_matmul
from .multi_lora_weight_grad import multi_weight_grad


def batch_segments(row_adapter: torch.Tensor, num_adapters: int) -> AdapterSegments:
    """The row tables of a batch (row_adapter ``(n,)`` ids in [-1, K)) that every kernel below reads."""
    return adapter_segments(row_adapter, num_adapters, BLOCK_M)


# The launchers' unchecked entries: multi_lora_linear checked these inputs at its front door. The adapters come as
# K A's (r_k, in) and K B's (out, r_k), read in place through their factor table; dA and dB as flat buffers.
@kernel_entry("the mixed-adapter LoRA forward")
def _forward(x, weight, bias, lora_A, lora_B, scalings, row_adapter, dropout, seed, segments):
    factors = adapter_factors(lora_A, lora_B)
    segments = segments or batch_segments(row_adapter, factors.num_adapters)
    return multi_forward(x, weight, bias, factors, scalings, segments, None, dropout, host_seed(seed))


@kernel_entry("the mixed-adapter LoRA backward")
def _backward(grad_y, x, xa, weight, lora_A, lora_B, scalings, row_adapter, needs_grad, dropout, seed, segments):
    need_dx, need_da, need_db = needs_grad
    grad_x = grad_a = grad_b = None
    if not (need_dx or need_da or need_db):
        return grad_x, grad_a, grad_b
    factors = adapter_factors(lora_A, lora_B)
    segments = segments or batch_segments(row_adapter, factors.num_adapters)
    seed, ranks, dtype = host_seed(seed), factors.ranks, factors.dtype
    if need_dx:
        grad_x, g = multi_dx(grad_y, weight, factors, scalings, segments, None, dropout, seed)
    elif need_da:
        _, g = multi_lora_matmul(grad_y, weight, factors, B_COL, None, scalings, segments, False, None, dropout, seed)
    if need_da:
        grad_a = multi_weight_grad(x, g, scalings, segments, ranks, dtype, True, dropout=dropout, seed=seed)
    if need_db:
        grad_b = multi_weight_grad(grad_y, xa, scalings, segments, ranks, dtype)
    return grad_x, grad_a, grad_b


# Operators take tensors, numbers and lists of them: the row tables travel as their tensors
# plus (block_m, chunk_rows), an empty list when the operator builds them itself.
def _flatten(segments: AdapterSegments | None) -> tuple[list[torch.Tensor], int, int]:
    if segments is None:
        return [], 0, 0
    s, chunks = segments, segments.chunks
    tensors = [s.order, s.bounds, s.block_adapter, s.block_rows, chunks.chunk_adapter, chunks.chunk_bounds]
    return tensors, s.block_m, chunks.chunk_rows


def _unflatten(tensors: list[torch.Tensor], block_m: int, chunk_rows: int) -> AdapterSegments | None:
    if not tensors:
        return None
    order, bounds, block_adapter, block_rows, chunk_adapter, chunk_bounds = tensors
    return AdapterSegments(
        order, bounds, block_adapter, block_rows, block_m, RowChunks(chunk_adapter, chunk_bounds, chunk_rows)
    )


# As ``lora_linear``'s operators: opaque graph nodes under torch.compile, shapes from the fake
# implementations; eager calls skip the dispatcher and run the launchers directly.
@torch.library.custom_op("lorafast::multi_lora_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: list[torch.Tensor],
    lora_B: list[torch.Tensor],
    scalings: torch.Tensor,
    row_adapter: torch.Tensor,
    dropout: torch.Tensor | None,
    seed: torch.Tensor,
    segment_tensors: list[torch.Tensor],
    block_m: int,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    segments = _unflatten(segment_tensors, block_m, chunk_rows)
    return _forward(x, weight, bias, lora_A, lora_B, scalings, row_adapter, dropout, seed, segments)


@_forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scalings, row_adapter, dropout, seed, segment_tensors, block_m, chunk_rows):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], max(a.shape[0] for a in lora_A))


@torch.library.custom_op("lorafast::multi_lora_backward", mutates_args=())
def _backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    weight: torch.Tensor,
    lora_A: list[torch.Tensor],
    lora_B: list[torch.Tensor],
    scalings: torch.Tensor,
    row_adapter: torch.Tensor,
    need_dx: bool,
    need_da: bool,
    need_db: bool,
    dropout: torch.Tensor | None,
    seed: torch.Tensor,
    segment_tensors: list[torch.Tensor],
    block_m: int,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    segments = _unflatten(segment_tensors, block_m, chunk_rows)
    needs = (need_dx, need_da, need_db)
    grads = _backward(grad_y, x, xa, weight, lora_A, lora_B, scalings, row_adapter, needs, dropout, seed, segments)
    return tuple(g if g is not None else grad_y.new_empty(0) for g in grads)  # operators return no None


@_backward_op.register_fake
def _(
    grad_y, x, xa, weight, lora_A, lora_B, scalings, row_adapter, need_dx, need_da, need_db, dropout, seed,
    segment_tensors, block_m, chunk_rows,
):  # fmt: skip
    total_rank = sum(a.shape[0] for a in lora_A)
    shapes = (x.shape, (total_rank * x.shape[1],), (total_rank * grad_y.shape[1],))
    dtypes = (grad_y.dtype, lora_A[0].dtype, lora_A[0].dtype)
    return tuple(
        grad_y.new_empty(shape if need else (0,), dtype=dtype)
        for shape, dtype, need in zip(shapes, dtypes, (need_dx, need_da, need_db))
    )


def multi_lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor,
    row_adapter: torch.Tensor,
    dropout: torch.Tensor | None = None,
    seed: int | torch.Tensor = 0,
    segments: AdapterSegments | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y (n, out), xa (n, R))`` for x ``(n, in)``, checked; ``xa_i = drop(x)_i·A_kᵀ`` (zeros where k = −1).

    ``lora_A`` ``(K, R, in)``, ``lora_B`` ``(K, out, R)``: K adapters stacked (each read in place, as a view);
    ``dropout``: None or ``(K,)`` float32 on x's device (p_k = 0: exactly no dropout for adapter k); ``seed``:
    ``lorafast.dropout.dropout_seed()``; ``segments``: :func:`batch_segments` of row_adapter if built.
    """
    seed = host_seed(seed)
    num_adapters = check_operands(x, weight, lora_A, lora_B, scalings, row_adapter, bias, dropout, seed)
    segments = resolve_segments(segments, row_adapter, num_adapters, x.shape[0], x.device, None)
    return _forward(x, weight, bias, lora_A.unbind(0), lora_B.unbind(0), scalings, row_adapter, dropout, seed, segments)


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
    seed: int | torch.Tensor = 0,
    segments: AdapterSegments | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dX (n, in), dA (K, R, in), dB (K, out, R))``, checked, each None where ``needs_grad`` says not wanted;
    an adapter's dA and dB sum over its own rows only. ``xa``, ``dropout``, ``seed``, ``segments``: the forward's."""
    n, seed = grad_y.shape[0], host_seed(seed)
    num_adapters = check_operands(grad_y, weight, lora_A, lora_B, scalings, row_adapter, None, dropout, seed, dx=True)
    check_tensor("x", x, (n, weight.shape[1]), grad_y)
    check_tensor("xa", xa, (n, lora_A.shape[1]), grad_y)
    segments = resolve_segments(segments, row_adapter, num_adapters, n, grad_y.device, None)
    grad_x, grad_a, grad_b = _backward(
        grad_y, x, xa, weight, lora_A.unbind(0), lora_B.unbind(0), scalings, row_adapter, needs_grad, dropout, seed,
        segments,
    )  # fmt: skip
    return grad_x, _view(grad_a, lora_A.shape), _view(grad_b, lora_B.shape)


def _view(flat: torch.Tensor | None, shape) -> torch.Tensor | None:
    return None if flat is None else flat.view(shape)


def forward(x, weight, bias, lora_A, lora_B, scalings, row_adapter, dropout=None, seed=0, segments=None):
    """The library's unchecked entry (its front door checked the inputs): ``(y (n, out), xa (n, R))`` for the K
    adapters' own A's ``(r_k, in)`` and B's ``(out, r_k)`` (sequences; one dtype, which may differ from x's)."""
    args = (x, weight, bias, list(lora_A), list(lora_B), scalings, row_adapter, dropout)
    if not torch.compiler.is_compiling():
        return _forward(*args, seed, segments)
    return _forward_op(*args, seed_tensor(seed), *_flatten(segments))


def backward(grad_y, x, xa, weight, lora_A, lora_B, scalings, row_adapter, needs_grad, dropout=None, seed=0,
             segments=None):  # fmt: skip
    """:func:`forward`'s backward: ``(dX, [dA_k (r_k, in)], [dB_k (out, r_k)])`` (None where not needed), each
    adapter's gradients in its factors' dtype, views of one flat buffer per kind."""
    args = (grad_y, x, xa, weight, list(lora_A), list(lora_B), scalings, row_adapter)
    if not torch.compiler.is_compiling():
        grads = _backward(*args, needs_grad, dropout, seed, segments)
    else:
        grads = _backward_op(*args, *needs_grad, dropout, seed_tensor(seed), *_flatten(segments))
        grads = tuple(g if need else None for g, need in zip(grads, needs_grad, strict=True))
    grad_x, grad_a, grad_b = grads
    ranks = [a.shape[0] for a in lora_A]
    grad_a = None if grad_a is None else split_grads(grad_a, ranks, x.shape[1], transpose=True)
    grad_b = None if grad_b is None else split_grads(grad_b, ranks, grad_y.shape[1], transpose=False)
    return grad_x, grad_a, grad_b
