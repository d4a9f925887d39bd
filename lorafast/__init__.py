"""lorafast: fused LoRA linear layers for PyTorch, with Triton kernels on CUDA.

- :func:`lora_linear`: ``y = x·W0ᵀ + b + scaling·(drop(x)·Aᵀ)·Bᵀ`` with gradients for x, A, B.
- :class:`FusedLoRALinear`: a drop-in ``nn.Linear`` replacement built on it.
- :func:`apply_lora`, :func:`merge_lora`, :func:`remove_lora`: LoRA on a whole model.
- :func:`save_adapter`, :func:`load_adapter`: adapters in PEFT's format.
- :func:`add_adapter`, :func:`adapter_ids`, :func:`multi_lora_linear`, :class:`MultiLoRALinear`:
  several named adapters in one model, mixed in one batch (one adapter per sequence).
- :func:`patch_peft`, :func:`unpatch_peft`: lorafast's fused LoRA inside a ``peft.PeftModel``.
- :func:`expert_lora_linear`, ``apply_lora(target_parameters=...)``: LoRA on transformers' MoE expert stacks.
- :func:`merge_lora_dense`: a model over bitsandbytes 4-/8-bit or FP8 bases (which every layer takes, see
  :mod:`lorafast.bases`) merged into a dense one.
- :func:`adapter_checkpoints`: a ``transformers.Trainer`` saves and resumes only the adapter.
"""

from .adapter import load_adapter, read_adapter, save_adapter
from .expert_function import expert_lora_linear
from .function import LoRALinearFunction, lora_linear
from .layer import FusedLoRALinear
from .model import (
    apply_lora,
    lora_layers,
    lora_state_dict,
    merge_lora,
    merge_lora_dense,
    parameter_counts,
    remove_lora,
)
from .multi_adapter import adapter_ids, add_adapter, list_adapters, multi_lora_layers, remove_adapter, set_adapter
from .multi_function import MultiLoRALinearFunction, multi_lora_linear
from .multi_layer import MultiLoRALinear
from .peft_patch import patch_peft, unpatch_peft
from .trainer import adapter_checkpoints

__all__ = [
    "FusedLoRALinear",
    "LoRALinearFunction",
    "MultiLoRALinear",
    "MultiLoRALinearFunction",
    "QuantizedLoRALinear",
    "adapter_checkpoints",
    "adapter_ids",
    "add_adapter",
    "apply_lora",
    "expert_lora_linear",
    "list_adapters",
    "load_adapter",
    "lora_layers",
    "lora_linear",
    "lora_state_dict",
    "merge_lora",
    "merge_lora_dense",
    "multi_lora_layers",
    "multi_lora_linear",
    "parameter_counts",
    "patch_peft",
    "read_adapter",
    "remove_adapter",
    "remove_lora",
    "save_adapter",
    "set_adapter",
    "unpatch_peft",
]
__version__ = "0.1.0"

QuantizedLoRALinear = FusedLoRALinear  # the name of the QLoRA layer before every layer took every base kind
