"""LoRA on transformers' mixture-of-experts stacks: the experts forward with :func:`expert_lora_linear` in place of
each adapted projection, and the adapters :func:`lorafast.apply_lora` puts on an experts module.

transformers 5 keeps experts as 3-D parameters on one module (``Qwen3MoeExperts``, ``MixtralExperts``,
``OlmoeExperts``, ...: ``gate_up_proj`` ``(E, 2·I, H)`` or ``up_proj``, and ``down_proj`` ``(E, H, I)``; ``(E, in,
out)`` where the class sets ``is_transposed``), decorated with ``use_experts_implementation``: every registered
implementation computes the same thing, which :func:`lora_experts_forward` computes with LoRA added. An adapted
module keeps its class name, parameters and keys; its class becomes a subclass whose ``forward`` runs the LoRA
experts, and it gains ``lora_adapters.<parameter>.lora_A`` ``(E, r, in)`` / ``lora_B`` ``(E, out, r)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .expert_function import expert_lora_linear, segment_bounds
from .layer import default_adapter_dtype
from .validation import check_dropout, check_rank, check_scaling, lora_scaling

# The projections use_experts_implementation's forward runs, in order (gate_up_proj or up_proj, then down_proj).
EXPERT_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts stack lorafast can run: a ``use_experts_implementation`` class
    (it has ``_apply_gate``) with 3-D ``down_proj`` and ``gate_up_proj`` or ``up_proj`` parameters."""
    params = dict(module.named_parameters(recurse=False))
    up = params.get("gate_up_proj", params.get("up_proj"))
    down = params.get("down_proj")
    return hasattr(type(module), "_apply_gate") and up is not None and down is not None and up.dim() == down.dim() == 3


def expert_sizes(experts: nn.Module, name: str) -> tuple[int, int, int]:
    """``(E, in_features, out_features)`` of the experts' parameter ``name`` (``(E, out, in)`` unless transposed)."""
    e, d1, d2 = getattr(experts, name).shape
    return (e, d1, d2) if getattr(experts, "is_transposed", False) else (e, d2, d1)


def lora_experts_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float, float]],
    training: bool,
) -> torch.Tensor:
    """transformers' experts forward with LoRA: hidden_states ``(T, H)``, top_k_index/top_k_weights ``(T, k)`` ->
    ``(T, H)``.

    ``adapters``: ``{parameter name: (lora_A (E, r, in), lora_B (E, out, r), scaling, dropout)}`` for the adapted
    projections (the others run frozen). Tokens are sorted by expert (a stable sort), each projection runs on the
    expert segments, and the weighted outputs are summed per token, as transformers' ``grouped_mm`` does.
    """
    if getattr(experts, "_is_expert_parallel", False):
        raise ValueError("lorafast's expert LoRA does not support expert parallelism (tokens routed to other ranks)")
    num_experts = experts.down_proj.shape[0]
    tokens, top_k = top_k_index.shape
    expert_ids, order = torch.sort(top_k_index.reshape(-1), stable=True)
    # sorted: the ends are the smallest and largest ids (one read from the device, no reductions)
    if expert_ids.numel() and not 0 <= (ends := expert_ids[[0, -1]].tolist())[0] <= ends[1] < num_experts:
        raise ValueError(f"top_k_index holds expert ids outside [0, {num_experts})")
    counts = torch.bincount(expert_ids, minlength=num_experts).tolist()
    x = hidden_states[order // top_k]
    has_gate = getattr(experts, "has_gate", hasattr(experts, "gate_up_proj"))
    up = _project(experts, "gate_up_proj" if has_gate else "up_proj", x, counts, adapters, training)
    h = experts._apply_gate(up) if has_gate else experts.act_fn(up)
    out = _project(experts, "down_proj", h, counts, adapters, training)
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
    out = out[torch.argsort(order)]  # back to (token, k) order
    return out.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def _project(experts: nn.Module, name: str, x: torch.Tensor, counts: list[int], adapters: dict, training: bool):
    """One projection over the expert segments of x: with its LoRA adapter if it has one, else the frozen weight."""
    weight = getattr(experts, name)
    bias = getattr(experts, f"{name}_bias", None) if getattr(experts, "has_bias", False) else None
    transposed = getattr(experts, "is_transposed", False)
    if name in adapters:
        lora_A, lora_B, scaling, dropout = adapters[name]
        return expert_lora_linear(
            x, counts, weight, lora_A.to(x.dtype), lora_B.to(x.dtype), scaling, dropout, training,
            bias=bias, transposed=transposed,
        )  # fmt: skip
    outs = []
    for e, (start, stop) in enumerate(segment_bounds(counts, x.shape[0], weight.shape[0])):
        if start < stop:
            w = weight[e].t() if transposed else weight[e]
            outs.append(F.linear(x[start:stop], w.to(x.dtype), None if bias is None else bias[e].to(x.dtype)))
    return torch.cat(outs) if outs else x.new_empty(0, weight.shape[2] if transposed else weight.shape[1])


class ExpertAdapter(nn.Module):
    """The LoRA factors of one expert parameter: ``lora_A`` ``(E, r, in)`` (Kaiming-uniform per expert, as PEFT's
    ``(E·r, in)`` matrix) and ``lora_B`` ``(E, out, r)`` (zeros), with r, alpha, dropout and rsLoRA."""

    def __init__(self, experts: int, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 use_rslora: bool, dtype: torch.dtype, device: torch.device):  # fmt: skip
        super().__init__()
        check_rank(r, in_features, out_features)
        check_scaling(alpha)
        check_dropout(dropout)
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, float(dropout), bool(use_rslora)
        self.lora_A = nn.Parameter(torch.empty(experts, r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(experts, out_features, r, dtype=dtype, device=device))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.view(experts * r, in_features), a=math.sqrt(5))

    @property
    def scaling(self) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``)."""
        return lora_scaling(self.alpha, self.r, self.use_rslora)

    @torch.no_grad()
    def delta(self, e: int) -> torch.Tensor:
        """Expert e's update ``scaling·B_e·A_e`` ``(out, in)`` in fp32."""
        return (self.lora_B[e].float() @ self.lora_A[e].float()).mul_(self.scaling)

    def extra_repr(self) -> str:
        e, r, i = self.lora_A.shape
        return f"experts={e}, in_features={i}, out_features={self.lora_B.shape[1]}, r={r}, alpha={self.alpha}, " + (
            f"dropout={self.dropout}" + (", use_rslora=True" if self.use_rslora else "")
        )


def _lora_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    adapters = {n: (a.lora_A, a.lora_B, a.scaling, a.dropout) for n, a in self.lora_adapters.items()}
    return lora_experts_forward(self, hidden_states, top_k_index, top_k_weights, adapters, self.training)


_lora_classes: dict[type, type] = {}


def _lora_class(cls: type) -> type:
    """``cls`` with :func:`lora_experts_forward` as its forward (one subclass per experts class, same name)."""
    if cls not in _lora_classes:
        doc = f"{cls.__name__} whose forward adds lorafast's expert LoRA (lorafast.experts)."
        _lora_classes[cls] = type(cls.__name__, (cls,), {"forward": _lora_forward, "__doc__": doc})
    return _lora_classes[cls]


def add_expert_lora(
    experts: nn.Module,
    names: list[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    adapter_dtype: torch.dtype | None = None,
    use_rslora: bool = False,
) -> None:
    """Give ``experts`` an :class:`ExpertAdapter` for each parameter in ``names``; its forward then runs them.

    ValueError if ``experts`` is not a transformers experts stack (:func:`is_experts_module`), a name is not one of
    its expert projections, or it already has expert LoRA.
    """
    if not is_experts_module(experts):
        raise ValueError(
            f"{type(experts).__name__} is not a transformers experts stack (a use_experts_implementation class with "
            "3-D gate_up_proj/up_proj and down_proj); lorafast adds LoRA to those expert parameters only"
        )
    if is_lora_experts(experts):
        raise ValueError(f"{type(experts).__name__} already has expert LoRA adapters")
    unknown = [n for n in names if n not in EXPERT_PARAMETERS or not hasattr(experts, n)]
    if unknown:
        have = [n for n in EXPERT_PARAMETERS if hasattr(experts, n)]
        raise ValueError(f"{unknown} are not expert projections of {type(experts).__name__}; it has {have}")
    adapters = nn.ModuleDict()
    for name in EXPERT_PARAMETERS:  # the experts' order, whatever the order of names
        if name in names:
            weight = getattr(experts, name)
            dtype = default_adapter_dtype(weight.dtype, adapter_dtype)
            adapters[name] = ExpertAdapter(*expert_sizes(experts, name), r, alpha, dropout, use_rslora, dtype,
                                           weight.device)  # fmt: skip
    experts.lora_adapters = adapters
    experts.__class__ = _lora_class(type(experts))


def is_lora_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an experts stack with lorafast expert LoRA (:func:`add_expert_lora`)."""
    return type(module) in _lora_classes.values()


def lora_experts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(module name, experts)`` for every experts stack of ``model`` with lorafast expert LoRA."""
    return ((name, m) for name, m in model.named_modules() if is_lora_experts(m))


@torch.no_grad()
def remove_expert_lora(experts: nn.Module, merge: bool = False) -> None:
    """Drop the adapters of ``experts`` (after folding them into the weights, expert by expert, with ``merge``) and
    give it back its own class."""
    if merge:
        transposed = getattr(experts, "is_transposed", False)
        for name, adapter in experts.lora_adapters.items():
            weight = getattr(experts, name)
            for e in range(weight.shape[0]):  # one expert at a time: no E×out×in temporary
                delta = adapter.delta(e)
                weight[e] += (delta.t() if transposed else delta).to(weight.dtype)
    del experts.lora_adapters
    experts.__class__ = type(experts).__mro__[1]


def peft_expert_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``ParamWrapper`` factors as the op takes them (views, no copy): lora_A ``(E·r, in)`` -> ``(E, r, in)``,
    lora_B ``(out, r·E)`` (column ``j·E + e`` is expert e's j-th) -> ``(E, out, r)``."""
    lora_A = lora_A.view(experts, -1, lora_A.shape[-1])
    return lora_A, lora_B.view(lora_B.shape[0], lora_A.shape[1], experts).permute(2, 0, 1)


def to_peft_factors(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`peft_expert_factors`: ``(E, r, in)``, ``(E, out, r)`` -> ``(E·r, in)``, ``(out, r·E)``."""
    experts, r, in_features = lora_A.shape
    return lora_A.reshape(experts * r, in_features), lora_B.permute(1, 2, 0).reshape(lora_B.shape[1], r * experts)


def peft_nesting(experts: nn.Module, names) -> dict[str, int]:
    """``{parameter name: depth}`` of PEFT's nested ``ParamWrapper`` for each targeted parameter of ``experts``: PEFT
    wraps them in the module's parameter order, so the last is outermost (depth 0, keys ``<module>.lora_A.weight``)
    and each earlier one sits one ``base_layer.`` deeper."""
    ordered = [n for n, _ in experts.named_parameters(recurse=False) if n in names]
    return {n: len(ordered) - 1 - i for i, n in enumerate(ordered)}
