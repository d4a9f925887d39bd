"""Where the library enters the Triton kernels: every launch on the tensors' device, and a kernel that cannot run
reported as :class:`KernelLaunchError`.

:func:`kernel_entry` wraps each entry (the one-adapter, mixed-adapter and DoRA forwards and backwards, eager and as
torch.compile operators): inside it the tensors' CUDA device is the current device, so Triton launches there, on
that device's current stream (Triton launches on the current device's current stream), as the cuBLAS GEMMs and
torch ops beside the kernels do; with ``device_map="auto"`` or a rank that never called ``set_device``, the current
device may be another GPU. Errors that mean "this kernel cannot compile or start here" (:func:`launch_failure`)
become ``KernelLaunchError``, naming the kernel, the inputs and the reason; :mod:`lorafast.backend` decides whether
the PyTorch path runs instead.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import subprocess
from collections.abc import Callable

import torch
from triton.errors import TritonError
from triton.runtime.errors import InterpreterError


class KernelLaunchError(RuntimeError):
    """A Triton kernel could not compile or start for these inputs; nothing it computed is used.

    ``kernel``: the kernel's name; ``reason``: Triton's or the driver's message; ``shapes``: the inputs, in words.
    """

    def __init__(self, op: str, kernel: str, shapes: str, reason: str):
        self.op, self.kernel, self.shapes, self.reason = op, kernel, shapes, reason
        super().__init__(
            f"the Triton kernel {kernel} cannot run ({op} of {shapes}): {reason}. Set LORAFAST_BACKEND=torch to run "
            f"the PyTorch path instead (LORAFAST_BACKEND=auto falls back to it by itself, outside torch.compile)"
        )


def launch_failure(exc: BaseException) -> str | None:
    """The reason a kernel could not compile or start (before it wrote anything), or None for any other error.

    Triton's own errors (out of shared memory or registers, compilation, ptxas, the autotuner left with no config
    that runs), a C compiler missing or failing on Triton's launcher (no ``Python.h``), libcuda not found, and
    driver errors Triton raises before or at the launch (``Triton Error [CUDA]: ...``). Not: the interpreter's
    errors, out-of-memory, or errors of lorafast's own checks (bugs and bad input stay errors).
    """
    if isinstance(exc, InterpreterError):
        return None
    if isinstance(exc, TritonError):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, subprocess.CalledProcessError):  # Triton builds its launcher with the C compiler
        return f"building Triton's launcher failed (is Python.h installed?): {exc}"
    text = str(exc)
    if isinstance(exc, RuntimeError) and not isinstance(exc, torch.OutOfMemoryError):
        markers = ("Failed to find C compiler", "Failed to find C++ compiler", "Triton Error [", "Failed to load newly")
        if any(marker in text for marker in markers):
            return text.strip()
    if isinstance(exc, AssertionError) and "libcuda" in text:
        return text.strip().replace("\n", " ")
    return None


def kernel_name(kernel) -> str:
    """A kernel's (or autotuner's) function name."""
    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", None)
    return name or type(kernel).__name__


def failing_kernel(exc: BaseException) -> str:
    """The kernel named by ``launch`` on ``exc``, else the innermost Triton kernel in its traceback."""
    name = getattr(exc, "lorafast_kernel", None)
    if name is not None:
        return name
    tb, found = exc.__traceback__, None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and type(owner).__module__.startswith("triton.runtime"):
            found = kernel_name(owner)
        tb = tb.tb_next
    return found or "(a lorafast kernel)"


def device_guard(device: torch.device):
    """A context in which ``device`` is the current CUDA device (nothing to do for other devices)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def describe(bound: inspect.BoundArguments) -> str:
    """The tensor inputs of a call, in words: ``x (512, 1024) bfloat16, weight (1024, 1024), lora_A 2 × (16, 1024)``."""
    parts = []
    for name, value in bound.arguments.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            dtype = "" if parts else " " + str(value.dtype).removeprefix("torch.")  # the first tensor's dtype
            parts.append(f"{name} {tuple(value.shape)}{dtype}")
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            parts.append(f"{name} {len(value)} × {tuple(value[0].shape)}")
        elif name in ("dropout_p", "scaling") and isinstance(value, float):
            parts.append(f"{name} {value:g}")
    return ", ".join(parts)


def kernel_entry(op: str) -> Callable[[Callable], Callable]:
    """Decorate an entry into the kernels (first argument: a tensor on the device to run on): it runs on that
    tensor's device (:func:`device_guard`) and raises ``KernelLaunchError`` where a kernel cannot run."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def entry(*args, **kwargs):
            try:
                with device_guard(args[0].device):
                    return fn(*args, **kwargs)
            except Exception as exc:
                reason = launch_failure(exc)
                if reason is None:
                    raise
                shapes = describe(signature.bind(*args, **kwargs))
                raise KernelLaunchError(op, failing_kernel(exc), shapes, reason) from exc

        return entry

    return decorate
