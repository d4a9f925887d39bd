"""What every lorafast kernel launcher shares: input checks, the rank block, config choice.

Launchers run the autotuned kernel on CUDA and, when a config is given or the kernels run in
Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors), the plain kernel with that config
(the first of the kernel's configs by default), so tests can pin every config.
``LORAFAST_AUTOTUNE=0`` skips autotuning on CUDA too (one compile per kernel instead of one per
config: quicker tests, slower kernels).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .entry import kernel_name, launch_failure

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_RANK = 256


@triton.jit
def _probe_kernel(ptr):
    tl.store(ptr, 1)


# Triton decides when a kernel is defined whether it is compiled or interpreted.
INTERPRETED = type(_probe_kernel).__name__ == "InterpretedFunction"

# Triton's interpreter multiplies the raw bits of bfloat16 dot operands
# (triton-lang/triton#11584); there, and only there, they are widened to fp32 first.
_WIDEN_BF16_DOT = tl.constexpr(INTERPRETED)


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``acc + a·b`` in fp32 (``acc`` may be None), as ``tl.dot``."""
    if _WIDEN_BF16_DOT:  # nested constexpr ifs: no boolean operators, for older Triton versions
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


def rank_block(r: int) -> int:
    """Rank padded for ``tl.dot`` (at least 16, a power of two): r=3 -> 16, r=40 -> 64."""
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"rank r={r} is outside the kernels' range [1, {MAX_RANK}]")
    return max(16, triton.next_power_of_2(r))


def tf32_allowed() -> bool:
    """Whether fp32 matmuls may use TF32, as torch's own CUDA matmuls would; never raises.

    Reads ``torch.backends.cuda.matmul.fp32_precision`` (then the global
    ``torch.backends.fp32_precision``) where torch has that API, the legacy ``allow_tf32``
    otherwise; reading the legacy flag raises once a user has set the new API, so it is last.
    """
    for owner in (torch.backends.cuda.matmul, torch.backends):
        precision = getattr(owner, "fp32_precision", None)
        if precision not in (None, "none"):
            return precision == "tf32"
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # legacy and new APIs mixed: no TF32 unless asked for through the new API
        return False


def token_bucket(m: int) -> int:
    """The autotuners' key for a token count: m rounded up to a power of two in [16, 65536].

    Tiles that suit 128 tokens (generation, eval) differ from those for 16k (training); one
    bucket per power of two retunes rarely even when every batch has a different length.
    """
    return min(max(16, triton.next_power_of_2(m)), 65536)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 follows torch's TF32 permission (:func:`tf32_allowed`)."""
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


def check_tensor(name: str, t: torch.Tensor, shape: Sequence[int], like: torch.Tensor) -> None:
    """Raise ValueError unless ``t`` has ``shape`` and the dtype and device of ``like``."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != like.dtype:
        raise ValueError(f"{name} is {t.dtype} but the input is {like.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {like.device}")


def check_input(name: str, t: torch.Tensor) -> None:
    """Raise ValueError unless ``t`` is a 2-D tensor of a supported dtype on a usable device."""
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} is {t.dtype}; the kernels support {', '.join(map(str, SUPPORTED_DTYPES))}")
    check_device(name, t.device)


def check_device(name: str, device: torch.device) -> None:
    """Raise ValueError unless the kernels can run on ``device`` (CUDA, or CPU when interpreted)."""
    device = torch.device(device)
    if INTERPRETED and device.type != "cpu":
        raise ValueError(f"{name} is on {device}; with TRITON_INTERPRET=1 the kernels run on CPU tensors")
    if not INTERPRETED and device.type != "cuda":
        raise ValueError(f"{name} is on {device}; the compiled kernels need CUDA tensors")


def launch(
    kernel,
    tuned_kernel,
    grid: Callable[[dict], tuple[int, ...]],
    args: Sequence,
    config: triton.Config | None,
) -> None:
    """Run ``tuned_kernel`` (autotuned) or, with ``config`` or in the interpreter, ``kernel``.

    Without autotuning (``LORAFAST_AUTOTUNE=0``) and without a pinned config, the first of the
    configs the autotuner would keep for these arguments (its ``early_config_prune``) that fits
    the GPU runs: one compile per kernel, not one per config (a tile can need more shared memory
    than the GPU has; the autotuner skips such configs itself). A pinned config that does not fit
    raises Triton's error. An error
    that means the kernel cannot run (``entry.launch_failure``) leaves with the kernel's name
    (``lorafast_kernel``), for the message the library's entry (``entry.kernel_entry``) gives.
    """
    try:
        _launch(kernel, tuned_kernel, grid, args, config)
    except Exception as exc:
        if launch_failure(exc) is not None and not hasattr(exc, "lorafast_kernel"):
            exc.lorafast_kernel = kernel_name(kernel)
        raise


def _launch(kernel, tuned_kernel, grid, args, config) -> None:
    if config is None and not INTERPRETED and os.environ.get("LORAFAST_AUTOTUNE", "1") != "0":
        tuned_kernel[grid](*args)
        return
    if config is not None or INTERPRETED:
        config = config or tuned_kernel.configs[0]
        kernel[grid(config.kwargs)](*args, **config.all_kwargs())
        return
    candidates = tuned_kernel.configs
    if tuned_kernel.early_config_prune is not None:
        candidates = tuned_kernel.early_config_prune(candidates, dict(zip(kernel.arg_names, args))) or candidates
    for i, candidate in enumerate(candidates):
        try:
            kernel[grid(candidate.kwargs)](*args, **candidate.all_kwargs())
            return
        except OutOfResources:  # raised before the kernel runs: nothing was written
            if i == len(candidates) - 1:
                raise


def gemm_configs() -> list[triton.Config]:
    """Tiles of the GEMM-shaped kernels (forward, dX) for Hopper/Ampere; the small ones also
    serve short inputs and large ranks."""
    shapes = [
        (128, 256, 64, 3, 8),
        (128, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (128, 128, 32, 4, 8),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 128, 32, 4, 8),  # 4-byte inputs
        (64, 64, 32, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in shapes
    ]


# Shared memory a block may use on an H100/H200; Ampere's A100 has 163 KiB.
SHARED_MEMORY_BUDGET = 227 * 1024


def prune_for_rank(configs, named_args, **kwargs):
    """The GEMM tiles that fit the inputs without spilling registers on Hopper.

    4-byte inputs double the pipeline's shared memory and the registers of the operand tiles:
    they take BLOCK_K = 32 (the bytes per row of a 2-byte BLOCK_K = 64) and 8 warps from
    64×128 outputs up (and, from rank 64, 64×128 tiles at most); 2-byte inputs take 4 warps up
    to 128×128, 8 at 128×128 when the GEMM draws a dropout mask. Large ranks add (BLOCK_M,
    R_PAD) operands. Short inputs (``M_BUCKET``) and narrow outputs (N) drop tiles much larger
    than themselves (``bench/kernel_report.py`` checks every config offline).
    """
    r_pad = kwargs.get("R_PAD", named_args.get("R_PAD", 16))
    u = named_args.get("u_ptr")
    element_size = u.element_size() if isinstance(u, torch.Tensor) else 2

    def fits(config):
        kw = config.kwargs
        area = kw["BLOCK_M"] * kw["BLOCK_N"]
        pipeline = config.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * element_size
        if pipeline > SHARED_MEMORY_BUDGET or (r_pad >= 128 and area > 128 * 128):
            return False
        if element_size == 4:
            if r_pad >= 64:  # the (BLOCK_M, R_PAD)·(R_PAD, BLOCK_N) start of the accumulator
                return kw["BLOCK_K"] == 32 and area <= 64 * 128 and config.num_warps == 8
            return kw["BLOCK_K"] == 32 and (area < 64 * 128 or config.num_warps == 8)
        if area == 128 * 128 and named_args.get("DROPOUT", False):  # mask drawn beside the accumulator
            return config.num_warps == 8
        return config.num_warps == 4 or area > 128 * 128

    kept = [c for c in configs if fits(c)] or configs
    # Tiles far wider than the problem only idle threads: skip them when smaller ones remain.
    m_bucket, n = named_args.get("M_BUCKET"), named_args.get("N")
    snug = [
        c
        for c in kept
        if (m_bucket is None or c.kwargs["BLOCK_M"] <= max(64, m_bucket))
        and (n is None or c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n)))
    ]
    return snug or kept


def prune_wide_fp32_tiles(pointer: str, width: str):
    """An ``early_config_prune`` for the skinny kernels: with 4-byte data at ``pointer`` only
    ``BLOCK_M × width`` tiles up to 64×64 are kept (the bytes of a 2-byte 64×128 tile)."""

    def prune(configs, named_args, **kwargs):
        data = named_args.get(pointer)
        if not isinstance(data, torch.Tensor) or data.element_size() < 4:
            return configs
        return [c for c in configs if c.kwargs["BLOCK_M"] <= 64 and c.kwargs[width] <= 64] or configs

    return prune


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid``, walking GROUP_M row tiles per column for L2 reuse."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n
