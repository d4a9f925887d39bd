"""Seeded dropout masks for the PyTorch path, regenerated in backward instead of stored.

A mask is a pure function of the seed and the input's shape: rows are drawn in order from
the seed's stream, a fixed number of draws per row, so forward and backward regenerate the
same mask one row block at a time, without ever holding the whole mask.

On CPU the bits come from NumPy's SFC64, four 16-bit lanes per 64-bit draw: several times
faster than one float per element from torch's generator. (A second stream on a helper
thread was slower: torch's OpenMP workers keep spinning on the cores between ops.) On
other devices they come from a seeded ``torch.Generator`` there.
Testing 16-bit lanes quantises the drop probability to a multiple of 1/65536 (``p=0.1``
drops with probability 6554/65536 = 0.1000061). The Triton kernels use Triton's Philox
instead; ``lorafast.kernels.dropout_keep_mask`` regenerates those.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch._library.effects import EffectType

_LANES_PER_DRAW = 4  # 16-bit lanes in one 64-bit draw
_LANE_LEVELS = 1 << 16


def run_eagerly(fn: Callable) -> Callable:
    """``fn`` that torch.compile runs eagerly, as ``torch.compiler.disable(fn)`` would (a graph break).

    Only the direct entry points :func:`draw_seed` and :meth:`MaskStream.next_rows` use it; the layers'
    compiled code draws seeds and masks in the graph (:func:`dropout_seed`, :func:`keep_blocks`).

    ``torch.compiler.disable`` imports ``torch._dynamo`` (seconds) when it decorates; here it is
    applied only while torch.compile traces a call, by which time torch.compile has imported it.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def _seed_tensor() -> torch.Tensor:
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


@run_eagerly  # compiled code would draw from Inductor's own generator instead
def draw_seed() -> int:
    """Draw a dropout seed from torch's default CPU generator.

    ``torch.manual_seed`` therefore makes a run's dropout masks reproducible, compiled or not.
    Under torch.compile this breaks the graph; the layers draw through :func:`dropout_seed`.
    """
    return int(_seed_tensor().item())


# The draw as an operator, so torch.compile keeps it in its graph as an opaque node that draws
# from torch's default generator at run time (a traced randint would draw from Inductor's own).
# Registered as an ordered effect: the compiler never merges two draws, drops or reorders one.
@torch.library.custom_op("lorafast::draw_seed", mutates_args=())
def _draw_seed_op() -> torch.Tensor:
    return _seed_tensor()


@_draw_seed_op.register_fake
def _():
    return torch.empty((), dtype=torch.int64)


_draw_seed_op.register_effect(EffectType.ORDERED)


def dropout_seed() -> int | torch.Tensor:
    """A dropout seed for a call on either backend, drawn as :func:`draw_seed` draws it (same value).

    Under torch.compile it is a 0-d int64 CPU tensor from the operator ``lorafast::draw_seed`` (no graph
    break): the Triton kernel operators read it on the host (no device sync), the PyTorch path hands it
    to ``lorafast::keep_mask`` (:func:`keep_blocks`). Elsewhere a Python int.
    """
    if torch.compiler.is_compiling():
        return _draw_seed_op()
    return draw_seed()


def _drop_threshold(p: float) -> int:
    """Signed 16-bit threshold: a lane ``v`` (uniform on [-32768, 32767]) is kept iff ``v >= t``."""
    return round(p * _LANE_LEVELS) - _LANE_LEVELS // 2


class MaskStream:
    """Yields the keep masks of consecutive row blocks of a ``(rows, cols)`` input.

    Args:
        seed: dropout seed, from :func:`draw_seed`.
        cols: row length (``in_features``).
        p: drop probability, in (0, 1).
        device: device the masks are made on.
    """

    def __init__(self, seed: int, cols: int, p: float, device: torch.device):
        self.cols = cols
        self.device = torch.device(device)
        self.threshold = _drop_threshold(p)
        self._lanes_per_row = -(-cols // _LANES_PER_DRAW) * _LANES_PER_DRAW
        if self.device.type == "cpu":
            self._bits = np.random.SFC64(seed)
        else:
            self._gen = torch.Generator(device=self.device)
            self._gen.manual_seed(seed)

    # NumPy bit-casts confuse torch.compile's NumPy tracing; the draw runs eagerly instead.
    @run_eagerly
    def _lanes(self, rows: int) -> torch.Tensor:
        """Random int16 lanes, uniform on [-32768, 32767], for the next ``rows`` rows: ``(rows, cols)``."""
        if self.device.type == "cpu":
            draws = self._bits.random_raw(rows * self._lanes_per_row // _LANES_PER_DRAW)
            lanes = torch.from_numpy(draws.view(np.int16)).view(rows, self._lanes_per_row)
        else:
            lanes = torch.empty(rows, self._lanes_per_row, dtype=torch.int16, device=self.device)
            lanes.random_(-(2**15), 2**15, generator=self._gen)
        return lanes[:, : self.cols]

    def next_rows(
        self, rows: int, out: torch.Tensor | None = None, threshold: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Keep mask of the next ``rows`` rows, ``(rows, cols)``: 1 where kept, 0 where dropped.

        Bool, or written into ``out`` (any dtype; a float mask in x's dtype multiplies fastest).
        ``threshold`` ``(rows, 1)`` replaces the stream's own per row (rows with different p).
        """
        threshold = self.threshold if threshold is None else threshold
        if out is None:
            return self._lanes(rows) >= threshold
        return torch.ge(self._lanes(rows), threshold, out=out)


def row_blocks(rows: int, cols: int, elements_per_block: int = 1 << 20, multiple: int = 8) -> Iterator[slice]:
    """Split ``rows`` into consecutive blocks of about ``elements_per_block`` elements.

    Blocks that fit in the last-level cache keep the mask, the masked copy and the matmuls on
    them cache-resident; block lengths are multiples of ``multiple`` rows (but the last) so
    that a block splits evenly into row slabs.
    """
    step = max(multiple, elements_per_block // max(cols, 1) // multiple * multiple)
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def keep_blocks(
    seed: int | torch.Tensor,
    p: float | torch.Tensor,
    shape: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows, keep)`` for each row block of a ``(n, cols)`` input: keep is its 0/1 mask in
    ``dtype``, written into one reused buffer (valid until the next block is drawn).

    ``p`` is one drop probability, or one per row ``(n,)`` (float32): row i is then masked as
    ``keep_mask(seed, shape, p[i])`` masks it. ``seed``: an int, or the 0-d int64 CPU tensor that
    :func:`dropout_seed` gives under torch.compile; there the whole mask is one block, drawn by the
    operator ``lorafast::keep_mask`` (NumPy's generator cannot be traced), so compiled code holds one
    ``(n, cols)`` mask in ``dtype`` where eager code holds one cache-sized block.
    """
    if torch.compiler.is_compiling():
        seed = seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64)
        per_row = p if isinstance(p, torch.Tensor) else None
        yield slice(0, shape[0]), _keep_mask_op(seed, shape[0], shape[1], 0.5 if per_row is not None else p,
                                                per_row, dtype, torch.device(device))  # fmt: skip
        return
    yield from _keep_blocks(int(seed), p, shape, dtype, device)


def _keep_blocks(seed, p, shape, dtype, device):
    n, cols = shape
    per_row = isinstance(p, torch.Tensor)
    stream = MaskStream(seed, cols, 0.5 if per_row else p, device)
    if per_row:  # the same 16-bit threshold _drop_threshold gives each row's p
        thresholds = (p.float() * _LANE_LEVELS).round_().sub_(_LANE_LEVELS // 2).to(torch.int16).unsqueeze(1)
    buffer = None
    for rows in row_blocks(n, cols):
        count = rows.stop - rows.start
        if buffer is None:
            buffer = torch.empty(count, cols, dtype=dtype, device=device)
        yield rows, stream.next_rows(count, out=buffer[:count], threshold=thresholds[rows] if per_row else None)


# The PyTorch path's mask draw as an operator, so that torch.compile keeps it in its graph (fullgraph=True):
# a pure function of the seed tensor, drawn at run time by the same stream as eager code.
@torch.library.custom_op("lorafast::keep_mask", mutates_args=())
def _keep_mask_op(
    seed: torch.Tensor,
    rows: int,
    cols: int,
    p: float,
    row_p: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    mask = torch.empty(rows, cols, dtype=dtype, device=device)
    for block, keep in _keep_blocks(int(seed), p if row_p is None else row_p, (rows, cols), dtype, device):
        mask[block] = keep
    return mask


@_keep_mask_op.register_fake
def _(seed, rows, cols, p, row_p, dtype, device):
    return torch.empty(rows, cols, dtype=dtype, device=device)


def keep_mask(seed: int, shape: tuple[int, int], p: float, device="cpu") -> torch.Tensor:
    """The whole keep mask the PyTorch path uses for ``seed``: bool ``(rows, cols)``.

    For tests and debugging; the layer itself never materialises it.
    """
    rows, cols = shape
    stream = MaskStream(seed, cols, p, torch.device(device))
    return torch.cat([stream.next_rows(b.stop - b.start) for b in row_blocks(rows, cols)])
