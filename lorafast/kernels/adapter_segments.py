"""The rows of a mixed-adapter batch grouped by adapter, for the segment kernels (SGMV style).

Built on the device from ``row_adapter`` ``(n,)`` (any order; ids outside [-1, K) count as −1, unchecked) with
no host synchronisation, so every size follows from n, K and BLOCK_M alone:

- ``order`` ``(n,)``: row numbers stably sorted by adapter, −1 rows first; adapter k's rows are
  ``order[bounds[k]:bounds[k + 1]]`` (``bounds`` ``(K + 1,)``).
- the GEMM kernels' block table: each segment (−1 included) padded to a multiple of BLOCK_M rows, cut into
  one-adapter blocks. ``block_adapter`` ``(num_blocks,)`` (−1: base only, ``UNUSED_BLOCK``: past the end),
  ``block_rows`` ``(num_blocks · BLOCK_M,)`` (−1: padding); ``num_blocks = cdiv(n, BLOCK_M) + K + 1`` bounds the
  blocks used (each segment pads less than one block) and surplus programs exit at once.
- the weight-gradient reductions' chunk table (:class:`RowChunks`): each adapter's segment cut into chunks of
  ``chunk_rows`` (−1 rows in none), so one adapter holding most rows still fills the GPU;
  ``num_chunks = cdiv(n, chunk_rows) + K``.

Per-adapter ``dropout`` ``(K,)`` float32 (p_k in [0, 1)): :func:`check_dropout` checks shape, dtype and device
only (its values stay on the device); each kernel loads ``dropout[k]`` for its block's adapter.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
import triton

from .launch import check_device

UNUSED_BLOCK = -2
# Rows per block of the GEMM-shaped kernels (multi_lora_matmul, multi_dropout_xa): their tables' block_m.
BLOCK_M = 64


class RowChunks(NamedTuple):
    """Chunk j of adapter k = ``chunk_adapter[j]`` (``UNUSED_BLOCK`` past the last) holds ``order[start:end]``,
    ``start = bounds[k] + (j − chunk_bounds[k])·chunk_rows``, ``end = min(start + chunk_rows, bounds[k + 1])``;
    adapter k's chunks are ``chunk_bounds[k]..chunk_bounds[k + 1] − 1``, in row order.
    """

    chunk_adapter: torch.Tensor  # (num_chunks,) int32
    chunk_bounds: torch.Tensor  # (K + 1,) int64
    chunk_rows: int

    @property
    def num_chunks(self) -> int:
        """Chunks of the table (an upper bound of the chunks in use)."""
        return self.chunk_adapter.shape[0]


class AdapterSegments(NamedTuple):
    """Rows sorted by adapter, the block table and the chunk table over them (see the module docstring)."""

    order: torch.Tensor  # (n,) int64
    bounds: torch.Tensor  # (K + 1,) int64
    block_adapter: torch.Tensor  # (num_blocks,) int32
    block_rows: torch.Tensor  # (num_blocks * block_m,) int32
    block_m: int
    chunks: RowChunks

    @property
    def num_blocks(self) -> int:
        """Row blocks of the table (an upper bound of the blocks in use)."""
        return self.block_adapter.shape[0]


def num_row_blocks(n: int, num_adapters: int, block_m: int) -> int:
    """Blocks of ``block_m`` rows that hold n rows of K adapters and the base, each segment padded."""
    return triton.cdiv(n, block_m) + num_adapters + 1


def default_chunk_rows(n: int) -> int:
    """Rows per chunk of the weight-gradient reductions for n rows: 256, more past 16,384 rows (at most ~64 chunks)."""
    return max(256, triton.cdiv(triton.cdiv(n, 64), 256) * 256)


def num_row_chunks(n: int, num_adapters: int, chunk_rows: int) -> int:
    """Chunks of ``chunk_rows`` that hold the rows of K adapters, each segment padded (the −1 rows in none)."""
    return triton.cdiv(n, chunk_rows) + num_adapters


def row_chunks(bounds: torch.Tensor, n: int, chunk_rows: int) -> RowChunks:
    """The chunk table of segments ``bounds`` ``(K + 1,)`` (of :func:`adapter_segments`) for n rows, on the device."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be at least 1")
    num_adapters = bounds.shape[0] - 1
    chunks = (bounds[1:] - bounds[:-1] + chunk_rows - 1) // chunk_rows  # (K,) chunks per adapter
    chunk_bounds = torch.cat([chunks.new_zeros(1), torch.cumsum(chunks, 0)])
    chunk = torch.arange(num_row_chunks(n, num_adapters, chunk_rows), device=bounds.device)
    adapter = torch.searchsorted(chunk_bounds[1:], chunk, right=True)  # K past the last chunk
    chunk_adapter = torch.where(adapter < num_adapters, adapter, UNUSED_BLOCK)
    return RowChunks(chunk_adapter.to(torch.int32), chunk_bounds, chunk_rows)


def adapter_segments(
    row_adapter: torch.Tensor, num_adapters: int, block_m: int, chunk_rows: int | None = None
) -> AdapterSegments:
    """:class:`AdapterSegments` of ``row_adapter`` ``(n,)`` ids in [-1, K), on its device: ``block_m`` rows a GEMM
    block, ``chunk_rows`` a reduction chunk (None: :func:`default_chunk_rows`)."""
    if row_adapter.dim() != 1 or row_adapter.dtype.is_floating_point or row_adapter.dtype == torch.bool:
        raise ValueError(
            f"row_adapter must be a 1-D integer tensor, got {row_adapter.dtype} of shape {tuple(row_adapter.shape)}"
        )
    if num_adapters < 1 or block_m < 1:
        raise ValueError(f"need at least one adapter and one row per block, got K={num_adapters}, block_m={block_m}")
    device = row_adapter.device
    n = row_adapter.shape[0]
    # Segment g holds the rows of adapter g - 1: segment 0 is the base-only rows.
    valid = (row_adapter >= 0) & (row_adapter < num_adapters)
    segment = torch.where(valid, row_adapter.long() + 1, 0)
    sorted_segment, order = torch.sort(segment, stable=True)
    edges = torch.searchsorted(sorted_segment, torch.arange(num_adapters + 2, device=device))  # (K + 2,)

    blocks = (edges[1:] - edges[:-1] + block_m - 1) // block_m  # (K + 1,) blocks per segment
    blocks_end = torch.cumsum(blocks, 0)
    num_blocks = num_row_blocks(n, num_adapters, block_m)
    block = torch.arange(num_blocks, device=device)
    block_segment = torch.searchsorted(blocks_end, block, right=True)  # K + 1 past the last segment
    used = block_segment <= num_adapters
    seg = block_segment.clamp(max=num_adapters)
    first = edges[seg] + (block - (blocks_end[seg] - blocks[seg])) * block_m  # position in order of its first row
    position = first[:, None] + torch.arange(block_m, device=device)
    in_segment = used[:, None] & (position < edges[seg + 1][:, None])
    order_padded = torch.cat([order, order.new_full((1,), -1)])  # index n reads the padding sentinel
    block_rows = torch.where(in_segment, order_padded[position.clamp(max=n)], -1)
    block_adapter = torch.where(used, block_segment - 1, UNUSED_BLOCK)
    bounds = edges[1:].contiguous()
    return AdapterSegments(
        order=order,
        bounds=bounds,
        block_adapter=block_adapter.to(torch.int32),
        block_rows=block_rows.reshape(-1).to(torch.int32),
        block_m=block_m,
        chunks=row_chunks(bounds, n, default_chunk_rows(n) if chunk_rows is None else chunk_rows),
    )


def check_segments(segments: AdapterSegments, n: int, num_adapters: int, device: torch.device) -> None:
    """Raise ValueError unless ``segments`` were built for n rows and K adapters on ``device``."""
    num_blocks = num_row_blocks(n, num_adapters, segments.block_m)
    chunks = segments.chunks
    expected = {
        "order": (segments.order, (n,)),
        "bounds": (segments.bounds, (num_adapters + 1,)),
        "block_adapter": (segments.block_adapter, (num_blocks,)),
        "block_rows": (segments.block_rows, (num_blocks * segments.block_m,)),
        "chunks.chunk_adapter": (chunks.chunk_adapter, (num_row_chunks(n, num_adapters, chunks.chunk_rows),)),
        "chunks.chunk_bounds": (chunks.chunk_bounds, (num_adapters + 1,)),
    }
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(
                f"segments.{name} has shape {tuple(t.shape)}, expected a contiguous {shape}: segments built for "
                f"another batch (n={n}, K={num_adapters})?"
            )
        if t.device != device:
            raise ValueError(f"segments.{name} is on {t.device} but the input is on {device}")


def resolve_segments(
    segments: AdapterSegments | None,
    row_adapter: torch.Tensor,
    num_adapters: int,
    n: int,
    device: torch.device,
    config: triton.Config | None,
) -> AdapterSegments:
    """The block table of the GEMM-shaped kernels (``BLOCK_M`` rows a block): ``segments`` checked, or built."""
    if config is not None and config.kwargs.get("BLOCK_M") != BLOCK_M:
        raise ValueError(f"config has BLOCK_M={config.kwargs.get('BLOCK_M')}; the block table needs {BLOCK_M}")
    if segments is None:
        return adapter_segments(row_adapter, num_adapters, BLOCK_M)
    if segments.block_m != BLOCK_M:
        raise ValueError(f"segments were built for block_m={segments.block_m}; this kernel needs {BLOCK_M}")
    check_segments(segments, n, num_adapters, device)
    return segments


def check_row_ids(row_adapter: torch.Tensor, scalings: torch.Tensor, n: int, like: torch.Tensor) -> int:
    """Raise ValueError unless row_adapter is ``(n,)`` integer and scalings ``(K,)`` float32; returns K."""
    check_ids(row_adapter, n, like)
    if scalings.dim() != 1 or scalings.shape[0] < 1:
        raise ValueError(f"scalings must be a (K,) tensor with K >= 1, got shape {tuple(scalings.shape)}")
    if scalings.dtype != torch.float32:
        raise ValueError(f"scalings is {scalings.dtype}; the kernels read torch.float32 scalings")
    check_device("scalings", scalings.device)
    if scalings.device != like.device:
        raise ValueError(f"scalings is on {scalings.device} but the input is on {like.device}")
    return scalings.shape[0]


def check_ids(row_adapter: torch.Tensor, n: int, like: torch.Tensor) -> None:
    """Raise ValueError unless row_adapter is an ``(n,)`` int64 / int32 tensor on like's device."""
    if row_adapter.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"row_adapter is {row_adapter.dtype}; the ids must be torch.int64 or torch.int32")
    if tuple(row_adapter.shape) != (n,):
        raise ValueError(f"row_adapter has shape {tuple(row_adapter.shape)}, expected one id per row: ({n},)")
    check_device("row_adapter", row_adapter.device)
    if row_adapter.device != like.device:
        raise ValueError(f"row_adapter is on {row_adapter.device} but the input is on {like.device}")


def check_dropout(dropout: torch.Tensor | None, seed: int, num_adapters: int, like: torch.Tensor) -> None:
    """ValueError unless ``dropout`` is None or ``(K,)`` float32 on like's device (values unchecked), seed an int."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be a non-negative Python int (lorafast.dropout.draw_seed()), got {seed!r}")
    if dropout is None:
        return
    if not isinstance(dropout, torch.Tensor):
        raise ValueError(
            f"dropout must be None or a ({num_adapters},) torch.float32 tensor, got {type(dropout).__name__}"
        )
    if tuple(dropout.shape) != (num_adapters,):
        raise ValueError(
            f"dropout has shape {tuple(dropout.shape)}, expected one drop probability per adapter: ({num_adapters},)"
        )
    if dropout.dtype != torch.float32:
        raise ValueError(f"dropout is {dropout.dtype}; the kernels read torch.float32 drop probabilities")
    if dropout.device != like.device:
        raise ValueError(f"dropout is on {dropout.device} but the input is on {like.device}")
