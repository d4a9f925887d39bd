"""Triton kernels of lorafast (``lorafast.kernels``): LoRA forward in one pass over x; dX, dA, dB (never dW0).

``TRITON_INTERPRET=1`` before importing runs them on CPU tensors through Triton's interpreter (tests).
"""

from .adapter_segments import AdapterSegments, adapter_segments
from .dora_linear import dora_forward
from .dropout_mask import dropout_keep_mask
from .dropout_xa import dropout_xa
from .fused_lora_matmul import fused_lora_dx, fused_lora_forward
from .launch import INTERPRETED, MAX_RANK, SUPPORTED_DTYPES
from .lora_linear import lora_backward, lora_forward
from .lora_weight_grad import lora_weight_grad
from .multi_dropout_xa import multi_dropout_xa
from .multi_lora_linear import multi_lora_backward, multi_lora_forward
from .multi_lora_matmul import fused_multi_lora_dx, fused_multi_lora_forward
from .multi_lora_weight_grad import multi_lora_weight_grad

__all__ = [
    "INTERPRETED",
    "MAX_RANK",
    "SUPPORTED_DTYPES",
    "AdapterSegments",
    "adapter_segments",
    "dora_forward",
    "dropout_keep_mask",
    "dropout_xa",
    "fused_lora_dx",
    "fused_lora_forward",
    "fused_multi_lora_dx",
    "fused_multi_lora_forward",
    "lora_backward",
    "lora_forward",
    "lora_weight_grad",
    "multi_dropout_xa",
    "multi_lora_backward",
    "multi_lora_forward",
    "multi_lora_weight_grad",
]
