"""Several named adapters in one model, and batches that mix them (one adapter per sequence).

    lorafast.add_adapter(model, "medical", r=8)            # nn.Linear -> MultiLoRALinear, + adapter
    lorafast.load_adapter(model, "peft_dir", adapter_name="legal")
    with lorafast.adapter_ids(model, ["medical", None, "legal"]):   # one per sequence
        model.generate(**batch)

Every adapter covers the same modules. Integer ids follow :func:`list_adapters`; −1 or None: the base model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from .layer import check_dora_bases, default_adapter_dtype
from .model import (
    DEFAULT_TARGETS,
    _replace,
    _single_adapter_bases,
    layer_settings,
    lora_layers,
    multi_lora_layers,
    select_targets,
)
from .multi_layer import MultiLoRALinear
from .row_adapters import RowAdapters, scoped_row_adapters


def _layers_or_error(model: nn.Module) -> dict[str, MultiLoRALinear]:
    layers = dict(multi_lora_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no named adapters; call lorafast.add_adapter() first")
    return layers


def add_adapter(
    model: nn.Module,
    name: str,
    target_modules: str | Sequence[str] = DEFAULT_TARGETS,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    adapter_dtype: torch.dtype | None = None,
    *,
    use_rslora: bool = False,
    use_dora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> nn.Module:
    """Add a named LoRA adapter (its own r, alpha, dropout) to ``model`` in place; returns ``model``.

    The first one turns the targeted ``nn.Linear`` and GPT-2 ``Conv1D`` modules (``target_modules`` as in
    ``apply_lora``) into MultiLoRALinear (sharing their weights), freezes every other parameter and becomes active;
    later ones must target the same modules. ``adapter_dtype``, ``use_rslora``, ``rank_pattern`` and
    ``alpha_pattern`` as in ``apply_lora`` (None: fp32 factors on an fp16/bf16 model). ``use_dora``: a DoRA adapter
    (magnitudes ``lora_magnitude.<name>``, PEFT's initialisation); DoRA and plain adapters mix freely, in one model
    and in one batch. All factors train, so several adapters can train in one mixed batch. ValueError on
    ``apply_lora`` layers, an existing name, a bad adapter_dtype or use_dora, DoRA over a bitsandbytes module not
    quantized yet, or targets that match nothing, are not linear, or differ.
    """
    if next(lora_layers(model), None) is not None:
        raise ValueError(
            "the model has single-adapter LoRA layers (apply_lora); named adapters need a model without them: "
            "call remove_lora() or merge_lora() first"
        )
    layers = dict(multi_lora_layers(model))
    matched = select_targets(model, target_modules, allowed=(*_single_adapter_bases(), MultiLoRALinear))
    default_adapter_dtype(torch.float32, adapter_dtype)  # a bad adapter_dtype fails before the model changes
    settings = layer_settings(matched, r, alpha, rank_pattern, alpha_pattern)
    check_dora_bases(use_dora, [getattr(m, "base_layer", m) for m in matched.values()])
    if layers and set(matched) != set(layers):
        raise ValueError(
            f"adapter {name!r} targets different modules than the model's other adapters "
            f"{list_adapters(model)}: only in {name!r} {sorted(set(matched) - set(layers))[:5]}, "
            f"only in the others {sorted(set(layers) - set(matched))[:5]}; every adapter must cover the same modules"
        )
    if not layers:
        for param in model.parameters():
            param.requires_grad_(False)
        for module_name, module in matched.items():
            layers[module_name] = MultiLoRALinear.from_linear(module)
    first = next(iter(layers.values()))
    if name in first.adapter_names:
        raise ValueError(f"the model already has an adapter named {name!r}; remove_adapter() it first")
    for module_name, layer in layers.items():
        layer_r, layer_alpha = settings[module_name]
        options = {"dropout": dropout, "adapter_dtype": adapter_dtype, "use_rslora": use_rslora, "use_dora": use_dora}
        layer.add_adapter(name, r=layer_r, alpha=layer_alpha, **options)
    for module_name, layer in layers.items():
        if matched[module_name] is not layer:
            _replace(model, module_name, layer)
        if layer.active_adapter is None and len(layer.adapter_names) == 1:
            layer.set_adapter(name)
    return model


def list_adapters(model: nn.Module) -> list[str]:
    """The model's adapter names, in the order integer adapter ids refer to (empty if none)."""
    first = next(multi_lora_layers(model), None)
    return first[1].adapter_names if first else []


def set_adapter(model: nn.Module, name: str | None) -> nn.Module:
    """Make ``name`` the adapter the whole batch uses (None: the base model). Returns ``model``."""
    layers = _layers_or_error(model)
    if name is not None and name not in list_adapters(model):
        raise ValueError(f"no adapter named {name!r}; the model has {list_adapters(model)}")
    for layer in layers.values():
        layer.set_adapter(name)
    return model


def remove_adapter(model: nn.Module, name: str) -> nn.Module:
    """Delete adapter ``name`` from every layer; the last one removed puts plain ``nn.Linear`` back."""
    layers = _layers_or_error(model)
    if name not in list_adapters(model):
        raise ValueError(f"no adapter named {name!r}; the model has {list_adapters(model)}")
    for module_name, layer in layers.items():
        layer.remove_adapter(name)
        if not layer.adapter_names:
            _replace(model, module_name, layer.to_base_layer())
    return model


def adapter_index(model: nn.Module, ids: torch.Tensor | Sequence[str | int | None]) -> RowAdapters:
    """1-D ids checked on the host (names -> their index, None -> −1); ValueError if empty, unknown, out of [-1, K)."""
    names = list_adapters(model)
    if isinstance(ids, torch.Tensor):
        return RowAdapters(ids, names)
    index = []
    for item in ids:
        if item is None:
            index.append(-1)
        elif isinstance(item, str):
            if item not in names:
                raise ValueError(f"no adapter named {item!r}; the model has {names}")
            index.append(names.index(item))
        elif isinstance(item, int) and not isinstance(item, bool):
            index.append(item)
        else:
            raise ValueError(f"an adapter id must be a name, an int or None, got {item!r}")
    return RowAdapters(torch.tensor(index, dtype=torch.int64), names)


@contextlib.contextmanager
def adapter_ids(model: nn.Module, ids: torch.Tensor | Sequence[str | int | None]):
    """Within the block, sequence i of every batch uses adapter ``ids[i]`` (a name, an index, or None).

    The ids reach layers past forward signatures that know nothing of them (``model(...)``, ``generate``). They
    live in a context variable: concurrent blocks on one model (threads, asyncio tasks) never see each other's,
    and the model is as before once the block ends, even on an exception; threads started inside do not inherit
    them. b sequences need b ids; a multiple of b rows (beam search) repeats each id. Each adapter gets gradients
    from its own sequences only; with gradient checkpointing call ``backward()`` inside the block, as
    recomputation reads the ids. Checked here on the host (a tensor is copied to the CPU once): ValueError with
    no named adapters, no ids, an unknown name or an id out of range; layers refuse ids of a removed adapter.
    """
    layers = _layers_or_error(model)
    row_adapters = adapter_index(model, ids)
    with scoped_row_adapters(layers.values(), row_adapters):
        yield model
