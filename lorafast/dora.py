"""DoRA (weight-decomposed LoRA): ``y = g ⊙ (x·W0ᵀ + s·(drop(x)·Aᵀ)·Bᵀ) + b``, ``g = m / ‖W0 + s·B·A‖_row``.

The row norm is detached (no gradient flows through it), as in PEFT and the DoRA paper (section 4.3). It is computed
without any ``(out, in)`` temporary from ``‖W0 + s·BA‖²_row = ‖W0‖²_row + 2s·rowsum((W0·Aᵀ) ⊙ B) +
s²·rowsum((B·(A·Aᵀ)) ⊙ B)``: ``‖W0‖²_row`` is cached per base weight (recomputed when the weight's storage or
version changes, e.g. after a merge), the rest costs one skinny ``W0·Aᵀ`` ``(out, r)`` per call.

Dropout acts on the LoRA branch only, as for plain LoRA (one base GEMM; PEFT's DoRA runs a second base GEMM on the
dropped input, ``W0·x + (g-1)·W0·drop(x) + g·s·BA·drop(x)``; both have the same expectation, and they are equal at
dropout 0 or in eval). Backward keeps x (the caller's), ``xa = drop(x)·Aᵀ`` ``(n, r)``, the output y (shared with
whatever the next op saves of it) and two ``(out,)`` vectors; m's gradient ``Σₙ dY ⊙ z / ‖·‖`` uses the pre-scale
output ``z = (y - b) / g`` recovered from y (columns where m = 0 are recomputed from x), so no ``(n, out)`` tensor
is kept beyond y and nothing is recomputed by a base GEMM. dA, dB, dX are the LoRA gradients of ``dY ⊙ g``.

:class:`ReloadedWeightDoRALinearFunction` is the same over a transient W0 that backward rebuilds instead of keeping
(a dequantized quantized weight, :func:`lorafast.base_linear.base_lora_linear`).

Under ``torch.compile(fullgraph=True)`` nothing breaks the graph: ``‖W0‖²_row`` is computed in the graph (a cache
keyed on storage cannot be guarded; one more read of W0), the Triton forward runs as ``lorafast::dora_forward`` and
m's gradient, data-dependent where m = 0, as ``lorafast::dora_magnitude_grad``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from .backend import front_door, implementation
from .validation import lora_inputs_check

# id(weight) -> (weakref to it, its storage key, its row norms²); an entry goes when its weight is freed
_BASE_NORMS: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}


def _storage_key(weight: torch.Tensor) -> tuple:
    return (weight.data_ptr(), weight._version, tuple(weight.shape), tuple(weight.stride()), weight.dtype)


def base_row_norms_sq(weight: torch.Tensor, dense: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """``‖W0‖²`` per row of weight ``(out, in)`` -> ``(out,)`` in fp32 (fp64 for fp64), cached per weight tensor
    (its ``_base`` for a view) and recomputed when its storage, version (an in-place change) or layout changes.

    ``dense``: for a weight that is not W0 itself (a quantized weight's packed data), a callable giving W0
    ``(out, in)`` (a dequantization), called only when the norms are (re)computed.
    """
    if torch.compiler.is_compiling():  # a cache keyed on storage cannot be guarded: one more read of W0, in-graph
        return _row_norms_sq(weight if dense is None else dense())
    owner = weight._base if weight._base is not None else weight
    key = (*_storage_key(weight), _storage_key(owner))
    cached = _BASE_NORMS.get(id(owner))
    if cached is not None and cached[0]() is owner and cached[1] == key:
        return cached[2]
    norms = _row_norms_sq(weight if dense is None else dense())
    ident = id(owner)
    _BASE_NORMS[ident] = (weakref.ref(owner, lambda _: _BASE_NORMS.pop(ident, None)), key, norms)
    return norms


@torch.no_grad()
def _row_norms_sq(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(weight, dim=1, dtype=torch.promote_types(weight.dtype, torch.float32)).square()


@torch.no_grad()
def dora_weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    base_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """``‖W0 + s·B·A‖`` per row ``(out,)`` (fp32, fp64 for fp64) for weight ``(out, in)``, lora_A ``(r, in)``,
    lora_B ``(out, r)``, without forming ``B·A``; ``base_sq``: ``‖W0‖²_row`` (None: :func:`base_row_norms_sq`)."""
    if base_sq is None:
        base_sq = base_row_norms_sq(weight)
    wa = torch.mm(weight, lora_A.to(weight.dtype).t())  # (out, r), the one product over in_features
    return norm_from_product(base_sq, wa, lora_A, lora_B, scaling)


@torch.no_grad()
def norm_from_product(
    base_sq: torch.Tensor, wa: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``‖W0 + s·B·A‖`` per row ``(out,)`` in base_sq's dtype from ``‖W0‖²_row`` base_sq ``(out,)`` and ``W0·Aᵀ``
    wa ``(out, r)``: ``sqrt(‖W0‖² + 2s·rowsum(wa ⊙ B) + s²·rowsum((B·(A·Aᵀ)) ⊙ B))``."""
    acc = base_sq.dtype
    a, b = lora_A.to(acc), lora_B.to(acc)
    cross = (wa.to(acc) * b).sum(1)
    quad = (torch.mm(b, a @ a.t()) * b).sum(1)
    return (base_sq + (2.0 * scaling) * cross + (scaling * scaling) * quad).clamp_min_(0.0).sqrt_()


def _pre_scale_columns(x, xa, weight, lora_B, scaling, cols):
    """``z[:, cols]`` = ``x·W0[cols]ᵀ + s·xa·B[cols]ᵀ`` ``(n, len(cols))``."""
    return torch.addmm(x @ weight[cols].t(), xa, lora_B[cols].t(), alpha=scaling)


def _scaled_rows(g: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each ``(out, k)`` tensor with its rows scaled by g ``(out,)``, in its dtype."""
    return tuple(t * g.to(t.dtype)[:, None] for t in tensors)


def _folds_into_weight(backend: str, x: torch.Tensor) -> bool:
    """The PyTorch path runs DoRA as LoRA on ``g ⊙ W0`` and ``g ⊙ B`` (a transient copy of W0) when x has at least
    as many rows as in_features: no pass over the ``(n, out)`` output for g, in forward or in backward."""
    return backend != "triton" and x.shape[0] >= x.shape[1]


def _dora_forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, backend, base_sq, owned):
    """The forward of both DoRA Functions -> ``(y, xa, norm, g)``; ``owned``: weight is a transient copy that may be
    overwritten (g is folded into it in place)."""
    norm = dora_weight_norm(weight, lora_A, lora_B, scaling, base_sq)
    g = magnitude.detach().to(norm.dtype) / norm  # fp32 (fp64 for fp64)
    x2 = x.reshape(-1, x.shape[-1])
    if backend == "triton":  # g in the fused GEMM's epilogue
        from .kernels.dora_linear import forward as dora_forward

        y, xa = dora_forward(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, g.float())
    elif _folds_into_weight(backend, x2):
        scaled_w = weight.mul_(g.to(weight.dtype)[:, None]) if owned else _scaled_rows(g, weight)[0]
        y, xa = implementation(backend)[0](x2, scaled_w, bias, lora_A, *_scaled_rows(g, lora_B), scaling, dropout_p,
                                           seed)  # fmt: skip
    else:
        y, xa = implementation(backend)[0](x2, weight, None, lora_A, lora_B, scaling, dropout_p, seed)
        if bias is None:
            y.mul_(g.to(y.dtype))
        else:  # one pass over y
            torch.addcmul(bias, y, g.to(y.dtype), out=y)
    ctx.scaling, ctx.dropout_p, ctx.seed, ctx.backend = scaling, dropout_p, seed, backend
    # read in backward only for m's gradient; traced code reads m itself
    ctx.zero_flag = ZeroFlag(magnitude) if ctx.needs_input_grad[5] and not torch.compiler.is_compiling() else None
    return y.view(*x.shape[:-1], weight.shape[0]), xa, norm, g


def _dora_backward(ctx, grad_y, x, xa, weight, bias, lora_A, lora_B, magnitude, norm, g, y, owned):
    """``(dX, dA, dB, dm)`` of both DoRA Functions; weight None where dX is not needed and m has no zero (nothing
    reads it then); ``owned`` as in :func:`_dora_forward`."""
    needs = ctx.needs_input_grad
    grad_y = grad_y.reshape(-1, grad_y.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    grad_m = None
    if needs[5]:
        args = (grad_y, y.reshape(grad_y.shape), x2, xa, weight, bias, lora_B, magnitude, norm, ctx.scaling)
        grad_m = (
            _magnitude_grad_op(*args)
            if torch.compiler.is_compiling()
            else _magnitude_grad(*args, has_zero(ctx, magnitude))
        )
    grad_x = grad_a = grad_b = None
    if needs[0] or needs[3] or needs[4]:
        wanted = (needs[0], needs[3], needs[4])
        args = (ctx.scaling, ctx.dropout_p, ctx.seed, wanted)
        if _folds_into_weight(ctx.backend, x2):  # dB = g ⊙ (the gradient of g ⊙ B)
            if weight is not None:  # after m's gradient, which reads the unscaled rows
                weight = weight.mul_(g.to(weight.dtype)[:, None]) if owned else _scaled_rows(g, weight)[0]
            grad_x, grad_a, grad_b = implementation(ctx.backend)[1](
                grad_y, x2, xa, weight, lora_A, *_scaled_rows(g, lora_B), *args
            )
            if grad_b is not None:
                grad_b = _scaled_rows(g, grad_b)[0]
        else:
            grad_x, grad_a, grad_b = implementation(ctx.backend)[1](
                grad_y * g.to(grad_y.dtype), x2, xa, weight, lora_A, lora_B, *args
            )
    if grad_x is not None:
        grad_x = grad_x.view(x.shape)
    return grad_x, grad_a, grad_b, grad_m


class DoRALinearFunction(torch.autograd.Function):
    """x ``(..., in)``, weight ``(out, in)``, bias, lora_A ``(r, in)``, lora_B ``(out, r)``, magnitude ``(out,)``,
    scaling, dropout_p, seed, backend, base_sq -> ``(..., out)``; unchecked (see :func:`dora_linear`).

    ``y = g ⊙ z + b`` with g constant is LoRA with W0 and B row-scaled by g: the Triton path applies g in the fused
    GEMM's epilogue (forward) and runs the LoRA backward on ``dY ⊙ g``; the PyTorch path scales W0 and B instead
    (:func:`_folds_into_weight`) or, for few rows, scales the output and dY.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, backend, base_sq):
        y, xa, norm, g = _dora_forward(
            ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, backend, base_sq, False
        )
        ctx.save_for_backward(x, xa, weight, bias, lora_A, lora_B, magnitude, norm, g, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, xa, weight, bias, lora_A, lora_B, magnitude, norm, g, y = ctx.saved_tensors
        grad_x, grad_a, grad_b, grad_m = _dora_backward(
            ctx, grad_y, x, xa, weight, bias, lora_A, lora_B, magnitude, norm, g, y, False
        )
        return grad_x, None, None, grad_a, grad_b, grad_m, None, None, None, None, None


class ReloadedWeightDoRALinearFunction(torch.autograd.Function):
    """:class:`DoRALinearFunction` over a transient weight ``(out, in)`` (e.g. a dequantized W0), with one more
    argument, ``reload``: a callable giving that weight again. The weight is not saved (backward calls ``reload()``
    where dX needs it) and may be overwritten in place; saved: x, xa ``(n, r)``, y, the factors, bias and three
    ``(out,)`` vectors."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, backend, base_sq, reload):
        y, xa, norm, g = _dora_forward(
            ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, backend, base_sq, True
        )
        ctx.save_for_backward(x, xa, bias, lora_A, lora_B, magnitude, norm, g, y)
        ctx.reload = reload
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, xa, bias, lora_A, lora_B, magnitude, norm, g, y = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # m's gradient reads W0 only on columns where m = 0
        wanted = needs[0] or (needs[5] and has_zero(ctx, magnitude))
        weight = ctx.reload() if wanted else None
        grad_x, grad_a, grad_b, grad_m = _dora_backward(
            ctx, grad_y, x, xa, weight, bias, lora_A, lora_B, magnitude, norm, g, y, True
        )
        return grad_x, None, None, grad_a, grad_b, grad_m, None, None, None, None, None, None


class ZeroFlag:
    """Whether magnitude ``(out,)`` has a zero, asked in backward without waiting for the device there.

    The forward computes the flag; on CUDA it copies it to pinned host memory behind an event, asynchronously. By the
    time backward asks, that event has long completed, so reading the copy does not drain the stream (as
    ``bool((m == 0).any())`` in backward would: it waits for all the work queued before it). Under CUDA graph capture
    (no copy to the host may be captured) m is read when asked.
    """

    def __init__(self, magnitude: torch.Tensor):
        self.magnitude, self.event = None, None
        if magnitude.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            self.magnitude = magnitude
            return
        flag = (magnitude.detach() == 0).any()
        if magnitude.device.type == "cuda":
            self.host = torch.empty((), dtype=torch.bool, pin_memory=True).copy_(flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = flag

    def __call__(self) -> bool:
        if self.magnitude is not None:
            return bool((self.magnitude.detach() == 0).any())
        if self.event is not None:
            self.event.synchronize()  # recorded in forward: complete by now
        return bool(self.host)  # a host tensor: no device to wait for


def has_zero(ctx, magnitude: torch.Tensor) -> bool:
    """Whether the forward's magnitude has a zero: its :class:`ZeroFlag`, else (compiled forward) read from m."""
    return ctx.zero_flag() if ctx.zero_flag is not None else bool((magnitude == 0).any())


def _magnitude_grad(grad_y, y, x, xa, weight, bias, lora_B, magnitude, norm, scaling, m_has_zero=None):
    """``dm = Σₙ dY ⊙ z / ‖·‖ = (Σₙ dY ⊙ (y - b)) / m`` ``(out,)`` in m's dtype; columns with m = 0 (y holds no
    trace of z there) from z recomputed on those columns only. ``m_has_zero``: whether m has a zero, if known (a
    :class:`ZeroFlag`'s answer; None: read from m, which waits for the device)."""
    acc = torch.promote_types(y.dtype, torch.float32)
    dot = torch.linalg.vecdot(grad_y.to(acc), y.to(acc), dim=0)
    if bias is not None:
        dot -= bias.to(acc) * grad_y.sum(0, dtype=acc)
    m = magnitude.detach().to(acc)
    zero = m == 0
    grad_m = dot / torch.where(zero, 1.0, m)
    if bool(zero.any()) if m_has_zero is None else m_has_zero:
        cols = zero.nonzero().squeeze(1)
        z = _pre_scale_columns(x, xa, weight, lora_B.to(x.dtype), scaling, cols).to(acc)
        grad_m[cols] = (grad_y[:, cols].to(acc) * z).sum(0) / norm[cols].to(acc)
    return grad_m.to(magnitude.dtype)


# The m = 0 columns make _magnitude_grad data-dependent: under torch.compile it runs as one opaque operator.
@torch.library.custom_op("lorafast::dora_magnitude_grad", mutates_args=())
def _magnitude_grad_op(
    grad_y: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    return _magnitude_grad(grad_y, y, x, xa, weight, bias, lora_B, magnitude, norm, scaling)


@_magnitude_grad_op.register_fake
def _(grad_y, y, x, xa, weight, bias, lora_B, magnitude, norm, scaling):
    return magnitude.new_empty(magnitude.shape)


def check_magnitude(magnitude, out_features: int | None, x) -> None:
    """ValueError unless magnitude is a 1-D floating tensor of ``out_features`` (None: any) on x's device."""
    if not isinstance(magnitude, torch.Tensor) or magnitude.dim() != 1 or not magnitude.is_floating_point():
        raise ValueError(f"magnitude must be a 1-D floating tensor (out_features,), got {magnitude!r:.80}")
    if out_features is not None and magnitude.shape[0] != out_features:
        raise ValueError(f"magnitude must have shape ({out_features},), got {tuple(magnitude.shape)}")
    if isinstance(x, torch.Tensor) and magnitude.device != x.device:
        raise ValueError(f"device mismatch: x is on {x.device} but magnitude is on {magnitude.device}")


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """The DoRA linear (module docstring): x ``(..., in)`` -> ``(..., out)`` in x's dtype.

    Args as :func:`lorafast.lora_linear`, plus magnitude m ``(out,)`` (any floating dtype on x's device; its
    gradient arrives in its dtype). ValueError on bad shapes, dtypes or devices, as lora_linear's.
    """
    out_features = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
    check_magnitude(magnitude, out_features, x)

    check = lora_inputs_check(scaling, dropout_p, training)

    def run(tensors, p, backend, seed):
        # the cached norms of the weight itself; under autocast its cast copy's, computed for this call
        base_sq = base_row_norms_sq(weight) if tensors[1] is weight else None
        return DoRALinearFunction.apply(*tensors, magnitude, float(scaling), p, seed, backend, base_sq)

    return front_door(x, weight, bias, lora_A, lora_B, check, run)


@torch.no_grad()
def initial_magnitude(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """PEFT's initial magnitude: ``‖W0 + s·B·A‖`` per row ``(out,)`` (``‖W0‖_row`` while B is zero)."""
    return dora_weight_norm(weight, lora_A, lora_B, scaling, base_row_norms_sq(weight))


@torch.no_grad()
def merged_weight(weight, lora_A, lora_B, magnitude, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's DoRA merge of weight ``(out, in)``: ``(g·(W0 + s·B·A) (out, in) fp32, g (out,))``, g = m/‖W0 + s·BA‖."""
    g = magnitude.float() / dora_weight_norm(weight, lora_A, lora_B, scaling).float()
    return (weight.float() + scaling * (lora_B.float() @ lora_A.float())).mul_(g[:, None]), g


@torch.no_grad()
def unmerged_weight(weight, lora_A, lora_B, g, scaling) -> torch.Tensor:
    """PEFT's DoRA unmerge: ``W/g - s·B·A`` ``(out, in)`` fp32 for the merged weight and the g it was merged with."""
    return weight.float().div_(g.float()[:, None]).sub_(scaling * (lora_B.float() @ lora_A.float()))
