"""Shared memory per block: what a GPU offers, what a config needs, and the prunes that keep what fits.

Every prune is a pure function ``prune(configs, named_args, shared_limit)`` of the launch's arguments and the GPU's
shared memory per block (bytes); :func:`on_device` turns one into the autotuner's ``early_config_prune`` by asking
Triton's driver for the limit of the GPU the launch's tensors are on. A kernel's config list ends with its
small-smem tiles (``SmallTiles``): kept only when none of its regular tiles fits, so the big tiles stay the
choice wherever they fit (Hopper) and a GPU with less shared memory (an RTX card: 99 KiB) still gets one that fits.
When none fits at all the prune raises Triton's ``OutOfResources`` before anything runs.
``bench/kernel_report.py --arch`` compiles every kept config offline for each architecture below and checks it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch
import triton
from triton.runtime.errors import OutOfResources

# Opt-in shared memory per block (bytes) of the architectures every launch keeps a config for.
SHARED_MEMORY_PER_BLOCK = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024}
# The limit the prunes assume for CPU tensors (tests, the interpreter), where no GPU can be asked: an H100's.
DEFAULT_SHARED_MEMORY = SHARED_MEMORY_PER_BLOCK["sm_90"]
# Above an A100's shared memory (Hopper, Blackwell) wgmma-style kernels keep the main loop's operand buffers and the
# epilogue's apart; below it the mma kernels reuse the loop's buffers for the epilogue (measured offline).
_SEPARATE_EPILOGUE_ABOVE = SHARED_MEMORY_PER_BLOCK["sm_80"]

Tile = tuple[int, int]  # (rows, columns) of an operand tile, in elements


@functools.cache
def device_shared_memory(index: int) -> int:
    """Opt-in shared memory per block (bytes) of GPU ``index``, as Triton's driver reports it."""
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def shared_memory_limit(named_args: dict) -> int:
    """The shared memory per block of the GPU holding the launch's first CUDA tensor (``DEFAULT_SHARED_MEMORY``
    when there is none: CPU tensors)."""
    for value in named_args.values():
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            index = value.device.index if value.device.index is not None else torch.cuda.current_device()
            return device_shared_memory(index)
    return DEFAULT_SHARED_MEMORY


def shared_memory_need(
    config: triton.Config, element_size: int, loop: Sequence[Tile], epilogue: Sequence[Tile], shared_limit: int
) -> int:
    """An upper bound of the shared memory (bytes) of ``config``: ``num_stages`` buffers of each operand tile the
    main loop loads for ``tl.dot`` (``loop``) and one of each operand of the epilogue's dot (``epilogue``), beside
    the loop's buffers on GPUs above an A100's shared memory, in their place below it."""
    in_loop = config.num_stages * sum(rows * cols for rows, cols in loop) * element_size
    in_epilogue = sum(rows * cols for rows, cols in epilogue) * element_size
    if shared_limit > _SEPARATE_EPILOGUE_ABOVE:
        return in_loop + in_epilogue
    return max(in_loop, in_epilogue)


def config_key(config: triton.Config) -> tuple:
    """What tells two configs apart: ``(kwargs, num_warps, num_stages)``."""
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


@dataclasses.dataclass(frozen=True)
class SmallTiles:
    """A kernel's small-smem tiles, appended to its config list and kept only where no regular tile fits."""

    configs: tuple[triton.Config, ...]

    def __contains__(self, config: triton.Config) -> bool:
        return config_key(config) in {config_key(c) for c in self.configs}

    def split(self, configs: Sequence[triton.Config]) -> tuple[list[triton.Config], list[triton.Config]]:
        """``(regular, small)`` of ``configs``."""
        return [c for c in configs if c not in self], [c for c in configs if c in self]


def fitting(
    regular: Sequence[triton.Config],
    small: Sequence[triton.Config],
    need: Callable[[triton.Config], int],
    shared_limit: int,
) -> list[triton.Config]:
    """The ``regular`` configs whose ``need`` fits ``shared_limit``, else the ``small`` ones that fit; raises
    ``OutOfResources`` (before any launch) when none does."""
    for candidates in (regular, small):
        kept = [c for c in candidates if need(c) <= shared_limit]
        if kept:
            return kept
    smallest = min((need(c) for c in [*regular, *small]), default=0)
    raise OutOfResources(smallest, shared_limit, "shared memory")


def on_device(prune: Callable[[list, dict, int], list]) -> Callable[..., list]:
    """The autotuner's ``early_config_prune`` running ``prune(configs, named_args, shared_limit)`` with the
    launch's GPU's limit (``prune`` itself stays reachable as ``.prune``)."""

    def early_config_prune(configs, named_args, **kwargs):
        named_args = {**named_args, **kwargs}
        return prune(configs, named_args, shared_memory_limit(named_args))

    early_config_prune.prune = prune
    return early_config_prune
