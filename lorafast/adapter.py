"""Adapters in PEFT's on-disk format (PEFT and vLLM load lorafast's, and back): ``adapter_config.json`` (a
``LoraConfig``) and ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight`` ``(r, in)``
and ``...lora_B.weight`` ``(out, r)`` per adapted linear layer.

Expert adapters (``target_parameters``) are written as PEFT's ``lora.ParamWrapper`` writes them: lora_A ``(E·r,
in)``, lora_B ``(out, r·E)``, keyed ``<experts module>.[base_layer.]*lora_A.weight`` by PEFT's nesting of the
wrappers (:func:`lorafast.experts.peft_nesting`), and ``target_parameters`` lists their full names.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .atomic import write_atomically
from .bases import features, kind_name
from .experts import expert_sizes, lora_experts, peft_expert_factors, peft_nesting, to_peft_factors
from .model import apply_lora, check_patterns, layer_settings, lora_layers, select_target_parameters
from .multi_adapter import add_adapter, list_adapters, multi_lora_layers
from .multi_layer import MultiLoRALinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\."
    r"(?:lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight|lora_(?P<magnitude>magnitude_vector)(?:\.[^.]+)?(?:\.weight)?)$"
)
# DoRA's m (out,): PEFT writes "<module>.lora_magnitude_vector" (no ".weight": its format before a refactor)
_MAGNITUDE = "magnitude_vector"

# PEFT options that change what an adapter computes and that lorafast does not implement, with
# the value that means "off". An adapter using any of them is refused by name.
_UNSUPPORTED = {
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "use_bdlora": None,
}


def _is_off(value, off) -> bool:
    return value == off or (off in (None, {}, False) and not value)


def save_adapter(
    model: nn.Module, directory: str | Path, *, task_type: str | None = None, adapter_name: str | None = None
) -> Path:
    """Write the LoRA factors and config to ``directory`` (returned), for ``PeftModel.from_pretrained``.

    ``task_type`` (e.g. ``"SEQ_2_SEQ_LM"``) is recorded for PEFT's auto classes; ``adapter_name`` picks a named
    adapter. Layers whose r or alpha differ from the most common ones are written to PEFT's ``rank_pattern`` /
    ``alpha_pattern`` (by full module name). ValueError with no LoRA layers (or no such adapter), or layers that
    differ in dropout, rsLoRA or DoRA (one PEFT config describes them). A DoRA adapter (single or named) is
    written as PEFT's: ``use_dora: true`` and ``<module>.lora_magnitude_vector`` ``(out,)``.
    """
    from safetensors.torch import save

    experts = _expert_factors(model) if adapter_name is None else {}
    layers = _adapter_factors(model, adapter_name, allow_none=bool(experts))
    shared = {(dropout, rslora) for *_, dropout, rslora in [*layers.values(), *experts.values()]}
    if len(shared) > 1:
        raise ValueError(f"the LoRA layers differ in (dropout, use_rslora): {sorted(shared)}; save_adapter needs one")
    (dropout, use_rslora) = shared.pop()
    r = _most_common(layer[2] for layer in (layers or experts).values())
    alpha = _most_common(layer[3] for layer in (layers or experts).values())
    differ = sorted(name for name, (_, _, er, ealpha, *_) in experts.items() if (er, ealpha) != (r, alpha))
    if differ:
        raise ValueError(f"expert adapters {differ[:3]} differ from r={r}, lora_alpha={alpha} of the other layers")
    magnitudes = _magnitudes(model, adapter_name)
    use_dora = any(m is not None for m in magnitudes.values())
    if use_dora and any(m is None for m in magnitudes.values()):
        raise ValueError("some LoRA layers use DoRA and some do not; one PEFT config (use_dora) describes them all")

    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": _target_modules(model, set(layers)),
        "bias": "none",
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in _saved_layers(model, adapter_name)),  # Conv1D
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": use_dora,
        "use_rslora": use_rslora,
        "target_parameters": sorted(experts) or None,
        "rank_pattern": {re.escape(n): layer[2] for n, layer in layers.items() if layer[2] != r},
        "alpha_pattern": {re.escape(n): layer[3] for n, layer in layers.items() if layer[3] != alpha},
        "inference_mode": True,
    }
    tensors = {}
    for name, (lora_A, lora_B, *_) in layers.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = lora_A.detach().cpu().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = lora_B.detach().cpu().contiguous()
        if use_dora:
            tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = magnitudes[name].detach().cpu().contiguous()
    for module_name, experts_module in lora_experts(model) if experts else ():
        depths = peft_nesting(experts_module, experts_module.lora_adapters)
        for param, adapter in experts_module.lora_adapters.items():
            key = f"{_PREFIX}{module_name}.{'base_layer.' * depths[param]}"
            lora_A, lora_B = to_peft_factors(adapter.lora_A.detach().cpu(), adapter.lora_B.detach().cpu())
            tensors[key + "lora_A.weight"], tensors[key + "lora_B.weight"] = lora_A.contiguous(), lora_B.contiguous()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Each file is replaced in one step (a crash leaves every file old or new, never partial).
    write_atomically(directory / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    write_atomically(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return directory


def _magnitudes(model: nn.Module, adapter_name: str | None) -> dict[str, torch.Tensor | None]:
    """``{module name: DoRA magnitude (out,) or None}`` of the single adapter, or of the named one."""
    if adapter_name is None:
        return {name: layer.lora_magnitude if layer.use_dora else None for name, layer in lora_layers(model)}
    return {name: layer.magnitude(adapter_name) for name, layer in multi_lora_layers(model)}


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _expert_factors(model: nn.Module) -> dict[str, tuple]:
    """``{"<experts module>.<parameter>": (lora_A, lora_B, r, alpha, dropout, use_rslora)}`` of the expert adapters."""
    return {
        f"{module_name}.{param}": (a.lora_A, a.lora_B, a.r, a.alpha, a.dropout, a.use_rslora)
        for module_name, experts in lora_experts(model)
        for param, a in experts.lora_adapters.items()
    }


def _adapter_factors(model: nn.Module, adapter_name: str | None, allow_none: bool = False) -> dict[str, tuple]:
    """``{module name: (lora_A, lora_B, r, alpha, dropout, use_rslora)}`` of the single adapter, or the named one;
    ValueError if there is none (unless ``allow_none``)."""
    layers = dict(lora_layers(model) if adapter_name is None else multi_lora_layers(model))
    if adapter_name is None and not layers and not allow_none:
        hint = " (it has named adapters: pass adapter_name)" if list_adapters(model) else ""
        raise ValueError(f"the model has no LoRA layers to save{hint}; call apply_lora() first")
    if adapter_name is not None and adapter_name not in list_adapters(model):
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {list_adapters(model)}")
    return {n: (*m.factors(adapter_name), m.uses_rslora(adapter_name)) for n, m in layers.items()}


def _target_modules(model: nn.Module, names: set[str]) -> list[str] | str:
    """The suffixes of ``names`` if PEFT's suffix matching selects exactly them, else a regex of the names."""
    suffixes = sorted({name.rpartition(".")[2] for name in names})
    selected = {n for n, _ in model.named_modules() if n and any(n == s or n.endswith("." + s) for s in suffixes)}
    return suffixes if selected == names else _names_pattern(names)


def _names_pattern(names) -> str:
    """A regular expression that matches exactly these module names."""
    return "(" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """``(config, {module name: {"A": (r, in), "B": (out, r)}})`` of a PEFT LoRA adapter directory; a DoRA adapter
    (``use_dora``) also has ``"magnitude_vector"`` ``(out,)`` per module. The wrappers of ``target_parameters``
    (expert stacks) are keyed by PEFT's module path (``<experts>``, ``<experts>.base_layer``, ...: see
    :func:`expert_entries`) with ``"A"`` ``(E·r, in)`` and ``"B"`` ``(out, r·E)``.

    FileNotFoundError if the directory, config or weights are missing; ValueError on a corrupt config, a
    non-LoRA adapter, an unsupported option (named), or weights that are not plain LoRA factors.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a PEFT adapter directory")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_path} describes a {found!r} adapter; lorafast loads LoRA adapters only")
    for option, off in _UNSUPPORTED.items():
        if option in config and not _is_off(config[option], off):
            raise ValueError(
                f"the adapter in {directory} uses PEFT option {option}={config[option]!r}, which lorafast does not "
                "support; loading it would give different outputs than PEFT"
            )
    _check_config_numbers(config, config_path)

    weights_path = directory / WEIGHTS_NAME
    if weights_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(weights_path)
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{weights_path} could not be read as safetensors: {exc}") from exc
    elif (directory / LEGACY_WEIGHTS_NAME).is_file():
        state = torch.load(directory / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory}")

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{weights_path.name} holds {key!r}, which is not a LoRA factor of a linear layer")
        factor = match["factor"] or match["magnitude"]
        dims = 1 if factor == _MAGNITUDE else 2
        if not tensor.is_floating_point() or tensor.dim() != dims:
            what = "1-D float vector" if dims == 1 else "2-D float matrix"
            raise ValueError(f"{key} in {weights_path.name} is {tensor.dim()}-D {tensor.dtype}, not a {what}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{key} in {weights_path.name} holds NaN or infinite values")
        factors.setdefault(match["module"], {})[factor] = tensor
    dora = bool(config.get("use_dora"))
    stray = sorted(name for name, ab in factors.items() if _MAGNITUDE in ab and not dora)
    if stray:
        raise ValueError(f"{weights_path.name} holds DoRA magnitudes for {stray[:5]} but the config has no use_dora")
    expected = {"A", "B", _MAGNITUDE} if dora else {"A", "B"}
    incomplete = sorted(name for name, ab in factors.items() if set(ab) != expected)
    if incomplete or not factors:
        raise ValueError(
            f"{weights_path.name} lacks lora_A or lora_B{' or lora_magnitude_vector (use_dora)' if dora else ''} "
            f"for {incomplete or 'every module'}"
        )
    settings = _layer_settings(config, factors)
    experts = expert_entries(config, factors)
    for name, ab in factors.items():
        r = settings[name][0]
        if name in experts:  # PEFT's ParamWrapper: (E·r, in) and (out, r·E)
            if ab["A"].shape[0] % r or ab["B"].shape[1] != ab["A"].shape[0]:
                raise ValueError(
                    f"{config_path.name} says r={r} for the expert parameter at {name} but it has lora_A "
                    f"{tuple(ab['A'].shape)} and lora_B {tuple(ab['B'].shape)} (PEFT's (E·r, in) and (out, r·E))"
                )
            continue
        if ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise ValueError(
                f"{config_path.name} says r={r} for {name} but it has lora_A {tuple(ab['A'].shape)} and lora_B "
                f"{tuple(ab['B'].shape)} in {weights_path.name}"
            )
    return config, factors


def expert_entries(config: dict, names) -> dict[str, tuple[str, int]]:
    """``{name: (experts module, depth)}`` for the entries of ``names`` (module paths of an adapter's weights) that
    are PEFT ``target_parameters`` wrappers: ``<module>.base_layer`` × depth, where ``<module>.<parameter>`` matches
    a target parameter."""
    targets = config.get("target_parameters") or []
    modules = {t.rpartition(".")[0] for t in targets}
    entries = {}
    for name in names:
        base = re.sub(r"(\.base_layer)+$", "", name)
        if any(m == "" or base == m or base.endswith("." + m) for m in modules):
            entries[name] = (base, (len(name) - len(base)) // len(".base_layer"))
    return entries


def _layer_settings(config: dict, names) -> dict[str, tuple[int, float]]:
    """``{module name: (r, alpha)}`` as PEFT reads them from ``config`` (its r, lora_alpha and patterns)."""
    patterns = {key: config.get(key) or None for key in ("rank_pattern", "alpha_pattern")}
    return layer_settings(names, config["r"], config["lora_alpha"], **patterns)


def _check_config_numbers(config: dict, config_path: Path) -> None:
    """Raise ValueError unless r is a positive int, lora_alpha finite and lora_dropout (if set) in [0, 1)."""
    r, alpha, dropout = config.get("r"), config.get("lora_alpha"), config.get("lora_dropout")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{config_path}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{config_path}: lora_alpha must be a finite number, got {alpha!r}")
    try:
        check_patterns(config.get("rank_pattern") or None, config.get("alpha_pattern") or None)
    except ValueError as exc:
        raise ValueError(f"{config_path}: {exc}") from exc
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(f"{config_path}: use_rslora must be true or false, got {config['use_rslora']!r}")
    if dropout is not None and (
        isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0
    ):
        raise ValueError(f"{config_path}: lora_dropout must be a number in [0, 1), got {dropout!r}")


def _saved_layers(model: nn.Module, adapter_name: str | None):
    """The ``(name, layer)`` pairs an adapter is saved from or loaded into: single-adapter layers (``adapter_name``
    None), or the named adapters' layers."""
    return lora_layers(model) if adapter_name is None else multi_lora_layers(model)


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str | None = None) -> nn.Module:
    """Load a PEFT LoRA adapter (saved by PEFT or :func:`save_adapter`) into ``model``; returns ``model``.

    Without ``adapter_name``, a model without LoRA layers gets them on exactly the adapter's modules (its r, alpha,
    dropout, use_rslora, rank_pattern, alpha_pattern); one with LoRA layers must have them on those modules, and
    takes the adapter's alphas, dropout and scaling rule.
    With ``adapter_name`` it is added as a named adapter beside the others (same modules), a DoRA adapter
    (``use_dora``) as a named DoRA adapter with its magnitudes. An adapter with ``target_parameters`` (PEFT's
    expert LoRA) gets expert adapters on those parameters (:mod:`lorafast.experts`), without ``adapter_name`` only.
    Errors as :func:`read_adapter`, and ValueError naming the modules or shapes that do not fit the model.
    """
    config, factors = read_adapter(directory)
    experts = _place_experts(model, config, factors, adapter_name)
    expert_factors = {name: factors.pop(name) for name in experts}
    r, alpha, dropout = config["r"], config["lora_alpha"], float(config.get("lora_dropout") or 0.0)
    use_dora = bool(config.get("use_dora"))
    settings = _layer_settings(config, factors)
    options = {
        "use_rslora": bool(config.get("use_rslora")),
        "rank_pattern": config.get("rank_pattern") or None,
        "alpha_pattern": config.get("alpha_pattern") or None,
    }
    # Everything is checked before the model changes, so a failed load leaves it exactly as it was.
    modules = dict(model.named_modules())
    absent = sorted(name for name in factors if name not in modules)
    if absent:
        raise ValueError(f"the adapter targets modules that {type(model).__name__} does not have: {absent[:5]}")
    layers = dict(lora_layers(model))
    has_experts = dict(lora_experts(model))
    if adapter_name is None and (layers or has_experts):
        on_model = {(m, p) for m, module in has_experts.items() for p in module.lora_adapters}
        if on_model != set(experts.values()):
            raise ValueError(
                f"the adapter and the model's expert LoRA cover different parameters: {sorted(experts.values())[:4]} "
                f"in the adapter, {sorted(on_model)[:4]} in the model"
            )
        merged = sorted(name for name, layer in layers.items() if layer.merged)
        if merged:
            raise ValueError(f"LoRA layers {merged[:5]} are merged; unmerge() them before loading an adapter")
        if set(layers) != set(factors):
            raise ValueError(
                "the adapter and the model's LoRA layers cover different modules: "
                f"only in the adapter {sorted(set(factors) - set(layers))[:5]}, "
                f"only in the model {sorted(set(layers) - set(factors))[:5]}"
            )
        _check_shapes(factors, {n: (m.r, m.in_features, m.out_features) for n, m in layers.items()})
        differ = sorted(name for name, layer in layers.items() if layer.use_dora != use_dora)
        if differ:
            raise ValueError(f"the adapter has use_dora={use_dora} but LoRA layers {differ[:5]} do not")
    else:
        sizes = {name: _linear_sizes(modules[name]) for name in factors}
        not_linear = sorted(name for name, size in sizes.items() if size is None)
        if not_linear:
            raise ValueError(f"the adapter targets modules that are not linear layers: {not_linear[:5]}")
        _check_shapes(factors, {name: (settings[name][0], *size) for name, size in sizes.items()})
    if adapter_name is not None:
        add_adapter(
            model, adapter_name, _names_pattern(factors), r=r, alpha=alpha, dropout=dropout, use_dora=use_dora,
            **options,
        )  # fmt: skip
    elif not (layers or has_experts):
        targets = _names_pattern(factors) if factors else []
        expert_targets = config["target_parameters"] if experts else None
        apply_lora(
            model, targets, r=r, alpha=alpha, dropout=dropout, use_dora=use_dora, target_parameters=expert_targets,
            **options,
        )  # fmt: skip
    for name, layer in _saved_layers(model, adapter_name):
        lora_A, lora_B, *_ = layer.factors(adapter_name)
        lora_A.copy_(factors[name]["A"])
        lora_B.copy_(factors[name]["B"])
        if use_dora:
            magnitude = layer.lora_magnitude if adapter_name is None else layer.magnitude(adapter_name)
            magnitude.copy_(factors[name][_MAGNITUDE])
        if adapter_name is None:  # a named adapter got them from add_adapter
            layer.alpha, layer.dropout, layer.use_rslora = settings[name][1], dropout, options["use_rslora"]
    for name, (module_name, param) in experts.items():
        adapter = model.get_submodule(module_name).lora_adapters[param]
        lora_A, lora_B = peft_expert_factors(
            expert_factors[name]["A"], expert_factors[name]["B"], adapter.lora_A.shape[0]
        )
        adapter.lora_A.copy_(lora_A)
        adapter.lora_B.copy_(lora_B)
        adapter.alpha, adapter.dropout, adapter.use_rslora = alpha, dropout, options["use_rslora"]
    return model


def _place_experts(model: nn.Module, config: dict, factors: dict, adapter_name: str | None) -> dict[str, tuple]:
    """``{adapter entry: (experts module, parameter)}`` for the adapter's PEFT ``target_parameters`` wrappers, each
    checked against the model (a targeted expert projection, PEFT's nesting depth, ``(E·r, in)``/``(out, r·E)``)."""
    entries = expert_entries(config, factors)
    if not entries:
        return {}
    if adapter_name is not None:
        raise ValueError(
            "the adapter holds expert parameters (target_parameters); lorafast loads those as the model's single "
            "adapter only, not as a named adapter (adapter_name)"
        )
    targeted = select_target_parameters(model, config["target_parameters"])
    placed = {}
    for name, (module_name, depth) in entries.items():
        module = model.get_submodule(module_name) if module_name in targeted else None
        by_depth = {} if module is None else {d: p for p, d in peft_nesting(module, targeted[module_name]).items()}
        if depth not in by_depth:
            raise ValueError(f"{name} in the adapter is no PEFT wrapper of an expert parameter the config targets")
        param = by_depth[depth]
        experts, in_features, out_features = expert_sizes(module, param)
        shapes = {"A": (experts * config["r"], in_features), "B": (out_features, config["r"] * experts)}
        for factor, shape in shapes.items():
            if tuple(factors[name][factor].shape) != shape:
                raise ValueError(
                    f"lora_{factor} of {module_name}.{param} has shape {tuple(factors[name][factor].shape)} in the "
                    f"adapter but {shape} in the model (E={experts}, r={config['r']})"
                )
        placed[name] = (module_name, param)
    missing = {(m, p) for m, params in targeted.items() for p in params} - set(placed.values())
    if missing:
        raise ValueError(f"the adapter lacks the factors of target parameters {sorted(missing)[:4]}")
    return placed


def _linear_sizes(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a layer an adapter can target, else None."""
    if isinstance(module, MultiLoRALinear):
        return module.in_features, module.out_features
    return features(module) if kind_name(module) else None  # a base of any kind (a Conv1D's weight is (in, out))


def _check_shapes(factors: dict[str, dict[str, torch.Tensor]], shapes: dict[str, tuple[int, int, int]]) -> None:
    """Raise ValueError unless every module's A is ``(r, in)`` and B ``(out, r)`` for its ``(r, in, out)``."""
    for name, (r, in_features, out_features) in shapes.items():
        for factor, shape in (("A", (r, in_features)), ("B", (out_features, r)), (_MAGNITUDE, (out_features,))):
            if factor in factors[name] and tuple(factors[name][factor].shape) != shape:
                raise ValueError(
                    f"lora_{factor} of {name} has shape {tuple(factors[name][factor].shape)} in the adapter but "
                    f"{shape} in the model"
                )
