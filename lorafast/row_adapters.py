"""Which adapter each sequence of a batch uses, scoped to the call rather than stored on the layers.

:func:`lorafast.adapter_ids` puts a :class:`RowAdapters` in a ``ContextVar`` for its ``with`` block: each thread
and asyncio task sees only its own block's ids, none left behind after it, even on an exception; a layer reads
the innermost (:func:`active_row_adapters`). Ids are checked once on the host; their device copy, per-row ids
per input size and ``AdapterSegments`` are made on first use and shared by every layer and by backward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar

import torch

# Row tables kept per block: one per distinct input row count (encoder, decoder, ...).
_MAX_CACHED_ROW_COUNTS = 8

_ACTIVE: ContextVar[tuple[tuple[frozenset[int], RowAdapters], ...]] = ContextVar("lorafast_row_adapters", default=())


class RowAdapters:
    """One batch's adapter ids: ``ids`` ``(b,)`` int64 on the CPU (−1: none), into ``names`` as they were then.

    A layer whose adapters no longer start with ``names`` refuses them. ValueError unless 1-D ints in [-1, K).
    """

    def __init__(self, ids: torch.Tensor, names: Sequence[str]):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype.is_floating_point or ids.is_complex():
            raise ValueError(f"adapter ids must be a 1-D integer tensor, one per sequence, got {ids!r:.80}")
        if ids.dtype == torch.bool:
            raise ValueError("adapter ids must be integers, got a bool tensor")
        if ids.numel() == 0:
            raise ValueError("adapter ids are empty: give one id per sequence of the batch (None or -1: no adapter)")
        host = ids.detach().to("cpu", torch.int64)  # the one host copy of the ids; range checks run on it
        low, high = int(host.min()), int(host.max())
        if low < -1 or high >= len(names):
            bad = low if low < -1 else high
            raise ValueError(
                f"adapter id {bad} is out of range: ids must be in [-1, {len(names)}) for adapters {list(names)} "
                "(−1: no adapter)"
            )
        self.ids = host
        self.names = tuple(names)
        self._on_device: dict[torch.device, torch.Tensor] = {}
        self._rows: dict[tuple[torch.device, int], torch.Tensor] = {}
        self._tables: dict[tuple, object] = {}

    def __len__(self) -> int:
        return self.ids.shape[0]

    def check_adapters(self, names: Sequence[str]) -> None:
        """Raise ValueError unless the adapters ``names`` still start with the ones the ids refer to."""
        if tuple(names[: len(self.names)]) == self.names:
            return
        removed = [n for n in self.names if n not in names]
        what = f"adapter(s) {removed} were removed" if removed else "the adapters were reordered"
        raise ValueError(
            f"{what} after the adapter ids were set (they refer to {list(self.names)}, the layer now has "
            f"{list(names)}): set the ids again, e.g. in a new lorafast.adapter_ids block"
        )

    def rows(self, x_shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """``(n,)`` int64 on ``device``, each row's adapter for x ``x_shape`` ``(..., in)``.

        x's first dimension is b or m·b (beam search: m rows per sequence); ValueError if not a multiple of b.
        """
        count = len(self)
        if len(x_shape) < 2 or x_shape[0] % count != 0:
            raise ValueError(
                f"{count} adapter ids do not fit an input of shape {tuple(x_shape)}: its first dimension "
                "must be the number of ids (or a multiple of it, e.g. beams)"
            )
        n = math.prod(x_shape[:-1])
        key = (torch.device(device), n)
        rows = self._rows.get(key)
        if rows is None:
            rows = self._device_ids(key[0]).view(count, 1).expand(count, n // count).reshape(-1)
            self._remember(self._rows, key, rows)
        return rows

    def table(self, key: tuple, build: Callable[[], object]) -> object:
        """``build()``'s result for ``key`` (e.g. the row count, K and device), built once per block."""
        table = self._tables.get(key)
        if table is None:
            table = build()
            self._remember(self._tables, key, table)
        return table

    def _device_ids(self, device: torch.device) -> torch.Tensor:
        ids = self._on_device.get(device)
        if ids is None:
            if device.type == "cuda":  # from pinned memory, so that the copy does not wait for the stream
                ids = self.ids.pin_memory().to(device, non_blocking=True)
            else:
                ids = self.ids.to(device)
            self._on_device[device] = ids
        return ids

    @staticmethod
    def _remember(cache: dict, key, value) -> None:
        if len(cache) >= _MAX_CACHED_ROW_COUNTS:
            cache.pop(next(iter(cache)))
        cache[key] = value


@contextlib.contextmanager
def scoped_row_adapters(layers: Iterable[torch.nn.Module], row_adapters: RowAdapters):
    """Within the block (this thread or asyncio task only), ``layers`` use ``row_adapters``."""
    token = _ACTIVE.set((*_ACTIVE.get(), (frozenset(map(id, layers)), row_adapters)))
    try:
        yield row_adapters
    finally:
        _ACTIVE.reset(token)


def active_row_adapters(layer: torch.nn.Module) -> RowAdapters | None:
    """The ids of the innermost ``adapter_ids`` block of this context that covers ``layer``, or None."""
    for layers, row_adapters in reversed(_ACTIVE.get()):
        if id(layer) in layers:
            return row_adapters
    return None
