"""Input checks of the LoRA linear, run before any work so that bad input fails early and clearly."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_rank(r: int, in_features: int | None = None, out_features: int | None = None) -> None:
    """Raise ValueError unless ``r`` is an int >= 1.

    As PEFT, a rank above ``min(in_features, out_features)`` is allowed: ``B·A`` then has rank at most
    ``min(in, out)``, over-parameterised but legal (tiny heads and PEFT's own tests use it).
    """
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"LoRA rank r must be an int, got {type(r).__name__}")
    if r < 1:
        layer = "" if in_features is None else f" (layer of in_features={in_features}, out_features={out_features})"
        raise ValueError(f"LoRA rank r={r} must be at least 1{layer}")


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The LoRA update's scale: ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora`` (rank-stabilised LoRA)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def check_dropout(p: float) -> None:
    """Raise ValueError unless the dropout probability is in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"LoRA dropout probability must be a number in [0, 1), got {p!r}")


def check_scaling(scaling: float) -> None:
    """Raise ValueError unless ``scaling`` (alpha / r) is a finite number."""
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"LoRA scaling (alpha / r) must be a finite number, got {scaling!r}")


def check_lora_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
) -> None:
    """Check x ``(..., in)``, weight ``(out, in)``, bias ``(out,)``/None, lora_A ``(r, in)``, lora_B ``(out, r)``: one
    floating dtype, one device."""
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    out_features, in_features = check_base_inputs(named, x, weight, bias)
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must have shape (r, in_features={in_features}), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    check_rank(r, in_features, out_features)
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lora_B must have shape (out_features, r) = ({out_features}, {r}), got {tuple(lora_B.shape)}")
    check_scaling(scaling)
    check_dropout(dropout_p)
    check_same_dtype_and_device(named, x)


def lora_inputs_check(scaling: float, dropout_p: float, training: bool):
    """The ``check`` a one-adapter call gives :func:`lorafast.backend.front_door`: :func:`check_lora_inputs` on its
    tensors, then ``(whether to draw a dropout seed, the dropout in effect)`` (dropout acts in training only)."""

    def check(*tensors):
        check_lora_inputs(*tensors, scaling, dropout_p)
        return training and dropout_p > 0.0, float(dropout_p) if training else 0.0

    return check


def check_tensors(named: dict[str, torch.Tensor], bias: torch.Tensor | None) -> None:
    """Raise ValueError unless every value of ``named`` is a tensor; adds ``bias`` to ``named`` when given."""
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_base_inputs(
    named: dict[str, torch.Tensor], x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[int, int]:
    """Check that ``named`` holds tensors, and x ``(..., in)``, weight ``(out, in)``, bias ``(out,)`` or None.

    Adds ``bias`` to ``named`` when given; returns ``(out_features, in_features)``.
    """
    check_tensors(named, bias)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features = {in_features}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    return out_features, in_features


def check_same_dtype_and_device(named: dict[str, torch.Tensor], x: torch.Tensor) -> None:
    """Raise ValueError unless x is floating and every tensor in ``named`` has x's dtype and device."""
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {x.dtype}")
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise ValueError(
                f"dtype mismatch: x is {x.dtype} but {name} is {t.dtype}; cast them to one dtype "
                "(or run under torch.autocast)"
            )
        if t.device != x.device:
            raise ValueError(f"device mismatch: x is on {x.device} but {name} is on {t.device}")


def autocast_dtype(x) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes in on x's device, or None where autocast is off there."""
    if not (isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)):
        return None
    return torch.get_autocast_dtype(x.device.type)


def autocast_inputs(x, *tensors):
    """Under ``torch.autocast`` for x's device: x and ``tensors`` cast to the autocast dtype (non-floating
    and None left alone), as ``torch.nn.functional.linear`` would see them; otherwise None."""
    dtype = autocast_dtype(x)
    if dtype is None:
        return None
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in (x, *tensors))
