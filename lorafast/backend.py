"""The front door of every LoRA call (:func:`front_door`) and which implementation runs it: ``auto`` (default)
takes the Triton kernels on CUDA, else the PyTorch path.

``LORAFAST_BACKEND=auto|triton|torch`` overrides it, read on every call. ``triton`` on CPU needs
``TRITON_INTERPRET=1`` before ``lorafast.kernels`` is first imported (Triton decides at kernel definition).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from . import multi_torch_backend, torch_backend
from .dropout import dropout_seed
from .validation import autocast_inputs

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "LORAFAST_BACKEND"


def _kernels_or_error():
    """Import ``lorafast.kernels`` (a dict lookup once imported): ``(module, None)`` or ``(None, reason)``."""
    try:
        from . import kernels
    except ImportError as exc:  # triton missing or broken
        return None, f"Triton could not be imported ({exc})"
    return kernels, None


def requested_backend() -> str:
    """The backend named by ``LORAFAST_BACKEND`` (``auto`` when unset)."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={choice!r} is not one of {', '.join(BACKENDS)}")
    return choice


def resolve_backend(device: torch.device, dtype: torch.dtype, rank: int = 1) -> str:
    """``"triton"`` or ``"torch"`` for ``device``, ``dtype`` and LoRA ``rank``; ValueError if Triton is asked for but
    cannot run. ``auto`` takes the PyTorch path for a rank above the kernels' ``MAX_RANK``."""
    choice = requested_backend()
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return "torch"
    kernels, reason = _kernels_or_error()
    if choice == "auto" and kernels is not None and rank > kernels.MAX_RANK:
        return "torch"
    fallback = f"set {ENV_VAR}=torch to use the PyTorch path instead"
    if kernels is None:
        raise ValueError(f"the Triton backend is needed for {device.type} tensors but {reason}; {fallback}")
    if device.type == "cpu":
        if not kernels.INTERPRETED:
            raise ValueError(
                "the Triton backend runs CPU tensors only through Triton's interpreter: set "
                "TRITON_INTERPRET=1 before lorafast.kernels is imported, or " + fallback
            )
    elif device.type != "cuda":
        raise ValueError(f"the Triton backend does not run on {device.type} tensors; {fallback}")
    elif kernels.INTERPRETED:
        raise ValueError(f"TRITON_INTERPRET=1 runs Triton on CPU tensors only, not on {device}; {fallback}")
    elif torch.version.hip is not None:  # ROCm: only where the kernels build for the architecture
        from .kernels.targets import hip_backend

        if hip_backend(choice, torch.cuda.get_device_properties(device).gcnArchName) == "torch":
            return "torch"
    else:
        capability = torch.cuda.get_device_capability(device)
        needed = (8, 0) if dtype == torch.bfloat16 else (7, 0)
        if capability < needed:
            raise ValueError(
                f"the Triton kernels need compute capability {needed[0]}.{needed[1]} for {dtype}, "
                f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}; {fallback}"
            )
    if dtype not in kernels.SUPPORTED_DTYPES:
        raise ValueError(f"the Triton kernels support {kernels.SUPPORTED_DTYPES}, not {dtype}; {fallback}")
    return "triton"


def implementation(backend: str, mixed: bool = False) -> tuple[Callable, Callable]:
    """``(forward, backward)`` of ``backend`` (one adapter or, ``mixed``, one per row) on front-door-checked inputs."""
    if backend == "triton":
        from .kernels import lora_linear as one
        from .kernels import multi_lora_linear as many

        return (many.forward, many.backward) if mixed else (one.forward, one.backward)
    if mixed:
        return multi_torch_backend.multi_lora_forward, multi_torch_backend.multi_lora_backward
    return torch_backend.lora_forward, torch_backend.lora_backward


def front_door(x, weight, bias, lora_A, lora_B, check: Callable, run: Callable):
    """``run((x, weight, bias, lora_A, lora_B), checked, backend, seed)`` after what every LoRA call does first.

    Under ``torch.autocast`` the tensors are cast as ``F.linear``'s would be and ``run`` runs with autocast off;
    ``check(x, weight, bias, lora_A, lora_B)`` raises on bad input, else returns ``(dropout, checked)``; the base
    must be frozen; then the backend is chosen and, under ``dropout``, a seed drawn (else 0).
    """
    cast = autocast_inputs(x, weight, bias, lora_A, lora_B)
    if cast is not None:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return front_door(*cast, check, run)
    dropout, checked = check(x, weight, bias, lora_A, lora_B)
    if torch.is_grad_enabled():
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.requires_grad:
                raise ValueError(
                    f"{name} requires grad, but lorafast trains only the adapters (lora_A, lora_B) and computes no "
                    f"gradient for the base layer; freeze it with {name}.requires_grad_(False)"
                )
    # lora_A: (r, in), stacked (K, R, in), or the K adapters' own (r_k, in) factors
    rank = max(a.shape[-2] for a in lora_A) if isinstance(lora_A, (list, tuple)) else lora_A.shape[-2]
    backend = resolve_backend(x.device, x.dtype, rank)
    return run((x, weight, bias, lora_A, lora_B), checked, backend, dropout_seed(backend) if dropout else 0)
