"""LoRA on a whole model: put FusedLoRALinear in place of chosen nn.Linear modules, and undo it.

Targets as in PEFT: a sequence of names matches every module named one of them or ending with ``"." + name``
(``"q_proj"`` matches ``model.encoder.layers.0.self_attn.q_proj``); a single string is a regular expression
matching the whole module name; ``"all-linear"``: every linear layer but the output head (``get_output_embeddings()``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from . import dora
from .bases import dequantize_weight, is_quantized_linear
from .bases.conv1d import conv1d_class
from .experts import add_expert_lora, is_experts_module, lora_experts, remove_expert_lora
from .layer import FusedLoRALinear, LoRALayer, _scaled_product, check_dora_bases, default_adapter_dtype
from .multi_layer import MultiLoRALinear
from .validation import check_dropout, check_rank, check_scaling

DEFAULT_TARGETS = ("q_proj", "v_proj")  # BART's attention query and value projections, as in the paper
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output head


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _linear_names(model: nn.Module) -> list[str]:
    held = held_bases(model)
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in held]


def held_bases(model: nn.Module) -> set[int]:
    """``id()`` of the base modules lorafast's LoRA layers of ``model`` hold as ``base_layer`` (no target of their
    own)."""
    return {id(m.base_layer) for m in model.modules() if isinstance(m, LoRALayer)}


def note_trainable_adapters(model: nn.Module) -> None:
    """After LoRA layers were put over ``model``'s quantized linears: transformers' ``Trainer`` refuses a model whose
    ``is_quantized`` is set unless it is a ``PeftModel`` (a "purely quantized" base has nothing to train). That flag
    is read for that check alone, and lorafast's adapters are trainable, so it is cleared; the model's quantizer
    and its ``quantization_config`` stay."""
    layers = (m for m in model.modules() if isinstance(m, LoRALayer))
    if getattr(model, "is_quantized", False) and any(is_quantized_linear(m.base_layer) for m in layers):
        model.is_quantized = False


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def select_targets(
    model: nn.Module, target_modules: str | Sequence[str], allowed: tuple[type, ...] = (nn.Linear,)
) -> dict[str, nn.Module]:
    """``{name: module}`` that ``target_modules`` selects; ValueError (listing the model's linear layers) if a
    target matches nothing, or if a matched module is not one of ``allowed``."""
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise ValueError(f"target_modules must be a regular expression or non-empty names, got {target_modules!r}")
    held = held_bases(model)
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        return {name: m for name, m in _all_linear(model, allowed).items() if id(m) not in held}
    matched = {
        name: module
        for name, module in model.named_modules()
        if name and _matches(name, target_modules) and id(module) not in held
    }
    if isinstance(target_modules, str):
        unmatched = [] if matched else [target_modules]
    else:
        unmatched = [t for t in target_modules if not any(_matches(name, [t]) for name in matched)]
    if unmatched:
        suffixes = sorted({name.rpartition(".")[2] for name in _linear_names(model)})
        raise ValueError(
            f"target_modules {unmatched} match no module of {type(model).__name__}; its nn.Linear modules "
            f"are named {suffixes} (e.g. {_linear_names(model)[:3]})"
        )
    for name, module in matched.items():
        if not isinstance(module, allowed):
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}, not an nn.Linear"
                f"{' (or a transformers Conv1D)' if conv1d_class() in allowed else ''}; "
                "lorafast adds LoRA to linear layers only"
            )
    return matched


def _all_linear(model: nn.Module, allowed: tuple[type, ...]) -> dict[str, nn.Module]:
    """Every ``allowed`` module of ``model`` except its output head, as PEFT's ``"all-linear"`` selects."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    matched = {name: m for name, m in model.named_modules() if isinstance(m, allowed) and m is not head}
    if not matched:
        raise ValueError(
            f"target_modules='all-linear' found no linear layer (besides the output head) in {type(model).__name__}"
        )
    return matched


def pattern_value(name: str, pattern: dict | None, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the value of the first key (a regular expression) that
    matches the end of module ``name`` after a ``.`` (or all of it), else ``default``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def check_patterns(rank_pattern: dict | None, alpha_pattern: dict | None) -> None:
    """Raise ValueError unless the patterns map names to ranks >= 1 and to finite alphas."""
    for option, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if pattern is None:
            continue
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and k for k in pattern):
            raise ValueError(f"{option} must be a dict of module name patterns to numbers, got {pattern!r:.100}")
        for key, value in pattern.items():
            try:
                re.compile(key)
            except re.error as exc:
                raise ValueError(f"{option} key {key!r} is not a regular expression: {exc}") from exc
            if option == "rank_pattern":
                check_rank(value)
            else:
                check_scaling(value)


def layer_settings(
    names, r: int, alpha: float, rank_pattern: dict | None = None, alpha_pattern: dict | None = None
) -> dict[str, tuple[int, float]]:
    """``{module name: (r, alpha)}``: ``r`` and ``alpha`` unless a pattern names the module (PEFT's meaning)."""
    check_patterns(rank_pattern, alpha_pattern)
    settings = {
        name: (pattern_value(name, rank_pattern, r), pattern_value(name, alpha_pattern, alpha)) for name in names
    }
    for rank, layer_alpha in settings.values():
        check_rank(rank)
        check_scaling(layer_alpha)
    return settings


def _single_adapter_bases() -> tuple[type, ...]:
    """The module types apply_lora adapts: nn.Linear, and transformers' Conv1D when it is loaded."""
    conv1d = conv1d_class()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def lora_layers(model: nn.Module, kind: type = FusedLoRALinear) -> Iterator[tuple[str, nn.Module]]:
    """``(module name, layer)`` for every FusedLoRALinear (or ``kind``) in ``model``."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, kind))


def multi_lora_layers(model: nn.Module) -> Iterator[tuple[str, MultiLoRALinear]]:
    """``(module name, layer)`` for every MultiLoRALinear in ``model``."""
    return lora_layers(model, MultiLoRALinear)


def select_target_parameters(model: nn.Module, target_parameters: Sequence[str]) -> dict[str, list[str]]:
    """``{experts module name: [parameter names]}`` that ``target_parameters`` selects, as PEFT's option of that name:
    ``"<module>.<parameter>"`` equal to a target or ending with ``"." + target``. ValueError (listing the model's
    3-D parameters) if a target matches nothing, or a matched parameter is not an expert projection of a
    transformers experts stack (:mod:`lorafast.experts`)."""
    if isinstance(target_parameters, str) or not target_parameters:
        raise ValueError(f"target_parameters must be a non-empty list of names, got {target_parameters!r}")
    if not all(isinstance(t, str) and t for t in target_parameters):
        raise ValueError(f"target_parameters must be non-empty names, got {list(target_parameters)!r}")
    matched: dict[str, list[str]] = {}
    hits = dict.fromkeys(target_parameters, False)
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}" if module_name else param_name
            targets = [t for t in target_parameters if key == t or key.endswith("." + t)]
            if not targets:
                continue
            hits.update(dict.fromkeys(targets, True))
            if not is_experts_module(module) or param.dim() != 3 or param_name == "gate_up_proj_bias":
                raise ValueError(
                    f"target parameter {key!r} ({tuple(param.shape)}) is not an expert projection of a transformers "
                    "experts stack; lorafast's target_parameters adapts 3-D gate_up_proj/up_proj/down_proj only"
                )
            matched.setdefault(module_name, []).append(param_name)
    unmatched = [t for t, hit in hits.items() if not hit]
    if unmatched:
        stacks = [n for n, p in model.named_parameters() if p.dim() == 3][:4]
        raise ValueError(
            f"target_parameters {unmatched} match no parameter of {type(model).__name__} (its 3-D parameters: {stacks})"
        )
    return matched


def apply_lora(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    adapter_dtype: torch.dtype | None = None,
    *,
    use_rslora: bool = False,
    use_dora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    target_parameters: Sequence[str] | None = None,
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` (and GPT-2 ``Conv1D``) modules of ``model`` in place by FusedLoRALinear.

    The layers reuse the linears' weights (no copy); every other parameter is frozen, so only the factors train.
    ``target_modules`` as in the module docstring; r, alpha, dropout, adapter_dtype, use_rslora, use_dora as in
    FusedLoRALinear. ``rank_pattern``/``alpha_pattern`` (PEFT's): ``{pattern: r or alpha}`` for the modules whose
    name ends with a match of the pattern (a regular expression; the first matching key wins). ``target_modules``
    None: ``("q_proj", "v_proj")``, or no module when ``target_parameters`` is given.
    ``target_parameters`` (PEFT's option): expert stacks of transformers' MoE experts modules, e.g.
    ``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``, each get an expert LoRA adapter (r, alpha, dropout,
    adapter_dtype, use_rslora; not the patterns; see :mod:`lorafast.experts`). Returns ``model``.
    ValueError if LoRA is already applied, a target matches no module (the message lists the model's linear
    layers) or parameter, a matched module is not an ``nn.Linear``, a matched parameter is not an expert
    projection, a pattern is malformed, DoRA is asked for on experts, or DoRA is asked for over a bitsandbytes
    base that is not quantized yet.
    """
    if next(lora_layers(model), None) is not None or next(lora_experts(model), None) is not None:
        raise ValueError("the model already has LoRA layers; call merge_lora() or remove_lora() before applying again")
    if next(multi_lora_layers(model), None) is not None:
        raise ValueError(
            "the model has named adapters (add_adapter); use add_adapter() for another one, or remove_adapter() "
            "them all before apply_lora()"
        )
    if target_modules is None:
        target_modules = DEFAULT_TARGETS if target_parameters is None else []
    experts = {} if target_parameters is None else select_target_parameters(model, target_parameters)
    if experts and use_dora:
        raise ValueError(
            "use_dora is not supported on expert parameters (target_parameters): DoRA's per-row norm of W + s·B·A "
            "would need every expert's full weight each step; use it on target_modules only"
        )
    no_modules = not isinstance(target_modules, str) and not list(target_modules)
    matched = {} if experts and no_modules else select_targets(model, target_modules, allowed=_single_adapter_bases())
    default_adapter_dtype(torch.float32, adapter_dtype)  # a bad adapter_dtype fails before the model changes
    settings = layer_settings(matched, r, alpha, rank_pattern, alpha_pattern)
    check_rank(r)
    check_scaling(alpha)
    check_dropout(dropout)
    check_dora_bases(use_dora, matched.values())
    for param in model.parameters():
        param.requires_grad_(False)
    for name, names in experts.items():
        add_expert_lora(model.get_submodule(name), names, r, alpha, dropout, adapter_dtype, use_rslora)
    for name, module in matched.items():
        layer_r, layer_alpha = settings[name]
        options = {"dropout": dropout, "adapter_dtype": adapter_dtype, "use_rslora": use_rslora, "use_dora": use_dora}
        _replace(model, name, FusedLoRALinear.from_linear(module, r=layer_r, alpha=layer_alpha, **options))
    note_trainable_adapters(model)  # QLoRA under transformers' Trainer
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Put plain ``nn.Linear`` modules back with the unmerged weights, dropping named adapters and expert adapters
    too; returns model."""
    for name, layer in list(lora_layers(model, LoRALayer)):
        _replace(model, name, layer.to_base_layer())
    for _, experts in list(lora_experts(model)):
        remove_expert_lora(experts)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain ``nn.Linear`` modules in place.

    Expert adapters are folded into their expert stacks, one expert at a time. The result holds no lorafast code:
    its ``save_pretrained`` loads in plain transformers, same outputs, base inference cost. With named adapters the
    active one is merged and the others dropped; ValueError if none is active.
    """
    multi = list(multi_lora_layers(model))
    if multi:
        active = {layer.active_adapter for _, layer in multi}
        if None in active or len(active) > 1:
            raise ValueError(
                f"the model has named adapters {multi[0][1].adapter_names} but no single active one; "
                "lorafast.set_adapter(model, name) picks the adapter to merge"
            )
    for name, layer in list(lora_layers(model, LoRALayer)):
        _replace(model, name, layer.to_base_layer(merge=True))
    for _, experts in list(lora_experts(model)):
        remove_expert_lora(experts, merge=True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors (and DoRA magnitudes) of the state_dict: ``"<module>.lora_A"`` (named adapters:
    ``"<module>.lora_A.<adapter>"``)."""
    return {k: v for k, v in model.state_dict().items() if {"lora_A", "lora_B", "lora_magnitude"} & set(k.split("."))}


class ParameterCounts(NamedTuple):
    """Trainable and total parameter counts of a model."""

    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100 * self.trainable / self.total if self.total else 0.0
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {share:.4f}"


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Trainable and total parameters of ``model`` (each shared tensor counted once)."""
    seen = {id(p): p for p in model.parameters()}.values()
    return ParameterCounts(sum(p.numel() for p in seen if p.requires_grad), sum(p.numel() for p in seen))


@torch.no_grad()
def merge_lora_dense(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Turn a QLoRA (or FP8) model dense in place: every quantized linear (:mod:`lorafast.bases`) becomes an
    ``nn.Linear`` in ``dtype`` holding its dequantized W0 (plus ``scaling·B·A`` where lorafast LoRA wraps it, added
    in fp32), the model's other parameters are cast to ``dtype`` and transformers' quantization marks are removed,
    so ``save_pretrained`` writes a plain checkpoint. Other LoRA layers are merged as :func:`lorafast.merge_lora` does.
    Returns ``model``.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    replacements = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer) and is_quantized_linear(module.base_layer):
            replacements[name] = _dense_linear(module.base_layer, dtype, module.adapter_to_merge())
        elif is_quantized_linear(module) and not any(name.startswith(n + ".") for n in replacements):
            replacements[name] = _dense_linear(module, dtype, None)
    for name, dense in replacements.items():
        _replace(model, name, dense)
    merge_lora(model)
    _drop_quantization_marks(model)
    for param in model.parameters():  # not model.to(dtype): fp32 buffers (rotary frequencies) stay as loaded
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    if getattr(model, "config", None) is not None and hasattr(model.config, "dtype"):
        model.config.dtype = dtype
    return model


def _dense_linear(module: nn.Module, dtype: torch.dtype, adapter: tuple | None) -> nn.Linear:
    """An ``nn.Linear`` in ``dtype`` holding ``module``'s dequantized W0 with ``adapter`` (``(lora_A, lora_B,
    scaling, magnitude or None)``, or None) merged in fp32 (:func:`merged_weight`)."""
    weight = merged_weight(dequantize_weight(module, torch.float32), adapter)
    with torch.device("meta"):
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    dense.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if module.bias is not None:
        dense.bias = nn.Parameter(module.bias.detach().to(dtype, copy=True), requires_grad=False)
    return dense.train(module.training)


def merged_weight(weight: torch.Tensor, adapter: tuple | None) -> torch.Tensor:
    """fp32 ``weight`` ``(out, in)`` with ``adapter`` = ``(lora_A, lora_B, scaling, magnitude or None)`` merged as
    PEFT merges: ``W0 + s·B·A``, DoRA ``g·(W0 + s·B·A)`` (``weight`` itself is updated for plain LoRA)."""
    if adapter is None:
        return weight
    lora_A, lora_B, scaling, magnitude = adapter
    if magnitude is not None:
        return dora.merged_weight(weight, lora_A, lora_B, magnitude, scaling)[0]
    return weight.add_(_scaled_product(lora_A, lora_B, scaling))


def _drop_quantization_marks(model: nn.Module) -> None:
    """Let transformers forget the model was quantized (as its ``dequantize()`` does), so it saves as a dense one."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
