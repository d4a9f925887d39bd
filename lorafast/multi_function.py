"""The mixed-adapter LoRA linear ``y_i = x_i·W0ᵀ + b + s_k·(drop_k(x_i)·A_kᵀ)·B_kᵀ`` (k: row i's adapter out of K,
−1: the base layer only) as an autograd Function over each adapter's own factors, and its entry points
``multi_lora_linear`` (adapters stacked) and ``apply_multi_lora`` (the adapters' own Parameters, read in place).

Requests for different tasks share one batch, in inference and in training: backward gives every adapter exactly
the gradient its own rows would give it alone. Kept for backward: x itself, ``xa`` ``(n, R)``, the row ids and the
(parameter) weights, as in the one-adapter case.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .backend import front_door, implementation
from .validation import check_base_inputs, check_dropout, check_same_dtype_and_device, check_scaling

MAX_STACKED_RANK = 256


class MultiLoRALinearFunction(torch.autograd.Function):
    """Gradients for x and each adapter's own A and B only. x ``(..., in)``, weight ``(out, in)``, bias
    ``(out,)``/None, scalings ``(K,)``, row_adapter ``(n,)`` int64 (n rows of x), dropout ``(K,)`` float32 or None,
    seed, backend, for Triton optionally the batch's row tables (``kernels.batch_segments``) that forward and
    backward share, then the K A's ``(r_k, in)`` and the K B's ``(out, r_k)`` themselves (read in place by each
    call, forward and backward: no copy is kept); unchecked (see multi_lora_linear)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scalings, row_adapter, dropout, seed, backend, segments, *factors):
        num_adapters = len(factors) // 2
        tables = {} if segments is None else {"segments": segments}
        y, xa = implementation(backend, mixed=True)[0](
            x.reshape(-1, x.shape[-1]), weight, bias, factors[:num_adapters], factors[num_adapters:], scalings,
            row_adapter, dropout=dropout, seed=seed, **tables,
        )  # fmt: skip
        ctx.save_for_backward(x, xa, weight, scalings, row_adapter, dropout, *factors)
        ctx.backend, ctx.seed, ctx.tables, ctx.num_adapters = backend, seed, tables, num_adapters
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x, xa, weight, scalings, row_adapter, dropout, *factors = ctx.saved_tensors
        k = ctx.num_adapters
        needs = ctx.needs_input_grad
        needs_a, needs_b = needs[9 : 9 + k], needs[9 + k :]
        grad_x, grad_a, grad_b = implementation(ctx.backend, mixed=True)[1](
            grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1]), xa, weight, factors[:k], factors[k:],
            scalings, row_adapter, (needs[0], any(needs_a), any(needs_b)), dropout=dropout, seed=ctx.seed,
            **ctx.tables,
        )  # fmt: skip
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        grad_a = [g if need else None for g, need in zip(grad_a or [None] * k, needs_a)]
        grad_b = [g if need else None for g, need in zip(grad_b or [None] * k, needs_b)]
        return grad_x, *([None] * 8), *grad_a, *grad_b


def row_adapter_ids(adapter_ids: torch.Tensor, x_shape: Sequence[int], num_adapters: int | None = None) -> torch.Tensor:
    """One adapter id per row of x: ``(n,)`` int64, n = the product of ``x_shape[:-1]``.

    ``adapter_ids`` holds one id per row (shape ``x_shape[:-1]``) or one per sequence (``(x_shape[0],)``, repeated
    over the other leading dimensions). With ``num_adapters``, CPU ids are checked to lie in [-1, num_adapters); GPU
    ids are not (that would wait for the device): there an id outside the range counts as −1, on both backends.
    ValueError: ids that are not an integer tensor, of a shape that fits neither, or out of range.
    """
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype.is_floating_point or adapter_ids.is_complex():
        raise ValueError(f"adapter ids must be an integer tensor, got {adapter_ids!r:.80}")
    if adapter_ids.dtype == torch.bool:
        raise ValueError("adapter ids must be an integer tensor, got a bool tensor")
    leading = tuple(x_shape[:-1])
    if tuple(adapter_ids.shape) == leading:
        rows = adapter_ids.reshape(-1)
    elif adapter_ids.dim() == 1 and len(leading) >= 1 and adapter_ids.shape[0] == leading[0]:
        rows = adapter_ids.view(-1, *([1] * (len(leading) - 1))).expand(leading).reshape(-1)
    else:
        raise ValueError(
            f"adapter ids of shape {tuple(adapter_ids.shape)} fit neither the rows of x {leading} nor its "
            f"first dimension ({leading[0] if leading else 'none'}): give one id per row or per sequence"
        )
    if num_adapters is not None and rows.numel() and rows.device.type == "cpu":
        low, high = int(rows.min()), int(rows.max())
        if low < -1 or high >= num_adapters:
            bad = low if low < -1 else high
            raise ValueError(f"adapter id {bad} is out of range: ids must be in [-1, {num_adapters}) (−1: no adapter)")
    return rows.to(torch.int64)


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: Sequence[float] | torch.Tensor,
    adapter_ids: torch.Tensor,
    dropout_p: Sequence[float] | None = None,
    training: bool = False,
) -> torch.Tensor:
    """LoRA linear where each row picks its adapter: x ``(..., in)`` any strides -> ``(..., out)`` in x's dtype.

    Args:
        weight: frozen W0 ``(out, in)``; bias: frozen ``(out,)`` or None.
        lora_A: K adapters stacked ``(K, R, in)`` (an adapter of rank r < R has zero rows r..R-1); lora_B:
            ``(K, out, R)`` (zero columns r..R-1).
        scalings: each adapter's ``alpha / r``, K numbers (runtime values: no recompile); numbers and CPU tensors
            are checked to be finite, a tensor on x's GPU is used as it is.
        adapter_ids: ids in [-1, K) (−1: the base layer), any order, as :func:`row_adapter_ids` takes them.
        dropout_p: each adapter's dropout probability on its rows' LoRA input, K numbers in [0, 1) (None: none);
            applied when ``training``, seeded from torch's default generator (``torch.manual_seed`` reproduces it).

    Gradients flow to x, lora_A and lora_B. CUDA tensors run the Triton kernels (one launch per kernel for all
    adapters), others the PyTorch path; ``LORAFAST_BACKEND`` overrides as for :func:`lorafast.lora_linear`.
    ValueError on a shape, dtype or device mismatch, (CPU) ids out of range or of the wrong length, a stacked rank
    above 256, or a backend that cannot run these tensors.
    """

    def check(x, weight, bias, lora_A, lora_B):
        checked_scalings = check_multi_lora_inputs(x, weight, bias, lora_A, lora_B, scalings)
        rows = row_adapter_ids(adapter_ids, x.shape, lora_A.shape[0]).to(x.device)
        dropout = dropout_tensor(dropout_p, lora_A.shape[0], x.device) if training else None
        return dropout is not None, (checked_scalings, rows, dropout)

    return front_door(x, weight, bias, lora_A, lora_B, check, _run)


def dropout_tensor(dropout_p: Sequence[float] | None, num_adapters: int, device) -> torch.Tensor | None:
    """Per-adapter drop probabilities as a ``(K,)`` float32 tensor, None when none drops; ValueError: not K numbers
    in [0, 1)."""
    if dropout_p is None:
        return None
    values = list(dropout_p)
    if len(values) != num_adapters:
        raise ValueError(f"dropout_p must hold one probability per adapter (K={num_adapters}), got {values!r:.80}")
    for p in values:
        check_dropout(p)
    if not any(values):
        return None
    return host_values_on(values, torch.float32, device)


def host_values_on(values: Sequence[float], dtype: torch.dtype, device) -> torch.Tensor:
    """``values`` as a 1-D tensor on ``device``, copied without waiting for the device's stream."""
    values = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def apply_multi_lora(x, weight, bias, lora_A, lora_B, scalings, row_adapter, dropout=None, row_tables=None):
    """The mixed-adapter LoRA linear for the K adapters' own factors: lora_A K ``(r_k, in)``, lora_B K
    ``(out, r_k)`` (one floating dtype, which may differ from x's: fp32 factors on a half-precision base), read in
    place by every call. scalings ``(K,)`` tensor, row_adapter ``(n,)`` int64 and dropout ``(K,)`` float32 or None
    already made (shapes checked here). ``row_tables``: a ``RowAdapters`` whose cache keeps the Triton kernels' row
    tables of this batch for every layer that sees the same rows (None: built per call)."""
    lora_A, lora_B = list(lora_A), list(lora_B)

    def check(x, weight, bias, lora_A, lora_B):
        check_base_inputs({"x": x, "weight": weight}, x, weight, bias)
        check_same_dtype_and_device({"weight": weight} | ({} if bias is None else {"bias": bias}), x)
        check_factors(lora_A, lora_B, weight.shape[1], weight.shape[0], x.device)
        if max(a.shape[0] for a in lora_A) > MAX_STACKED_RANK:
            raise ValueError(f"the largest adapter rank must be at most {MAX_STACKED_RANK}")
        return dropout is not None, (scalings, row_adapter, dropout)

    return front_door(x, weight, bias, lora_A, lora_B, check, lambda *args: _run(*args, row_tables=row_tables))


def _run(tensors, checked, backend, seed, row_tables=None):
    x, weight, bias, lora_A, lora_B = tensors
    if isinstance(lora_A, torch.Tensor):  # stacked (multi_lora_linear): each adapter's block, a view
        lora_A, lora_B = lora_A.unbind(0), lora_B.unbind(0)
    scalings, row_adapter, dropout = checked
    segments = _row_segments(row_adapter, len(lora_A), row_tables) if backend == "triton" else None
    return MultiLoRALinearFunction.apply(
        x, weight, bias, scalings, row_adapter, dropout, seed, backend, segments, *lora_A, *lora_B
    )


def _row_segments(row_adapter: torch.Tensor, num_adapters: int, row_tables):
    """The Triton kernels' row tables of ``row_adapter``: from ``row_tables``'s cache (built on first use), or new."""
    from .kernels.multi_lora_linear import batch_segments

    if row_tables is None:
        return batch_segments(row_adapter, num_adapters)
    key = ("segments", row_adapter.device, row_adapter.shape[0], num_adapters)
    return row_tables.table(key, lambda: batch_segments(row_adapter, num_adapters))


def check_multi_lora_shapes(x, weight, bias, lora_A, lora_B) -> int:
    """Check a mixed-adapter call's shapes, dtypes and devices (no value is read from the device); returns K."""
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    out_features, in_features = check_base_inputs(named, x, weight, bias)
    if lora_A.dim() != 3 or lora_A.shape[2] != in_features or lora_A.shape[0] < 1:
        raise ValueError(
            f"lora_A must be K >= 1 stacked adapters of shape (K, R, in_features={in_features}), "
            f"got {tuple(lora_A.shape)}"
        )
    num_adapters, rank = lora_A.shape[:2]
    if not 1 <= rank <= MAX_STACKED_RANK:
        raise ValueError(f"the stacked rank R={rank} must be between 1 and {MAX_STACKED_RANK}")
    if tuple(lora_B.shape) != (num_adapters, out_features, rank):
        raise ValueError(
            f"lora_B must have shape (K, out_features, R) = ({num_adapters}, {out_features}, {rank}), "
            f"got {tuple(lora_B.shape)}"
        )
    check_same_dtype_and_device(named, x)
    return num_adapters


def scalings_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the scalings tensor for x of ``dtype``: float32 (float64 for float64 x)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_multi_lora_inputs(x, weight, bias, lora_A, lora_B, scalings) -> torch.Tensor:
    """:func:`check_multi_lora_shapes`, and the scalings as a ``(K,)`` tensor of :func:`scalings_dtype` on x's device:
    numbers and CPU tensors are checked to be finite, a GPU tensor is taken as it is (reading it would wait)."""
    num_adapters = check_multi_lora_shapes(x, weight, bias, lora_A, lora_B)
    dtype = scalings_dtype(x.dtype)
    if isinstance(scalings, torch.Tensor) and scalings.device.type != "cpu":
        if scalings.dim() != 1 or scalings.shape[0] != num_adapters or not scalings.is_floating_point():
            raise ValueError(f"scalings must hold one number per adapter (K={num_adapters}), got {scalings!r:.80}")
        if scalings.device != x.device:
            raise ValueError(f"device mismatch: x is on {x.device} but scalings is on {scalings.device}")
        return scalings.detach().to(dtype)
    if isinstance(scalings, torch.Tensor):
        values = scalings.detach().reshape(-1).tolist() if scalings.dim() <= 1 else None
    else:
        values = list(scalings)
    if values is None or len(values) != num_adapters:
        raise ValueError(f"scalings must hold one number per adapter (K={num_adapters}), got {scalings!r:.80}")
    for value in values:
        check_scaling(value)
    return host_values_on(values, dtype, x.device)


def check_factors(
    lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor], in_features: int, out_features: int, device
) -> None:
    """ValueError unless K >= 1 A's ``(r_k, in)`` and B's ``(out, r_k)``, one floating dtype, on ``device``."""
    if len(lora_A) != len(lora_B) or not lora_A:
        raise ValueError(f"need as many A's as B's, at least one: got {len(lora_A)} and {len(lora_B)}")
    dtype = lora_A[0].dtype
    for k, (a, b) in enumerate(zip(lora_A, lora_B)):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            raise ValueError(f"adapter {k}'s factors must be tensors, got {type(a).__name__}, {type(b).__name__}")
        if a.dim() != 2 or a.shape[1] != in_features or b.dim() != 2 or tuple(b.shape) != (out_features, a.shape[0]):
            raise ValueError(
                f"adapter {k}: A must be (r, in_features={in_features}) and B (out_features={out_features}, r), "
                f"got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if a.dtype != dtype or b.dtype != dtype or not dtype.is_floating_point:
            raise ValueError(
                f"the adapters of a mixed batch must share one floating dtype: adapter 0 is {dtype}, adapter {k} has "
                f"{a.dtype} and {b.dtype}"
            )
        if a.device != device or b.device != device:
            raise ValueError(f"device mismatch: x is on {device} but adapter {k}'s factors are on {a.device}")
