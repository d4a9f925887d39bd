"""What the GPU target the kernels compile for allows: TF32 dots, and which ROCm architectures they build for.

Both are pure functions of the target (tested with made-up targets on CPU); :func:`current_target` names the
target of the GPU Triton launches on.
"""

from __future__ import annotations

import functools

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend

# ROCm architectures whose Triton front end (to LLVM IR) builds every lorafast kernel, checked offline with
# ``bench/kernel_report.py --arch gfx90a --arch gfx942`` (MI200; MI300).
HIP_ARCHS = frozenset({"gfx90a", "gfx942"})


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


@functools.cache
def _target_of(index: int) -> GPUTarget:
    import triton

    return triton.runtime.driver.active.get_current_target()


def current_target() -> GPUTarget | None:
    """The target of the current GPU (cached per device), None without one (CPU tensors, the interpreter)."""
    if not torch.cuda.is_available():
        return None
    return _target_of(torch.cuda.current_device())
