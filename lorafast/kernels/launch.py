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
from triton.backends.compiler import GPUTarget
from triton.runtime.errors import OutOfResources

from .entry import kernel_name, launch_failure
from .shared_memory import DEFAULT_SHARED_MEMORY, SHARED_MEMORY_PER_BLOCK, SmallTiles, fitting, shared_memory_need
from .targets import current_target, has_tf32

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


def dot_precision(dtype: torch.dtype, target: GPUTarget | None = None) -> str:
    """``tl.dot`` input precision: IEEE for 2-byte inputs (their products are exact in fp32); fp32 takes TF32 where
    torch allows it (:func:`tf32_allowed`) and ``target`` has it (default: the current GPU's; ROCm: gfx942 only)."""
    if dtype != torch.float32 or not tf32_allowed():
        return "ieee"
    target = target or current_target()
    return "tf32" if target is None or has_tf32(target) else "ieee"


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


def _gemm_config(bm, bn, bk, stages, warps) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps
    )


# Small-smem GEMM tiles for 4-byte inputs at large ranks, whose (BLOCK_M + BLOCK_N)·R_PAD epilogue operands outgrow
# an A100 (64×64) or an RTX card (32×64): kept only where no regular tile fits (``prune_for_rank``).
SMALL_GEMM_TILES = SmallTiles((_gemm_config(64, 64, 32, 2, 8), _gemm_config(32, 64, 32, 2, 2)))


def gemm_configs() -> list[triton.Config]:
    """Tiles of the GEMM-shaped kernels (forward, dX) for Hopper/Ampere; the small ones also
    serve short inputs and large ranks; ``SMALL_GEMM_TILES`` last."""
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
    return [_gemm_config(*shape) for shape in shapes] + list(SMALL_GEMM_TILES.configs)


def epilogue_config(block_m: int, r_pad: int, element_size: int) -> triton.Config:
    """The untuned config of a GEMM launch with K = 0 (the cuBLAS composite's LoRA term: no main loop): ``BLOCK_N``
    as wide as its ``(BLOCK_M, R_PAD)`` and ``(R_PAD, BLOCK_N)`` operands fit an RTX card's shared memory."""
    smallest = min(SHARED_MEMORY_PER_BLOCK.values())
    block_n = next((bn for bn in (128, 64, 32) if (block_m + bn) * r_pad * element_size <= smallest), 16)
    return _gemm_config(block_m, block_n, 32, 2, 4)


def _element_size(named_args: dict, pointer: str) -> int:
    """Bytes per element of the tensor at ``pointer`` (2 when the arguments name none)."""
    data = named_args.get(pointer)
    return data.element_size() if isinstance(data, torch.Tensor) else 2


def gemm_shared_memory(config: triton.Config, element_size: int, r_pad: int, shared_limit: int) -> int:
    """:func:`.shared_memory.shared_memory_need` of a fused GEMM config: U and V tiles in the main loop, UP
    ``(BLOCK_M, R_PAD)`` and Q ``(R_PAD, BLOCK_N)`` in the epilogue."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return shared_memory_need(config, element_size, [(bm, bk), (bk, bn)], [(bm, r_pad), (r_pad, bn)], shared_limit)


def rank_suited(configs, named_args: dict) -> list[triton.Config]:
    """The GEMM tiles that suit the inputs' element size and rank without spilling registers on Hopper.

    4-byte inputs double the pipeline's shared memory and the registers of the operand tiles:
    they take BLOCK_K = 32 (the bytes per row of a 2-byte BLOCK_K = 64) and 8 warps from
    64×128 outputs up (and, from rank 64, 64×128 tiles at most); 2-byte inputs take 4 warps up
    to 128×128, 8 at 128×128 when the GEMM draws a dropout mask. Large ranks add (BLOCK_M,
    R_PAD) operands: 128×128 outputs at most from rank 128.
    """
    r_pad = named_args.get("R_PAD", 16)
    element_size = _element_size(named_args, "u_ptr")

    def suits(config):
        kw = config.kwargs
        area = kw["BLOCK_M"] * kw["BLOCK_N"]
        if r_pad >= 128 and area > 128 * 128:
            return False
        if element_size == 4:
            if r_pad >= 64:  # the (BLOCK_M, R_PAD)·(R_PAD, BLOCK_N) start of the accumulator
                return kw["BLOCK_K"] == 32 and area <= 64 * 128 and config.num_warps == 8
            return kw["BLOCK_K"] == 32 and (area < 64 * 128 or config.num_warps == 8)
        if area == 128 * 128 and named_args.get("DROPOUT", False):  # mask drawn beside the accumulator
            return config.num_warps == 8
        return config.num_warps == 4 or area > 128 * 128

    return [c for c in configs if suits(c)]


def snug_tiles(configs, named_args: dict) -> list[triton.Config]:
    """``configs`` without tiles far wider than the problem (they only idle threads) when smaller ones remain:
    BLOCK_M beyond the token bucket ``M_BUCKET``, BLOCK_N beyond N (64 always allowed)."""
    m_bucket, n = named_args.get("M_BUCKET"), named_args.get("N")
    snug = [
        c
        for c in configs
        if (m_bucket is None or c.kwargs["BLOCK_M"] <= max(64, m_bucket))
        and (n is None or c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n)))
    ]
    return snug or list(configs)


def prune_for_rank(configs, named_args, shared_limit=DEFAULT_SHARED_MEMORY, **kwargs):
    """The fused GEMM's prune: the :func:`rank_suited` tiles whose shared memory (:func:`gemm_shared_memory`)
    fits ``shared_limit``, else the ``SMALL_GEMM_TILES`` that fit, then :func:`snug_tiles`
    (``bench/kernel_report.py --arch`` checks every kept config offline)."""
    named_args = {**named_args, **kwargs}
    r_pad = named_args.get("R_PAD", 16)
    element_size = _element_size(named_args, "u_ptr")
    regular, small = SMALL_GEMM_TILES.split(configs)

    def need(config):
        return gemm_shared_memory(config, element_size, r_pad, shared_limit)

    return snug_tiles(fitting(rank_suited(regular, named_args), small, need, shared_limit), named_args)


def skinny_prune(pointer: str, width: str, small: SmallTiles, loop_tiles):
    """A prune ``(configs, named_args, shared_limit)`` for the skinny kernels (rank-R projections, weight
    gradients): with 4-byte data at ``pointer`` only ``BLOCK_M × width`` tiles up to 64×64 (the bytes of a 2-byte
    64×128 tile); then those whose main loop's tiles, ``loop_tiles(config.kwargs, R_PAD)``, fit ``shared_limit``,
    else the ``small`` tiles that fit."""

    def prune(configs, named_args, shared_limit=DEFAULT_SHARED_MEMORY):
        element_size = _element_size(named_args, pointer)
        r_pad = named_args.get("R_PAD", 16)
        regular, small_ones = small.split(configs)
        if element_size == 4:
            regular = [c for c in regular if c.kwargs["BLOCK_M"] <= 64 and c.kwargs[width] <= 64]

        def need(config):
            return shared_memory_need(config, element_size, loop_tiles(config.kwargs, r_pad), [], shared_limit)

        return fitting(regular, small_ones, need, shared_limit)

    return prune


def projection_tiles(kw: dict, r_pad: int) -> list[tuple[int, int]]:
    """The main loop's tiles of ``drop(x)·Aᵀ``: x ``(BLOCK_M, BLOCK_K)`` and Aᵀ ``(BLOCK_K, R_PAD)``."""
    return [(kw["BLOCK_M"], kw["BLOCK_K"]), (kw["BLOCK_K"], r_pad)]


def weight_grad_tiles(kw: dict, r_pad: int) -> list[tuple[int, int]]:
    """The main loop's tiles of ``Uᵀ·V``: U ``(BLOCK_M, BLOCK_P)`` and V ``(BLOCK_M, R_PAD)``."""
    return [(kw["BLOCK_M"], kw["BLOCK_P"]), (kw["BLOCK_M"], r_pad)]


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
