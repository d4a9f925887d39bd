"""lorafast: fused LoRA linear layers for PyTorch, with Triton kernels on CUDA.

- :func:`lora_linear`: ``y = x·W0ᵀ + b + scaling·(drop(x)·Aᵀ)·Bᵀ`` with gradients for x, A, B.
- :class:`FusedLoRALinear`: a drop-in ``nn.Linear`` replacement built on it.
"""

from .function import LoRALinearFunction, lora_linear
from .layer import FusedLoRALinear

__all__ = ["FusedLoRALinear", "LoRALinearFunction", "lora_linear"]
__version__ = "0.1.0"
