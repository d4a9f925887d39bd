"""The front door of every LoRA call (:func:`front_door`) and which implementation runs it: ``auto`` (default)
takes the Triton kernels on CUDA, else the PyTorch path.

``LORAFAST_BACKEND=auto|triton|torch`` overrides it, read on every call. ``triton`` on CPU needs
``TRITON_INTERPRET=1`` before ``lorafast.kernels`` is first imported (Triton decides at kernel definition).

Fallback: under ``auto``, a Triton kernel that cannot compile or start
(``lorafast.kernels.entry.KernelLaunchError``: out of shared memory or registers, a compilation error, no C compiler
or ``Python.h`` for Triton's launcher, a driver error raised before the launch) sends that call, and every later
call of the same :func:`fallback_key` in this process, to the PyTorch path, after one
:class:`KernelFallbackWarning`. The call is redone from its inputs: no output of the failed attempt is used. A
backward whose kernels fail runs the PyTorch backward when the forward drew no dropout mask (the gradients need only
the saved ``xa``); under dropout it raises, since the PyTorch path draws other masks than the forward's Triton
kernels did, and later calls of that key take the PyTorch path from their forward on. Under ``torch.compile`` a
failure raises that error (a compiled graph cannot switch paths). ``LORAFAST_BACKEND=triton`` turns every fallback
into that error, which names ``LORAFAST_BACKEND=torch``.

``auto`` takes the Triton kernels on the device types in ``AUTO_TRITON_DEVICE_TYPES`` (CUDA); tests add ``"cpu"``
to run ``auto``'s Triton path, fallback included, through Triton's interpreter.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable

import torch

from . import multi_torch_backend, torch_backend
from .dropout import dropout_seed
from .validation import autocast_inputs

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "LORAFAST_BACKEND"
# Where ``auto`` takes the Triton kernels; tests add "cpu" (with TRITON_INTERPRET=1) to exercise auto's Triton path.
AUTO_TRITON_DEVICE_TYPES = {"cuda"}


class KernelFallbackWarning(RuntimeWarning):
    """``auto`` runs the PyTorch path for a shape whose Triton kernel cannot run (once per :func:`fallback_key`)."""


_FAILED: dict[tuple, str] = {}  # fallback_key -> the failure's message
_FAILED_LOCK = threading.Lock()


def fallback_key(rows: int, in_features: int, out_features: int, rank: int, dtype, dropout: bool, mixed: bool,
                 device: torch.device) -> tuple:  # fmt: skip
    """What a kernel's success depends on (the kernels' autotune keys): token bucket, sizes, rank, dtype, dropout,
    mixed adapters, device. One-adapter LoRA and DoRA share a key: a failure sends both to the PyTorch path."""
    bucket = min(max(16, 1 << max(rows - 1, 0).bit_length()), 65536)  # kernels.launch.token_bucket, no Triton import
    return (bucket, in_features, out_features, rank, str(dtype), dropout, mixed, str(device))


def failed(key: tuple) -> bool:
    """Whether a Triton kernel failed for ``key`` in this process (its calls then take the PyTorch path)."""
    return key in _FAILED


def record_failure(key: tuple, error: Exception, note: str = "") -> None:
    """Remember that ``key`` takes the PyTorch path; warn the first time (one warning per key)."""
    with _FAILED_LOCK:
        first = key not in _FAILED
        _FAILED.setdefault(key, str(error))
    if first:
        message = f"lorafast: {error}. Running the PyTorch path for this shape from now on in this process{note}"
        warnings.warn(message, KernelFallbackWarning, stacklevel=3)


def forget_failures() -> None:
    """Let every key try the Triton kernels again (tests; after a change that may let them run)."""
    with _FAILED_LOCK:
        _FAILED.clear()


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
    if choice == "torch" or (choice == "auto" and device.type not in AUTO_TRITON_DEVICE_TYPES):
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
    """``(forward, backward)`` of ``backend`` (one adapter or, ``mixed``, one per row) on front-door-checked inputs;
    Triton's backward falls back as the module docstring says."""
    if backend == "triton":
        from .kernels import lora_linear as one
        from .kernels import multi_lora_linear as many

        return (many.forward, _mixed_backward) if mixed else (one.forward, _backward)
    if mixed:
        return multi_torch_backend.multi_lora_forward, multi_torch_backend.multi_lora_backward
    return torch_backend.lora_forward, torch_backend.lora_backward


def _backward(grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, needs_grad):
    """The Triton backward of one adapter, or (auto, no dropout) the PyTorch one where a kernel cannot run."""
    from .kernels import lora_linear

    key = fallback_key(grad_y.shape[0], x.shape[1], grad_y.shape[1], lora_A.shape[0], grad_y.dtype, dropout_p > 0.0,
                       False, grad_y.device)  # fmt: skip
    args = (grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, needs_grad)
    return _backward_or_fallback(key, lora_linear.backward, torch_backend.lora_backward, args, {})


def _mixed_backward(grad_y, x, xa, weight, lora_A, lora_B, scalings, row_adapter, needs_grad, dropout=None, seed=0,
                    segments=None):  # fmt: skip
    """The Triton backward of a mixed batch, or (auto, no dropout) the PyTorch one where a kernel cannot run."""
    from .kernels import multi_lora_linear

    key = fallback_key(grad_y.shape[0], x.shape[1], grad_y.shape[1], max(a.shape[0] for a in lora_A), grad_y.dtype,
                       dropout is not None, True, grad_y.device)  # fmt: skip
    args = (grad_y, x, xa, weight, lora_A, lora_B, scalings, row_adapter, needs_grad)
    kwargs = {"dropout": dropout, "seed": seed}
    triton_backward = lambda *a, **kw: multi_lora_linear.backward(*a, **kw, segments=segments)  # noqa: E731
    return _backward_or_fallback(key, triton_backward, multi_torch_backend.multi_lora_backward, args, kwargs)


def _backward_or_fallback(key, triton_backward: Callable, torch_backward: Callable, args, kwargs):
    dropout = key[5]
    if requested_backend() == "auto" and failed(key) and not dropout:
        return torch_backward(*args, **kwargs)
    from .kernels.entry import KernelLaunchError  # the Triton path's own error; kernels are imported by now

    try:
        return triton_backward(*args, **kwargs)
    except KernelLaunchError as error:
        if requested_backend() != "auto" or torch.compiler.is_compiling():
            raise
        if dropout:  # the forward's kernels drew the mask; the PyTorch path would draw another
            record_failure(key, error, note=" (from its forward on: this backward cannot finish, see the error)")
            raise KernelLaunchError(
                error.op, error.kernel, error.shapes,
                f"{error.reason}; its forward ran on Triton with dropout, whose mask the PyTorch path does not "
                f"reproduce, so this step's gradients cannot be computed (later calls of this shape run the PyTorch "
                f"path from their forward on)",
            ) from error  # fmt: skip
        record_failure(key, error)
        return torch_backward(*args, **kwargs)


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
    mixed = isinstance(lora_A, (list, tuple)) or lora_A.dim() == 3
    rank = max(a.shape[-2] for a in lora_A) if isinstance(lora_A, (list, tuple)) else lora_A.shape[-2]
    backend = resolve_backend(x.device, x.dtype, rank)
    seed = dropout_seed() if dropout else 0  # the same for either backend: a redo on the PyTorch path keeps it
    tensors = (x, weight, bias, lora_A, lora_B)
    if backend != "triton" or requested_backend() != "auto":
        return run(tensors, checked, backend, seed)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    out_features = lora_B[0].shape[0] if isinstance(lora_B, (list, tuple)) else lora_B.shape[-2]  # W0 may be packed
    key = fallback_key(rows, x.shape[-1], out_features, rank, x.dtype, dropout, mixed, x.device)
    if failed(key):
        backend = "torch"
    if backend == "torch" or torch.compiler.is_compiling():  # a compiled graph cannot switch paths at run time
        return run(tensors, checked, backend, seed)
    from .kernels.entry import KernelLaunchError  # resolve_backend imported the kernels

    try:
        return run(tensors, checked, backend, seed)
    except KernelLaunchError as error:  # raised before any output was returned: the call is redone
        record_failure(key, error)
    return run(tensors, checked, "torch", seed)
