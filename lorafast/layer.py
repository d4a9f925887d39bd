"""``FusedLoRALinear``: a drop-in ``nn.Linear`` replacement with a trainable low-rank update; ``LoRALayer``: what it
shares with ``MultiLoRALinear`` and what model-level functions use of either."""

from __future__ import annotations

import math
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import dora
from .bases import check_quantized, is_quantized_linear
from .function import lora_linear
from .validation import check_dropout, check_rank, check_scaling, lora_scaling


class LoRALayer(nn.Module):
    """:meth:`factors`, :meth:`get_delta_weight`, :meth:`to_base_layer`; adds no parameter (the state_dict contract
    is the subclass's)."""

    fan_in_fan_out = False  # True: the weight is stored (in_features, out_features), as a Conv1D's
    quantized_class: type | None = None  # what from_linear gives over a quantized base (lorafast.quantized)

    def __init_subclass__(cls, over_quantized: bool = False, **kwargs):
        super().__init_subclass__(**kwargs)
        if over_quantized:  # the layer class over quantized bases of its parent class
            cls.__mro__[1].quantized_class = cls

    def factors(self, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor, int, float, float]:
        """``(lora_A (r, in), lora_B (out, r), r, alpha, dropout)`` of adapter ``name`` (None: the layer's one)."""
        raise NotImplementedError

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
        ``(in, out)`` for a Conv1D, as PEFT's."""
        lora_A, lora_B, *_ = self.factors(name)
        return self._in_weight_layout(_scaled_product(lora_A, lora_B, self.adapter_scaling(name)))

    def _in_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return (delta.t() if self.fan_in_fan_out else delta).to(self.weight.dtype)

    def _factor_options(self, adapter_dtype: torch.dtype | None) -> dict:
        """``{"device", "dtype"}`` of new factors: the weight's device, :func:`default_adapter_dtype` of its dtype."""
        return {"device": self.weight.device, "dtype": default_adapter_dtype(self.weight.dtype, adapter_dtype)}

    @torch.no_grad()
    def _write_weight(self, merged: torch.Tensor | None = None, delta: torch.Tensor | None = None) -> None:
        """Write the fp32 ``merged`` weight ``(out, in)`` into the frozen weight or add the fp32 ``delta``, in place."""
        if merged is not None:
            self.weight.copy_(self._in_weight_layout(merged))
        else:
            self.weight.add_(self._in_weight_layout(delta))

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as ``(out_features, in_features)`` (a transposed view for a Conv1D)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _adapter_forward(self, x: torch.Tensor, name: str | None = None) -> torch.Tensor:
        lora_A, lora_B, _, _, dropout = self.factors(name)
        # fp32 factors on a half-precision base are cast here (differentiable: their gradients stay fp32)
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        scaling = self.adapter_scaling(name)
        return lora_linear(x, self.base_weight(), self.bias, lora_A, lora_B, scaling, dropout, self.training)

    def to_base_layer(self, merge: bool = False) -> nn.Module:
        """The plain ``nn.Linear`` (a Conv1D for ``fan_in_fan_out``) holding this layer's weight and bias, the
        adapter in use merged into the weight (``merge``) or not."""
        self._set_merged(merge)
        with torch.device("meta"):  # no memory: the Parameters are this layer's
            if self.fan_in_fan_out:
                base = conv1d_class()(self.out_features, self.in_features)
            else:
                base = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        base.weight, base.bias = self.weight, self.bias
        return base.train(self.training)


class FusedLoRALinear(LoRALayer):
    """``y = x·Wᵀ + b + (alpha/r)·(drop(x)·Aᵀ)·Bᵀ``, x ``(..., in_features)`` -> ``(..., out_features)``; W, b frozen.

    ``use_rslora``: scale by ``alpha/sqrt(r)`` (rank-stabilised LoRA, PEFT's ``use_rslora``) instead of ``alpha/r``.
    Keeps ``nn.Linear``'s state_dict keys (``weight``, ``bias``), so a base checkpoint loads unchanged (the
    missing factors keep their init), and adds ``lora_A`` ``(r, in)`` (Kaiming-uniform, as PEFT) and ``lora_B``
    ``(out, r)`` (zeros: the layer starts equal to the base layer). ``r`` >= 1 (above min(in, out) too, as
    PEFT), ``dropout`` (on the LoRA input in training) in [0, 1). ``adapter_dtype`` of the factors, None: fp32
    on an fp16/bf16 weight (as PEFT, so optimizer updates keep their precision), else the weight's; they are
    cast to the compute dtype in forward and their gradients arrive in adapter_dtype. ``from_linear`` also
    wraps GPT-2's ``Conv1D`` (weight ``(in, out)``), kept in that layout and key, read transposed without a
    copy (``fan_in_fan_out``).
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
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
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
        """Wrap an ``nn.Linear`` or ``Conv1D``, reusing (not copying) and freezing its weight and bias; a quantized
        linear (:mod:`lorafast.bases`) gives a :class:`lorafast.quantized.QuantizedLoRALinear`."""
        if is_quantized_linear(linear) and cls is FusedLoRALinear:
            options = {"adapter_dtype": adapter_dtype, "use_rslora": use_rslora, "use_dora": use_dora}
            return cls.quantized_class.from_linear(linear, r=r, alpha=alpha, dropout=dropout, **options)
        conv1d = is_conv1d(linear)
        if not (conv1d or isinstance(linear, nn.Linear)):
            raise ValueError(
                f"from_linear expects an nn.Linear, got {type(linear).__name__} (transformers' Conv1D works too)"
            )
        in_features, out_features = linear.weight.shape if conv1d else linear.weight.shape[::-1]
        check_rank(r, in_features, out_features)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        if conv1d:
            _adopt_conv1d(layer, linear)
        else:
            adopt_frozen_base(layer, linear)
        layer._init_lora(r, alpha, dropout, adapter_dtype, use_rslora, use_dora)
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
    ) -> None:
        """The factors and settings."""
        check_scaling(alpha)
        check_dropout(dropout)
        self.use_rslora = bool(use_rslora)
        if not isinstance(use_dora, bool):
            raise ValueError(f"use_dora must be a bool, got {use_dora!r}")
        factory = self._factor_options(adapter_dtype)
        self.r, self.alpha, self.dropout = r, alpha, float(dropout)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        # DoRA's magnitude m (out,): y = m/‖W0 + s·BA‖_row ⊙ (W0·x + s·B·A·drop(x)) + b (see lorafast.dora)
        self.lora_magnitude = nn.Parameter(torch.empty(self.out_features, **factory)) if use_dora else None
        self.merged = False
        self.register_load_state_dict_post_hook(_allow_missing_lora_keys)

    @property
    def scaling(self) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``)."""
        return lora_scaling(self.alpha, self.r, self.use_rslora)

    def uses_rslora(self, name: str | None = None) -> bool:
        return self.use_rslora

    def reset_parameters(self) -> None:
        """Initialise W and b as ``nn.Linear`` does, then the LoRA factors."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)
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
        """Fold ``scaling·B·A`` into the weight: forward then costs one plain linear (a quantized base is
        re-quantized, lossy, as PEFT merges)."""
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
        """x ``(..., in_features)`` -> ``(..., out_features)``."""
        if self.merged:
            trainable = [p for p in (self.lora_A, self.lora_B, getattr(self, "lora_magnitude", None)) if p is not None]
            if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in trainable):
                raise RuntimeError(
                    "FusedLoRALinear is merged, so lora_A and lora_B no longer act on the output and "
                    "cannot be trained; call unmerge() before training (or eval() / torch.no_grad() "
                    "for inference)"
                )
            return F.linear(x, self.base_weight(), self.bias)
        if self.use_dora:
            lora_A, lora_B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
            return dora.dora_linear(x, self.base_weight(), self.bias, lora_A, lora_B, self.lora_magnitude,
                                    self.scaling, self.dropout, self.training)  # fmt: skip
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
    """ValueError if ``use_dora`` is not a bool, or is True over a bitsandbytes base in ``modules`` that is not
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


def conv1d_class() -> type | None:
    """transformers' ``Conv1D`` (GPT-2's projections, weight ``(in, out)``) if transformers is loaded, else None."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``Conv1D``."""
    conv1d = conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def _adopt_conv1d(layer: FusedLoRALinear, conv: nn.Module) -> None:
    """Give ``layer`` the Conv1D's ``(in, out)`` weight and bias Parameters (shared, not copied), frozen."""
    layer.in_features, layer.out_features = conv.weight.shape
    layer.fan_in_fan_out = True
    layer.weight = conv.weight.requires_grad_(False)
    layer.bias = conv.bias.requires_grad_(False)


def adopt_frozen_base(module: nn.Module, linear: nn.Linear) -> None:
    """Give ``module`` the linear's sizes and its weight and bias Parameters (shared, not copied), frozen."""
    module.in_features, module.out_features = linear.in_features, linear.out_features
    module.weight = linear.weight.requires_grad_(False)
    if linear.bias is not None:
        module.bias = linear.bias.requires_grad_(False)
    else:
        module.register_parameter("bias", None)


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
