"""``MultiLoRALinear``: an ``nn.Linear`` with several named LoRA adapters, one per row if asked.

It runs in one of three ways: rows with adapter ids (``lorafast.adapter_ids``, whose ids belong to the call, or
:meth:`set_row_adapters`) each use their adapter in one mixed batch (``multi_function.apply_multi_lora`` on the
adapters' own Parameters, read in place by every call: any write to a factor is seen); otherwise the active adapter
(:meth:`set_adapter`) runs as :class:`FusedLoRALinear` would; with none active, the plain base layer.

An adapter may be DoRA (``add_adapter(..., use_dora=True)``, :mod:`lorafast.dora`): alone it runs
``dora.dora_linear``; in a mixed batch its rows get their column scale after the mixed LoRA product
(:mod:`lorafast.multi_dora`), beside plain adapters' rows and base rows.

The base may be of any kind (:mod:`lorafast.bases`); over a quantized one a mixed batch runs on W0 dequantized
once in the compute dtype (:func:`lorafast.base_linear.on_dense_base`), which it keeps until backward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import dora
from .base_linear import on_dense_base
from .layer import LoRALayer, _scaled_product, check_dora_bases
from .multi_dora import dora_norms, row_slots, scale_dora_rows
from .multi_function import apply_multi_lora, dropout_tensor, host_values_on, scalings_dtype
from .row_adapters import RowAdapters, active_row_adapters
from .validation import autocast_dtype, check_dropout, check_rank, check_scaling, lora_scaling


class MultiLoRALinear(LoRALayer):
    """``y = x·Wᵀ + b + (alpha_k/r_k)·(drop(x)·A_kᵀ)·B_kᵀ``, x ``(..., in)`` -> ``(..., out)``, k per layer or row.

    Frozen ``weight``/``bias`` (``nn.Linear``'s names); per adapter ``lora_A[name]`` ``(r, in)`` and
    ``lora_B[name]`` ``(out, r)``, and for a DoRA adapter ``lora_magnitude[name]`` ``(out,)``
    (``y = m/‖W0 + s·BA‖_row ⊙ (x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ) + b``). Build with :meth:`from_linear` (no copy), then
    :meth:`add_adapter`; integer ids follow ``adapter_names``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None, dtype=None):
        super().__init__()
        self._init_from(nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype))

    @classmethod
    def from_linear(cls, linear: nn.Module) -> MultiLoRALinear:
        """Wrap a base of any kind (:mod:`lorafast.bases`: ``nn.Linear``, GPT-2's ``Conv1D`` read transposed, a
        quantized linear), kept (not copied) and frozen, with no adapter yet."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_from(linear)
        return layer

    def _init_from(self, linear: nn.Module) -> None:
        self._hold_base(linear)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()  # DoRA adapters' m (out,)
        self.alphas: dict[str, float] = {}
        self.dropouts: dict[str, float] = {}
        self.rslora: set[str] = set()  # adapters scaled by alpha / sqrt(r)
        self.active_adapter: str | None = None
        self.row_adapters: torch.Tensor | None = None  # set_row_adapters's ids, None when not set
        self._layer_row_adapters: RowAdapters | None = None
        self._values_cache: tuple | None = None  # (key, (scalings, dropout)) of _adapter_values
        self._slots_cache: tuple | None = None  # (key, adapter slots (K,)) of _dora_slots

    @property
    def adapter_names(self) -> list[str]:
        """The adapters' names in the order integer adapter ids refer to."""
        return list(self.lora_A.keys())

    def ranks(self) -> dict[str, int]:
        """``{name: r}``."""
        return {name: a.shape[0] for name, a in self.lora_A.items()}

    def scaling(self, name: str) -> float:
        """``alpha / r`` of adapter ``name`` (``alpha / sqrt(r)`` for an rsLoRA one)."""
        self._check_name(name)
        return lora_scaling(self.alphas[name], self.lora_A[name].shape[0], self.uses_rslora(name))

    def uses_rslora(self, name: str | None = None) -> bool:
        return name in getattr(self, "rslora", ())

    def uses_dora(self, name: str) -> bool:
        """Whether adapter ``name`` is DoRA (has a magnitude ``lora_magnitude[name]``)."""
        self._check_name(name)
        return name in self.lora_magnitude

    def magnitude(self, name: str | None = None) -> torch.Tensor | None:
        """DoRA adapter ``name``'s magnitude m ``(out,)`` (the Parameter), None for a plain LoRA adapter."""
        return self.lora_magnitude[name] if self.uses_dora(name) else None

    def add_adapter(
        self,
        name: str,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        adapter_dtype: torch.dtype | None = None,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        """Add adapter ``name``: A Kaiming-uniform, B zeros (so it starts as the base layer). ``adapter_dtype`` as in
        ``FusedLoRALinear`` (None: fp32 on an fp16/bf16 weight, else the weight's); a layer's adapters share one
        dtype in a mixed batch. ``use_rslora``: scaled by ``alpha / sqrt(r)``. ``use_dora``: DoRA, with a magnitude
        ``lora_magnitude[name]`` ``(out,)`` initialised as PEFT's to ``‖W0 + s·BA‖_row`` (= ``‖W0‖_row``);
        ValueError over a quantized module not quantized yet."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"an adapter name must be a non-empty string without '.', got {name!r}")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists; remove_adapter({name!r}) first")
        check_rank(r, self.in_features, self.out_features)
        check_scaling(alpha)
        check_dropout(dropout)
        check_dora_bases(use_dora, [self.base_layer])
        factory = self._factor_options(adapter_dtype)
        lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        self.lora_A[name] = lora_A
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.alphas[name], self.dropouts[name] = alpha, float(dropout)
        if use_rslora:
            self.rslora.add(name)
        if use_dora:
            m = dora.initial_magnitude(self.base_weight(), lora_A.detach(), self.lora_B[name], self.scaling(name))
            self.lora_magnitude[name] = nn.Parameter(m.to(factory["dtype"]))

    def remove_adapter(self, name: str) -> None:
        """Delete adapter ``name`` (the active adapter becomes None if it was this one)."""
        self._check_name(name)
        del self.lora_A[name], self.lora_B[name], self.alphas[name], self.dropouts[name]
        self.rslora.discard(name)
        if name in self.lora_magnitude:
            del self.lora_magnitude[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the adapter every row uses when no row ids are set (None: the base layer)."""
        if name is not None:
            self._check_name(name)
        self.active_adapter = name

    def set_row_adapters(self, ids: torch.Tensor | None) -> None:
        """Per-row adapters for the next calls: ids ``(b,)`` into ``adapter_names`` (−1: none), or None to stop; x
        ``(m·b, ...)`` (beam search) repeats each id m times. Checked once here, on the host. Layer state shared by
        every caller; ``lorafast.adapter_ids`` (per call) takes precedence over it."""
        if ids is None:
            self.row_adapters = self._layer_row_adapters = None
            return
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
            raise ValueError(f"row adapter ids must be a 1-D integer tensor, got {ids!r:.80}")
        self._layer_row_adapters = RowAdapters(ids, self.adapter_names)
        self.row_adapters = ids

    def _check_name(self, name: str) -> None:
        if name not in self.lora_A:
            raise ValueError(f"no adapter named {name!r}; this layer has {self.adapter_names}")

    def factors(self, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor, int, float, float]:
        self._check_name(name)
        lora_A = self.lora_A[name]
        return lora_A, self.lora_B[name], lora_A.shape[0], self.alphas[name], self.dropouts[name]

    @torch.no_grad()
    def _set_merged(self, merged: bool) -> None:
        """Merge the active adapter into the weight, as PEFT: ``W0 + s·BA``, for DoRA ``g ⊙ (W0 + s·BA)``
        (:func:`lorafast.dora.merged_weight`). One way: used by ``to_base_layer(merge=True)`` only."""
        if not merged or self.active_adapter is None:
            return
        name = self.active_adapter
        lora_A, lora_B, *_ = self.factors(name)
        if self.uses_dora(name):
            weight, _ = dora.merged_weight(self.base_weight(), lora_A, lora_B, self.lora_magnitude[name],
                                           self.scaling(name))  # fmt: skip
            self._write_weight(merged=weight)
        else:
            self._write_weight(delta=_scaled_product(lora_A, lora_B, self.scaling(name)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``(..., in_features)`` -> ``(..., out_features)``."""
        row_adapters = active_row_adapters(self)
        if row_adapters is None:
            row_adapters = self._layer_row_adapters
        if row_adapters is not None:
            factors_dtype = next(iter(self.lora_A.values())).dtype if self.lora_A else None
            mixed = lambda x, w, b: self._mixed_forward(x, w, b, row_adapters)  # noqa: E731
            return on_dense_base(self.base_layer, x, factors_dtype, mixed, self.base_kind)
        if self.active_adapter is None:
            return self.base_layer(x)
        return self._adapter_forward(x, self.active_adapter)

    def adapter_to_merge(self) -> tuple | None:
        name = self.active_adapter
        if name is None:
            return None
        lora_A, lora_B, *_ = self.factors(name)
        return lora_A, lora_B, self.scaling(name), self.magnitude(name)

    def _mixed_forward(self, x, weight, bias, row_adapters: RowAdapters) -> torch.Tensor:
        """The mixed batch on W0 ``weight`` ``(out, in)`` and ``bias`` as dense tensors in x's dtype."""
        row_adapters.check_adapters(self.adapter_names)
        rows = row_adapters.rows(x.shape, x.device)
        if not self.lora_A:
            return torch.nn.functional.linear(x, weight, bias)
        cast = autocast_dtype(x)
        names = self.adapter_names
        lora_A, lora_B = [self.lora_A[n] for n in names], [self.lora_B[n] for n in names]
        scalings, dropout = self._adapter_values(x.device, scalings_dtype(x.dtype if cast is None else cast))
        dropout = dropout if self.training else None
        # the Parameters themselves: every call reads their current storage, nothing is kept that could go stale
        dora_names = [n for n in names if n in self.lora_magnitude]
        if not dora_names:
            return apply_multi_lora(x, weight, bias, lora_A, lora_B, scalings, rows, dropout, row_adapters)
        # DoRA rows: the mixed LoRA output without bias, then each row's column scale g and the bias
        z = apply_multi_lora(x, weight, None, lora_A, lora_B, scalings, rows, dropout, row_adapters)
        with torch.autocast(x.device.type, enabled=False):  # the norms from W0 and the factors as they are
            norms = dora_norms(weight, [self.lora_A[n] for n in dora_names], [self.lora_B[n] for n in dora_names],
                               [self.scaling(n) for n in dora_names])  # fmt: skip
            slot = row_slots(rows, self._dora_slots(x.device))
            return scale_dora_rows(z, bias, slot, norms, [self.lora_magnitude[n] for n in dora_names])

    def _dora_slots(self, device: torch.device) -> torch.Tensor:
        """``(K,)`` int64 on ``device``: 0 for a plain adapter, j+1 for the j-th DoRA adapter (in adapter order);
        rebuilt when adapters change, not per call."""
        slots, count = [], 0
        for name in self.adapter_names:
            count += name in self.lora_magnitude
            slots.append(count if name in self.lora_magnitude else 0)
        key = (device, tuple(slots))
        if self._slots_cache is None or self._slots_cache[0] != key:
            self._slots_cache = (key, host_values_on(slots, torch.int64, device))
        return self._slots_cache[1]

    def _adapter_values(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scalings (K,), dropout (K,) float32 or None)`` on ``device``, rebuilt when adapters change, not per call
        (so the mixed forward copies no number between host and device)."""
        names = self.adapter_names
        key = (device, dtype, tuple((n, self.scaling(n), self.dropouts[n]) for n in names))
        cached = self._values_cache
        if cached is None or cached[0] != key:
            scalings = host_values_on([self.scaling(n) for n in names], dtype, device)
            cached = (key, (scalings, dropout_tensor([self.dropouts[n] for n in names], len(names), device)))
            self._values_cache = cached
        return cached[1]

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{n}(r={a.shape[0]}, alpha={self.alphas[n]}{', use_dora=True' if n in self.lora_magnitude else ''})"
            for n, a in self.lora_A.items()
        )
        layout = ", fan_in_fan_out=True" if self.fan_in_fan_out else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"adapters=[{adapters}], active={self.active_adapter!r}{layout}"
        )
