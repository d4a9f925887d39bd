"""``patch_peft``: run lorafast's fused LoRA linear inside a ``peft.PeftModel``, on PEFT's own parameters.

Each supported PEFT LoRA ``Linear`` gets a subclass whose ``forward`` calls :func:`lorafast.lora_linear` (one
active adapter) or :func:`lorafast.multi_lora_linear` (``adapter_names=``) on the base weight and
``lora_A[name].weight`` / ``lora_B[name].weight``. Nothing is copied or renamed: state_dict, ``save_pretrained``,
``set_adapter``, ``disable_adapter()``, merging and the Trainer stay PEFT's. A call that needs what lorafast lacks
(merged or disabled layer, several active adapters, a variant other than DoRA, ``lora_bias``, trainable base)
runs PEFT's forward unchanged. DoRA adapters run :func:`lorafast.dora.dora_linear` (over a quantized base too, see
:mod:`lorafast.base_linear`; dropout on the LoRA branch only: PEFT's second base GEMM on the dropped input is not
run, see :mod:`lorafast.dora`). PEFT's expert LoRA (``target_parameters``,
``lora.ParamWrapper``) on transformers' MoE experts runs :mod:`lorafast.expert_peft`.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections import Counter

import torch
from torch import nn

from .base_linear import base_lora_linear
from .bases import base_weight, is_quantized_linear
from .bases.bnb4 import bnb_class
from .bases.conv1d import recognises as is_conv1d
from .expert_peft import (
    fused_wrapper_class,
    is_param_wrapper,
    patched_wrapper_count,
    unpatch_peft_experts,
    wrapper_reason,
)
from .multi_function import MAX_STACKED_RANK, multi_lora_linear
from .multi_stack import stack_factors
from .peft_subclass import peft_subclass

logger = logging.getLogger(__name__)

_BASE = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch
_fused_class: type | None = None


def _peft_linear_class() -> type:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as err:  # pragma: no cover - peft is a test dependency
        raise ImportError("patch_peft needs the peft package (pip install peft)") from err
    return Linear


def _adapter_reason(layer: nn.Module, name: str) -> str | None:
    """Why ``layer``'s adapter ``name`` cannot run fused, or None when it can."""
    if name in layer.lora_variant and not _is_dora(layer, name):
        return type(layer.lora_variant[name]).__name__.removesuffix("LinearVariant") or "LoRA variant"
    if layer.lora_bias.get(name, False):
        return "lora_bias"
    if type(layer.lora_dropout[name]) not in (nn.Dropout, nn.Identity):
        return f"dropout {type(layer.lora_dropout[name]).__name__}"
    if not isinstance(layer.scaling[name], (int, float)):
        return "tensor scaling"
    if layer.r[name] > MAX_STACKED_RANK:
        return f"rank above {MAX_STACKED_RANK}"
    return None


def _is_dora(layer: nn.Module, name: str) -> bool:
    return type(layer.lora_variant.get(name)).__name__ == "DoraLinearVariant" and name in layer.lora_magnitude_vector


def _layer_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot be patched (its base, or every adapter, unsupported), or None when it can."""
    if type(layer) is not _peft_linear_class():
        return _tuner_name(layer)
    if not _has_plain_base(layer):
        return f"base {type(layer.base_layer).__name__}"
    base = layer.get_base_layer()
    quantized = is_quantized_linear(base)  # dequantized per call: lorafast.base_linear
    if not quantized and (not base.weight.is_floating_point() or base.weight.dim() != 2):
        return f"quantized base ({base.weight.dtype})"
    reasons = [_adapter_reason(layer, name) for name in layer.lora_A]
    # Patched when one adapter can run fused: each call checks its own adapter and falls back to PEFT.
    return None if None in reasons or not reasons else reasons[0]


def _has_plain_base(layer: nn.Module) -> bool:
    """Whether the layer's immediate base is a plain ``nn.Linear`` or ``Conv1D``, not another tuner's layer (as in a
    ``PeftMixedModel``, where PEFT's forward runs the inner tuner through ``base_layer``)."""
    base = layer.base_layer
    return type(base) is nn.Linear or is_conv1d(base) or is_quantized_linear(base)


def _dropout_p(layer: nn.Module, name: str) -> float:
    dropout = layer.lora_dropout[name]
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _base_is_frozen(layer: nn.Module) -> bool:
    base = layer.get_base_layer()
    return not torch.is_grad_enabled() or not (
        base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)
    )


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's ``Linear.forward`` (or its ``lora.bnb`` layers') with the LoRA layer computed by lorafast where
    supported."""
    adapter_names = kwargs.get("adapter_names")
    extra = {k: v for k, v in kwargs.items() if k != "adapter_names" and v is not None}
    if args or extra or self.disable_adapters or self.merged or not _has_plain_base(self) or not _base_is_frozen(self):
        return super(type(self), self).forward(x, *args, **kwargs)
    if adapter_names is not None:
        if is_quantized_linear(self.get_base_layer()):  # mixed batches over a quantized base: PEFT's forward
            return super(type(self), self).forward(x, *args, **kwargs)
        return _mixed_forward(self, x, adapter_names, kwargs)
    active = [a for a in self.active_adapters if a in self.lora_A]
    if len(active) != 1 or _adapter_reason(self, active[0]) is not None:
        return super(type(self), self).forward(x, *args, **kwargs)
    return peft_adapter_forward(self, x, active[0])


def _mixed_forward(self, x: torch.Tensor, adapter_names, kwargs) -> torch.Tensor:
    """PEFT's mixed batch (one adapter name per sequence) through :func:`multi_lora_linear`."""
    self._check_forward_args(x, **kwargs)
    names = [n for n in dict.fromkeys(adapter_names) if n != _BASE and n in self.lora_A]
    unsupported = {n: "DoRA" if _is_dora(self, n) else _adapter_reason(self, n) for n in names}
    unsupported = {n: r for n, r in unsupported.items() if r is not None}
    if unsupported:
        warnings.warn(
            f"lorafast.patch_peft: this mixed batch runs PEFT's forward, adapters {unsupported} are not supported",
            stacklevel=3,
        )
        return super(type(self), self).forward(x, **kwargs)
    if not names:
        return self.base_layer(x)
    index = {n: i for i, n in enumerate(names)}
    ids = torch.tensor([index.get(n, -1) for n in adapter_names], device=x.device)
    a, b = stack_factors([self.lora_A[n].weight for n in names], [self.lora_B[n].weight for n in names], x.dtype)
    scalings = [float(self.scaling[n]) for n in names]
    dropout = [_dropout_p(self, n) for n in names]
    bias = self.get_base_layer().bias
    return multi_lora_linear(x, base_weight(self.get_base_layer()), bias, a, b, scalings, ids, dropout, True)


def _make_fused_class() -> type:
    global _fused_class
    if _fused_class is None:
        _fused_class = peft_subclass(_peft_linear_class(), _fused_forward, __name__, "fused LoRA linear")
    return _fused_class


def __getattr__(name: str):
    # Lets pickle (torch.save of a whole patched model) find the class, built on first use.
    if name == "PeftFusedLinear":
        return _make_fused_class()
    if name.startswith("PeftFused") and name.removeprefix("PeftFused") in _PEFT_LAYERS:
        return _peft_fused_class(name.removeprefix("PeftFused"))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _tuner_name(layer: nn.Module) -> str:
    """PEFT's name for a tuner layer as its repr gives it: ``lora.Embedding``, ``ia3.Linear``."""
    parts = type(layer).__module__.split(".")
    tuner = parts[parts.index("tuners") + 1] if "tuners" in parts[:-1] else "peft"
    return f"{tuner}.{type(layer).__name__}"


def _is_peft_model(model) -> bool:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

    mixed = getattr(sys.modules.get("peft.mixed_model"), "PeftMixedModel", ())
    return isinstance(model, (PeftModel, BaseTuner, BaseTunerLayer, *((mixed,) if mixed else ())))


def patch_peft(model: nn.Module) -> nn.Module:
    """Run lorafast's fused LoRA linear in every supported PEFT LoRA ``Linear`` of ``model``; returns it.

    ``model``: a ``PeftModel``, a tuner model (``LoraModel``), a PEFT layer, or a module holding PEFT LoRA
    layers. Supported: a frozen floating ``nn.Linear`` or GPT-2 ``Conv1D`` base, PEFT's
    ``lora.bnb.Linear4bit``/``Linear8bitLt`` (QLoRA, see :mod:`lorafast.base_linear`; mixed batches there keep
    PEFT's forward), adapters plain or DoRA (over a quantized base too), without other variants or ``lora_bias``; and
    PEFT's ``ParamWrapper`` (``target_parameters``) on transformers' experts stacks (:mod:`lorafast.expert_peft`).
    Everything else (Embedding, Conv, other tuners, ...) keeps PEFT's forward, and one ``lorafast.peft_patch`` log
    line counts the patched layers and names why others are not (a warning when some, or all, are not patched).
    Never raises on a model PEFT accepts; calling again patches layers added since. TypeError if ``model`` is not
    an ``nn.Module``, ValueError if it is neither a PEFT model nor holds a PEFT layer.
    """
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_peft expects a peft.PeftModel (an nn.Module), got {type(model).__name__}")
    fused = _make_fused_class()
    tuner_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not tuner_layers and not _is_peft_model(model):
        raise ValueError(
            f"{type(model).__name__} holds no PEFT LoRA layer; patch_peft expects a peft.PeftModel "
            "(get_peft_model or PeftModel.from_pretrained)"
        )
    reasons: Counter[str] = Counter()
    patched = lora_count = 0
    for layer in tuner_layers:
        if not isinstance(layer, LoraLayer):
            reasons[_tuner_name(layer)] += 1
            continue
        lora_count += 1
        if is_param_wrapper(layer):  # target_parameters: lorafast.expert_peft
            reason = wrapper_reason(layer)
            if reason is None:
                layer.__class__ = fused_wrapper_class()
                patched += 1
            else:
                reasons[reason] += 1
            continue
        quantized = peft_fused_class(layer)  # PEFT's bitsandbytes layers
        if quantized is not None:
            layer.__class__ = quantized
            patched += 1
            continue
        if type(layer) is fused:
            patched += 1
            continue
        reason = _layer_reason(layer)
        if reason is None:
            layer.__class__ = fused
            patched += 1
        else:
            reasons[reason] += 1
    message = f"lorafast.patch_peft: {patched} of {lora_count} PEFT LoRA layers run lorafast's fused LoRA"
    if reasons:
        message += "; PEFT's forward kept for " + ", ".join(f"{n} ({r})" for r, n in reasons.most_common())
    elif not patched:
        message += f"; {type(model).__name__} holds no PEFT tuner layer"
    (logger.warning if reasons or not patched else logger.info)(message)
    return model


def unpatch_peft(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_peft`: every patched layer runs PEFT's own forward again. Returns ``model``."""
    unpatch_peft_quantized(model)
    unpatch_peft_experts(model)
    if _fused_class is None:
        return model
    linear = _peft_linear_class()
    for module in model.modules():
        if type(module) is _fused_class:
            module.__class__ = linear
    return model


def patched_layer_count(model: nn.Module) -> int:
    """How many layers of ``model`` run lorafast's fused LoRA through :func:`patch_peft`."""
    quantized = patched_quantized_count(model) + patched_wrapper_count(model)
    return quantized + (0 if _fused_class is None else sum(type(m) is _fused_class for m in model.modules()))


# PEFT's LoRA layers over bitsandbytes bases (lora.bnb.Linear4bit/Linear8bitLt)
_PEFT_LAYERS = ("Linear4bit", "Linear8bitLt")  # peft.tuners.lora.bnb's LoRA layers over bitsandbytes bases
_peft_fused: dict[str, type] = {}


def _peft_bnb_class(name: str) -> type | None:
    if bnb_class(name) is None:  # bitsandbytes not loaded
        return None
    from peft.tuners.lora import bnb as peft_bnb

    return getattr(peft_bnb, name, None)


def peft_adapter_forward(layer: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """A PEFT LoRA layer's adapter ``name`` (plain or DoRA) run by lorafast over its base of any kind."""
    magnitude = layer.lora_magnitude_vector[name].weight if _is_dora(layer, name) else None
    return base_lora_linear(x, layer.get_base_layer(), layer.lora_A[name].weight, layer.lora_B[name].weight,
                            layer.scaling[name], _dropout_p(layer, name), True, magnitude)  # fmt: skip


def _peft_fused_class(name: str) -> type:
    if name not in _peft_fused:
        _peft_fused[name] = peft_subclass(_peft_bnb_class(name), _fused_forward, __name__, "QLoRA linear")
    return _peft_fused[name]


def peft_fused_class(layer: nn.Module) -> type | None:
    """The class ``patch_peft`` gives a PEFT ``lora.bnb.Linear4bit``/``Linear8bitLt`` layer with an adapter
    lorafast runs (None for any other layer)."""
    for name in _PEFT_LAYERS:
        peft_class = _peft_bnb_class(name)
        if peft_class is None:
            continue
        if type(layer) is peft_class or type(layer) is _peft_fused.get(name):
            supported = any(_adapter_reason(layer, a) is None for a in layer.lora_A)
            return _peft_fused_class(name) if supported else None
    return None


def unpatch_peft_quantized(model: nn.Module) -> int:
    """Give every patched PEFT bnb layer of ``model`` its PEFT class back; returns how many were patched."""
    fused = {cls: cls.__mro__[1] for cls in _peft_fused.values()}
    count = 0
    for module in model.modules():
        if type(module) in fused:
            module.__class__ = fused[type(module)]
            count += 1
    return count


def patched_quantized_count(model: nn.Module) -> int:
    """How many PEFT bnb layers of ``model`` run lorafast's QLoRA linear."""
    fused = set(_peft_fused.values())
    return sum(type(m) in fused for m in model.modules())
