"""What the GPU target the kernels compile for allows: TF32 dots, and which ROCm architectures they build for.

These are pure functions of the target (tested with made-up targets on CPU); :func:`current_target` names the
target of the GPU Triton launches on.
"""

from __future__ import annotations

import functools
import logging

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend

# ROCm architectures whose Triton front end (to LLVM IR) builds every lorafast kernel, checked offline with
# ``bench/kernel_report.py --arch gfx90a gfx942`` (MI200; MI300).
HIP_ARCHS = frozenset({"gfx90a", "gfx942"})

_logger = logging.getLogger(__name__)


@functools.cache
def has_tf32(target: GPUTarget) -> bool:
    """Whether Triton's ``tl.dot`` accepts ``input_precision="tf32"`` on ``target`` (every CUDA target; on ROCm
    only those whose backend lists it, gfx942 in Triton 3.9)."""
    return "tf32" in make_backend(target).parse_options({}).allowed_dot_input_precisions


def hip_arch(name: str) -> str:
    """The architecture of a ROCm device name: ``"gfx90a:sramecc+:xnack-"`` -> ``"gfx90a"``."""
    return name.split(":", 1)[0].strip().lower()


def hip_runs_triton(name: str) -> bool:
    """Whether the kernels build for the ROCm device named ``name`` (``gcnArchName``, features allowed)."""
    return hip_arch(name) in HIP_ARCHS


def hip_backend(choice: str, name: str) -> str:
    """The backend for ``LORAFAST_BACKEND`` = ``choice`` (``auto`` or ``triton``) on the ROCm device named ``name``:
    ``"triton"`` where the kernels build for it; else ``auto`` takes ``"torch"`` (one log line per architecture)
    and ``triton`` raises ValueError."""
    if hip_runs_triton(name):
        return "triton"
    reason = (
        f"lorafast's Triton kernels are not built for {hip_arch(name)} "
        f"(only for {', '.join(sorted(HIP_ARCHS))} on ROCm)"
    )
    if choice == "triton":
        raise ValueError(f"{reason}; set LORAFAST_BACKEND=torch to use the PyTorch path instead")
    _log_once(f"{reason}: running the PyTorch path (LORAFAST_BACKEND=torch says so without this message)")
    return "torch"


@functools.cache
def _log_once(message: str) -> None:
    _logger.warning(message)


@functools.cache
def _target_of(index: int) -> GPUTarget:
    import triton

    return triton.runtime.driver.active.get_current_target()


def current_target() -> GPUTarget | None:
    """The target of the current GPU (cached per device), None without one (CPU tensors, the interpreter)."""
    if not torch.cuda.is_available():
        return None
    return _target_of(torch.cuda.current_device())
