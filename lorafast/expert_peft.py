"""``patch_peft`` for PEFT's expert LoRA (``LoraConfig(target_parameters=[...])``, ``lora.ParamWrapper``).

PEFT adapts a 3-D expert parameter by nesting one ``ParamWrapper`` per parameter around the experts module (the
outermost wraps the last parameter); each forward it registers ``W + s·B·A`` for every expert as a
``torch.nn.utils.parametrize`` proxy and runs the experts on it. A patched wrapper instead collects the active
factors of its whole chain (views of PEFT's ``lora_A`` ``(E·r, in)`` and ``lora_B`` ``(out, r·E)``, no copy) and
runs :func:`lorafast.experts.lora_experts_forward`: no ``E×out×in`` tensor. PEFT's modules, parameters, keys and
files are untouched; a call lorafast does not cover (merged or disabled wrappers, a base that is not a transformers
experts stack, a trainable expert weight, PEFT options it refuses anyway) runs PEFT's forward.
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import is_experts_module, lora_experts_forward, peft_expert_factors
from .peft_subclass import peft_subclass

_fused_class: type | None = None


def _param_wrapper_class() -> type | None:
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:  # peft without target_parameters
        return None
    return ParamWrapper


def _chain(wrapper: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """``(wrappers from this one inwards, the module they wrap)``."""
    param_wrapper = _param_wrapper_class()
    chain = []
    while isinstance(wrapper, param_wrapper):
        chain.append(wrapper)
        wrapper = wrapper.base_layer
    return chain, wrapper


def wrapper_reason(wrapper: nn.Module) -> str | None:
    """Why a PEFT ``ParamWrapper`` cannot run lorafast's expert LoRA, or None when it can."""
    chain, base = _chain(wrapper)
    if not is_experts_module(base):
        return f"target_parameters on {type(base).__name__}"
    for w in chain:
        if w.num_experts < 2 or getattr(base, w.parameter_name).dim() != 3:
            return "target_parameters on a 2-D parameter"
        if any(w.lora_bias.get(a, False) for a in w.lora_A) or any(a in w.lora_variant for a in w.lora_A):
            return "target_parameters with lora_bias or a variant"
    return None


def _call_reason(wrapper: nn.Module, args: tuple, kwargs: dict) -> str | None:
    """Why this call runs PEFT's forward (None: lorafast's)."""
    chain, base = _chain(wrapper)
    if len(args) != 2 or kwargs or wrapper_reason(wrapper) is not None:
        return "arguments"
    if hasattr(base, "parametrizations") or getattr(base, "_is_expert_parallel", False):
        return "parametrized or expert-parallel base"
    for w in chain:
        if w.disable_adapters or w.merged:
            return "disabled or merged"
        if torch.is_grad_enabled() and getattr(base, w.parameter_name).requires_grad:
            return "trainable expert weight"
    return None


def _active_factors(wrapper: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float, float] | None:
    """``(lora_A (E, r, in), lora_B (E, out, r), scaling, 0.0)`` of the wrapper's active adapters; several active
    adapters are stacked along r with each scaling folded into its B (their updates add, as PEFT's)."""
    active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if not active:
        return None
    factors = [
        peft_expert_factors(wrapper.lora_A[a].weight, wrapper.lora_B[a].weight, wrapper.num_experts) for a in active
    ]
    if len(active) == 1:
        return (*factors[0], float(wrapper.scaling[active[0]]), 0.0)
    lora_A = torch.cat([a for a, _ in factors], dim=1)
    lora_B = torch.cat([b * float(wrapper.scaling[n]) for (_, b), n in zip(factors, active)], dim=2)
    return lora_A, lora_B, 1.0, 0.0


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's ``ParamWrapper.forward`` with the whole wrapper chain run by lorafast's expert LoRA where supported."""
    if _call_reason(self, args, kwargs) is not None:
        return super(_fused_class, self).forward(x, *args, **kwargs)
    chain, base = _chain(self)
    adapters = {w.parameter_name: f for w in chain if (f := _active_factors(w)) is not None}
    return lora_experts_forward(base, x, *args, adapters, self.training)


def fused_wrapper_class() -> type | None:
    """The class ``patch_peft`` gives a PEFT ``ParamWrapper`` (None without PEFT's ParamWrapper)."""
    global _fused_class
    wrapper = _param_wrapper_class()
    if _fused_class is None and wrapper is not None:
        _fused_class = peft_subclass(wrapper, _fused_forward, __name__, "expert LoRA")
    return _fused_class


def is_param_wrapper(layer: nn.Module) -> bool:
    """Whether ``layer`` is a PEFT ``ParamWrapper`` (patched or not)."""
    wrapper = _param_wrapper_class()
    return wrapper is not None and isinstance(layer, wrapper)


def unpatch_peft_experts(model: nn.Module) -> None:
    """Give every patched ``ParamWrapper`` of ``model`` PEFT's class back."""
    if _fused_class is None:
        return
    for module in model.modules():
        if type(module) is _fused_class:
            module.__class__ = _param_wrapper_class()


def patched_wrapper_count(model: nn.Module) -> int:
    """How many PEFT ``ParamWrapper`` layers of ``model`` run lorafast's expert LoRA."""
    return 0 if _fused_class is None else sum(type(m) is _fused_class for m in model.modules())


def __getattr__(name: str):
    # Lets pickle (torch.save of a whole patched model) find the class, built on first use.
    if name == "PeftFusedParamWrapper":
        return fused_wrapper_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
