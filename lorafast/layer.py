"""``FusedLoRALinear``: a drop-in ``nn.Linear`` replacement with a trainable low-rank update over a frozen base of
any kind; ``LoRALayer``: what it shares with ``MultiLoRALinear`` and what model-level functions use of either."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from . import dora
from .base_linear import base_lora_linear
from .bases import (
    KINDS,
    adapter_dtype_basis,
    base_weight,
    check_quantized,
    features,
    in_weight_layout,
    is_quantized_linear,
    kind_name,
    reset,
    write_weight,
)
from .validation import check_dropout, check_rank, check_scaling, lora_scaling


class LoRALayer(nn.Module):
    """What FusedLoRALinear and MultiLoRALinear share: the frozen base they hold, of any kind
    (:mod:`lorafast.bases`), as ``base_layer`` under the base's own state_dict keys; :meth:`factors`,
    :meth:`get_delta_weight`, :meth:`to_base_layer`."""

    base_kind: str  # the base's kind, a name in lorafast.bases.KINDS

    def _hold_base(self, module: nn.Module) -> None:
        """Hold ``module`` (kept, not copied) as the frozen base; its state_dict keys read as the layer's own
        (``weight``, ``bias``, a quantized weight's ``weight.absmax``, ...), so a base checkpoint loads unchanged."""
        self.base_kind = _checked_kind(module)
        self.in_features, self.out_features = features(module)
        self.base_layer = module.requires_grad_(False)
        self.register_state_dict_post_hook(_base_keys_as_own)
        self.register_load_state_dict_pre_hook(_own_keys_to_base)
        self.register_load_state_dict_post_hook(_reported_keys_as_own)

    @property
    def weight(self) -> nn.Parameter:
        """The base's stored weight (``(out, in)``; ``(in, out)`` for a Conv1D; packed for a quantized base)."""
        return self.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base_layer.bias

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether the weight is stored ``(in_features, out_features)``, as a Conv1D's (PEFT's option of that name)."""
        return getattr(KINDS[self.base_kind], "FAN_IN_FAN_OUT", False)

    def factors(self, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor, int, float, float]:
        """``(lora_A (r, in), lora_B (out, r), r, alpha, dropout)`` of adapter ``name`` (None: the layer's one)."""
        raise NotImplementedError

    def magnitude(self, name: str | None = None) -> torch.Tensor | None:
        """DoRA adapter ``name``'s magnitude m ``(out,)`` (the Parameter), None for a plain LoRA adapter."""
        return None

    def uses_rslora(self, name: str | None = None) -> bool:
        """Whether adapter ``name`` scales by ``alpha / sqrt(r)`` (rank-stabilised LoRA) rather than ``alpha / r``."""
        return False

    def adapter_scaling(self, name: str | None = None) -> float:
        """The scale of adapter ``name``'s update: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        _, _, r, alpha, _ = self.factors(name)
        return lora_scaling(alpha, r, self.uses_rslora(name))

    def _set_merged(self, merged: bool) -> None:
        """Fold the adapter in use into the weight (``merged``), or leave the weight unmerged."""
        raise NotImplementedError

    @torch.no_grad()
    def get_delta_weight(self, name: str | None = None) -> torch.Tensor:
        """``scaling·B·A`` of adapter ``name`` (fp32 math) in the weight's dtype and layout, ``(out, in)`` or
        ``(in, out)`` for a Conv1D, as PEFT's (fp32 ``(out, in)`` over a quantized base)."""
        lora_A, lora_B, *_ = self.factors(name)
        return in_weight_layout(self.base_layer, _scaled_product(lora_A, lora_B, self.adapter_scaling(name)))

    def _factor_options(self, adapter_dtype: torch.dtype | None) -> dict:
        """``{"device", "dtype"}`` of new factors: the weight's device, :func:`default_adapter_dtype` of its dtype
        (fp32 over a quantized base)."""
        dtype = default_adapter_dtype(adapter_dtype_basis(self.base_layer), adapter_dtype)
        return {"device": self.weight.device, "dtype": dtype}

    @torch.no_grad()
    def _write_weight(self, merged: torch.Tensor | None = None, delta: torch.Tensor | None = None) -> None:
        """Make W0 the fp32 ``merged`` weight ``(out, in)`` or add the fp32 ``delta`` (re-quantized over a quantized
        base, lossy, as PEFT merges)."""
        write_weight(self.base_layer, merged, delta)

    def base_weight(self) -> torch.Tensor:
        """W0 as ``(out_features, in_features)``: the weight (a transposed view for a Conv1D), or a quantized base's
        dequantized to a new fp32 tensor."""
        return base_weight(self.base_layer, self.base_kind)

    def _adapter_forward(self, x: torch.Tensor, name: str | None = None) -> torch.Tensor:
        lora_A, lora_B, r, alpha, dropout = self.factors(name)
        scaling = lora_scaling(alpha, r, self.uses_rslora(name))
        return base_lora_linear(x, self.base_layer, lora_A, lora_B, scaling, dropout, self.training,
                                self.magnitude(name), self.base_kind)  # fmt: skip

    def adapter_to_merge(self) -> tuple | None:
        """``(lora_A, lora_B, scaling, magnitude or None)`` of the adapter in use, None when there is none to add."""
        raise NotImplementedError

    def __repr__(self) -> str:
        """One line, as ``nn.Linear``'s; the base's class is named where it is no ``nn.Linear`` or ``Conv1D``."""
        name = type(self.base_layer).__name__
        return f"{self._get_name()}({self.extra_repr()}{'' if name in ('Linear', 'Conv1D') else f', base={name}'})"

    def to_base_layer(self, merge: bool = False) -> nn.Module:
        """The base module this layer holds, the adapter in use merged into its weight (``merge``) or not."""
        self._set_merged(merge)
        return self.base_layer.train(self.training)


class FusedLoRALinear(LoRALayer):
    """``y = x·Wᵀ + b + (alpha/r)·(drop(x)·Aᵀ)·Bᵀ``, x ``(..., in_features)`` -> ``(..., out_features)``; W, b frozen.

    ``use_rslora``: scale by ``alpha/sqrt(r)`` (rank-stabilised LoRA, PEFT's ``use_rslora``) instead of ``alpha/r``.
    Keeps the base's state_dict keys (``nn.Linear``'s ``weight``, ``bias``), so a base checkpoint loads unchanged
    (the missing factors keep their init), and adds ``lora_A`` ``(r, in)`` (Kaiming-uniform, as PEFT) and
    ``lora_B`` ``(out, r)`` (zeros: the layer starts equal to the base layer). ``r`` >= 1 (above min(in, out) too,
    as PEFT), ``dropout`` (on the LoRA input in training) in [0, 1). ``adapter_dtype`` of the factors, None: fp32
    on an fp16/bf16 weight or a quantized base (as PEFT, so optimizer updates keep their precision), else the
    weight's; they are cast to the compute dtype in forward and their gradients arrive in adapter_dtype.
    ``from_linear`` wraps a base of any kind (:mod:`lorafast.bases`): GPT-2's ``Conv1D`` (weight ``(in, out)``,
    read transposed without a copy: ``fan_in_fan_out``), bitsandbytes' ``Linear4bit``/``Linear8bitLt`` (QLoRA)
    and transformers' ``FP8Linear`` (dequantized per call, see :mod:`lorafast.base_linear`).
    ``use_dora``: DoRA (:mod:`lorafast.dora`), with a trainable magnitude ``lora_magnitude`` ``(out,)``
    initialised as PEFT's to the row norms of W0.
    """

    use_rslora = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        device=None,
        dtype=None,
        adapter_dtype: torch.dtype | None = None,
        use_rslora: bool = False,
        use_dora: bool = False,
    ):
        super().__init__()
        check_rank(r, in_features, out_features)
        # uninitialised: reset_parameters() draws W and b as nn.Linear would
        device = torch.get_default_device() if device is None else device
        self._hold_base(nn.utils.skip_init(nn.Linear, in_features, out_features, bias, device=device, dtype=dtype))
        self._init_lora(r, alpha, dropout, adapter_dtype, use_rslora, use_dora)
        self.reset_parameters()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        adapter_dtype: torch.dtype | None = None,
        use_rslora: bool = False,
        use_dora: bool = False,
    ):
        """Wrap a base of any kind (:mod:`lorafast.bases`: ``nn.Linear``, ``Conv1D``, a quantized linear), kept (not
        copied) and frozen. ``use_dora`` over a quantized base: m from its dequantized W0 (it must be quantized
        already)."""
        _checked_kind(linear)
        check_rank(r, *features(linear))
        check_dora_bases(use_dora, [linear])
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_lora(r, alpha, dropout, adapter_dtype, use_rslora, use_dora, base=linear)
        layer.reset_lora_parameters()
        return layer

    def _init_lora(
        self,
        r: int,
        alpha: float,
        dropout: float,
        adapter_dtype: torch.dtype | None = None,
        use_rslora: bool = False,
        use_dora: bool = False,
        base: nn.Module | None = None,
    ) -> None:
        """The factors and settings; ``base``: the module to hold, after the checks (a refused call leaves it as
        it was)."""
        check_scaling(alpha)
        check_dropout(dropout)
        if not isinstance(use_dora, bool):
            raise ValueError(f"use_dora must be a bool, got {use_dora!r}")
        default_adapter_dtype(torch.float32, adapter_dtype)  # a bad adapter_dtype fails before the base is held
        if base is not None:
            self._hold_base(base)
        self.use_rslora = bool(use_rslora)
        factory = self._factor_options(adapter_dtype)
        self.r, self.alpha, self.dropout = r, alpha, float(dropout)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        # DoRA's magnitude m (out,): y = m/‖W0 + s·BA‖_row ⊙ (W0·x + s·B·A·drop(x)) + b (see lorafast.dora)
        self.lora_magnitude = nn.Parameter(torch.empty(self.out_features, **factory)) if use_dora else None
        self.merged = False
        self.register_load_state_dict_post_hook(_allow_missing_lora_keys)

    def magnitude(self, name: str | None = None) -> torch.Tensor | None:
        return self.lora_magnitude

    def adapter_to_merge(self) -> tuple | None:
        return None if self.merged else (self.lora_A, self.lora_B, self.scaling, self.lora_magnitude)

    @property
    def scaling(self) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``)."""
        return lora_scaling(self.alpha, self.r, self.use_rslora)

    def uses_rslora(self, name: str | None = None) -> bool:
        return self.use_rslora

    def reset_parameters(self) -> None:
        """Initialise the base as its own ``reset_parameters`` does (``nn.Linear``'s; :func:`lorafast.bases.reset`:
        a quantized base or a Conv1D is left as it is), then the LoRA factors."""
        reset(self.base_layer)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (PEFT's default), B zeros: the update starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.use_dora:  # PEFT's: m = ‖W0 + s·BA‖_row = ‖W0‖_row
            with torch.no_grad():
                m = dora.initial_magnitude(self.base_weight(), self.lora_A, self.lora_B, self.scaling)
                self.lora_magnitude.copy_(m)

    @property
    def use_dora(self) -> bool:
        """Whether the layer is DoRA (has a magnitude vector ``lora_magnitude`` ``(out,)``)."""
        return getattr(self, "lora_magnitude", None) is not None

    def factors(self, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor, int, float, float]:
        return self.lora_A, self.lora_B, self.r, self.alpha, self.dropout

    def _set_merged(self, merged: bool) -> None:
        if merged != self.merged:
            self.merge() if merged else self.unmerge()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scaling·B·A`` into the weight: forward then costs the base layer's own (a quantized base is
        re-quantized, lossy, as PEFT merges; :func:`lorafast.merge_lora_dense` merges into a dense copy instead)."""
        if self.merged:
            warnings.warn(f"{type(self).__name__} is already merged; nothing to do", stacklevel=2)
            return
        # The factors as merged: unmerge() takes out exactly this update, even if A, B or alpha change meanwhile.
        self._merged_factors = (self.lora_A.detach().clone(), self.lora_B.detach().clone(), self.scaling)
        if self.use_dora:  # PEFT's: W = g·(W0 + s·BA), g kept for unmerge
            weight, g = dora.merged_weight(self.base_weight(), *self._merged_factors[:2], self.lora_magnitude,
                                           self.scaling)  # fmt: skip
            self._merged_factors += (g,)
            self._write_weight(merged=weight)
        else:
            self._write_weight(delta=_scaled_product(*self._merged_factors))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what :meth:`merge` added (the factors and alpha as merged; exact in fp32, rounded in fp16/bf16)."""
        if not self.merged:
            warnings.warn(f"{type(self).__name__} is not merged; nothing to do", stacklevel=2)
            return
        merged_factors = getattr(self, "_merged_factors", None) or (self.lora_A, self.lora_B, self.scaling)
        if len(merged_factors) == 4:  # DoRA: W0 = W/g - s·BA
            lora_A, lora_B, scaling, g = merged_factors
            self._write_weight(merged=dora.unmerged_weight(self.base_weight(), lora_A, lora_B, g, scaling))
        else:
            lora_A, lora_B, scaling = merged_factors
            self._write_weight(delta=_scaled_product(lora_A, lora_B, -scaling))
        self.merged, self._merged_factors = False, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``(..., in_features)`` -> ``(..., out_features)`` (over a quantized base in x's dtype, see
        :mod:`lorafast.base_linear`)."""
        if self.merged:
            trainable = [p for p in (self.lora_A, self.lora_B, getattr(self, "lora_magnitude", None)) if p is not None]
            if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in trainable):
                raise RuntimeError(
                    "FusedLoRALinear is merged, so lora_A and lora_B no longer act on the output and "
                    "cannot be trained; call unmerge() before training (or eval() / torch.no_grad() "
                    "for inference)"
                )
            return self.base_layer(x)
        return self._adapter_forward(x)

    def extra_repr(self) -> str:
        merged = ", merged=True" if self.merged else ""
        merged += ", fan_in_fan_out=True" if self.fan_in_fan_out else ""
        merged += ", use_rslora=True" if self.use_rslora else ""
        merged += ", use_dora=True" if self.use_dora else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}{merged}"
        )


def check_dora_bases(use_dora: bool, modules) -> None:
    """ValueError if ``use_dora`` is not a bool, or is True over a quantized base in ``modules`` that is not
    quantized yet (DoRA's magnitude is initialised from W0)."""
    if not isinstance(use_dora, bool):
        raise ValueError(f"use_dora must be a bool, got {use_dora!r}")
    for module in modules if use_dora else ():
        if is_quantized_linear(module):
            check_quantized(module)


def default_adapter_dtype(weight_dtype: torch.dtype, adapter_dtype: torch.dtype | None = None) -> torch.dtype:
    """``adapter_dtype`` if given, else fp32 for an fp16/bf16 weight (PEFT's default), else the weight's dtype."""
    if adapter_dtype is not None:
        if not (isinstance(adapter_dtype, torch.dtype) and adapter_dtype.is_floating_point):
            raise ValueError(f"adapter_dtype must be a floating torch.dtype, got {adapter_dtype!r}")
        return adapter_dtype
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


def _checked_kind(module: nn.Module) -> str:
    """The kind name of a base (:func:`lorafast.bases.kind_name`); ValueError for a module of no kind."""
    name = kind_name(module)
    if name is None:
        raise ValueError(
            f"from_linear expects an nn.Linear, got {type(module).__name__} (transformers' Conv1D and FP8Linear and "
            "bitsandbytes' Linear4bit and Linear8bitLt work too)"
        )
    return name


def _scaled_product(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling·B·A`` ``(out, in)`` in fp32."""
    return (lora_B.float() @ lora_A.float()).mul_(scaling)


def _allow_missing_lora_keys(module: FusedLoRALinear, incompatible_keys) -> None:
    """Let a plain ``nn.Linear`` state_dict load strictly; one factor without the other stays a missing key."""
    missing = incompatible_keys.missing_keys
    for key in [k for k in missing if k.rsplit(".", 1)[-1] == "lora_A"]:
        if key[: -len("lora_A")] + "lora_B" in missing:
            missing.remove(key)
            missing.remove(key[: -len("lora_A")] + "lora_B")
            if key[: -len("lora_A")] + "lora_magnitude" in missing:
                missing.remove(key[: -len("lora_A")] + "lora_magnitude")


_BASE = "base_layer"  # the base module's name inside a layer, hidden from its state_dict keys


def _base_keys_as_own(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: ``<prefix>base_layer.<key>`` -> ``<prefix><key>``."""
    inner = prefix + _BASE + "."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _own_keys_to_base(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: the base's keys go to ``base_layer``; the layer's own (the factors) stay."""
    module._load_prefix = prefix
    own = (set(module._parameters) | set(module._modules)) - {_BASE}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if rest.split(".", 1)[0] not in own:
            state_dict[prefix + _BASE + "." + rest] = state_dict.pop(key)


def _reported_keys_as_own(module: nn.Module, incompatible_keys) -> None:
    """load_state_dict post-hook: missing/unexpected keys of ``base_layer`` reported under the layer's own names."""
    inner = getattr(module, "_load_prefix", "") + _BASE + "."
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [k.replace(inner, inner[: -len(_BASE) - 1], 1) if k.startswith(inner) else k for k in keys]
