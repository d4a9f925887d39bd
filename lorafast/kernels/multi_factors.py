"""A mixed-adapter call's K adapters as the kernels read them: a device table of the adapters' own factors
(their data pointers, strides and ranks, as vLLM's ``lora_a_ptr``/``lora_b_ptr``), never a stacked copy.

Row k of the factor table ``(K, 8)`` int64 (strides in elements)::

    [A_k ptr, A_k stride over r, A_k stride over in, B_k ptr, B_k stride over r, B_k stride over out, r_k, 0]

A kernel reads factor f of adapter k (``A_COL`` or ``B_COL``) at ``(feature, r)`` as
``ptr + feature·stride_feature + r·stride_r`` for r < r_k. The table holds only these numbers, so it is kept per
set of factors (one per layer in practice) and rebuilt on the host only when a pointer, stride or shape changes, a
host-side check with no device sync. Writes into the factors (optimizer steps, ``.data.copy_``, ``load_state_dict``)
are read by the next call; a new storage (``param.data = t``, ``.to()``) gives a new table.

The weight gradients of the K adapters are written into one flat buffer, adapter k's ``(r_k, in)`` (dA) or
``(out, r_k)`` (dB) at its own offset, no padding (:func:`grad_layout`, :func:`split_grads`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

A_COL, B_COL = 0, 3  # a factor's columns in a table row: pointer, stride over r, stride over the features
RANK_COL = 6
TABLE_WIDTH = 8
_A_COL = tl.constexpr(A_COL)
_TABLE_WIDTH = tl.constexpr(TABLE_WIDTH)

_MAX_TABLES = 4096  # tables kept (a few per layer: each distinct set of factors and each gradient layout)
_tables: dict[tuple, torch.Tensor] = {}
_tables_lock = threading.Lock()


class AdapterFactors(NamedTuple):
    """The K adapters of a call: their factors (kept referenced while the kernels read them) and the table."""

    a_factors: tuple[torch.Tensor, ...]  # K A's (r_k, in)
    b_factors: tuple[torch.Tensor, ...]  # K B's (out, r_k)
    table: torch.Tensor  # (K, TABLE_WIDTH) int64 on the factors' device
    rank: int  # max r_k: the width of xa and g
    unit_stride: bool  # every factor contiguous: the kernels take A's stride over in and B's over r as 1
    aligned: bool  # and every pointer 16-byte aligned: the kernels are told so

    @property
    def num_adapters(self) -> int:
        return len(self.a_factors)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(a.shape[0] for a in self.a_factors)

    @property
    def equal_ranks(self) -> bool:
        return all(a.shape[0] == self.rank for a in self.a_factors)

    @property
    def dtype(self) -> torch.dtype:
        return self.a_factors[0].dtype


def _device_table(values: list[int], shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 tensor of ``shape`` on ``device``, copied without waiting for its stream."""
    host = torch.tensor(values, dtype=torch.int64).view(shape)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _kept(key: tuple, build) -> torch.Tensor:
    table = _tables.get(key)
    if table is None:
        table = build()
        with _tables_lock:
            if len(_tables) >= _MAX_TABLES:
                _tables.pop(next(iter(_tables)))
            _tables[key] = table
    return table


def adapter_factors(lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor]) -> AdapterFactors:
    """:class:`AdapterFactors` of K A's ``(r_k, in)`` and B's ``(out, r_k)`` (unchecked; any strides), its table
    kept while the factors' pointers, strides and shapes stay the same."""
    lora_A, lora_B = tuple(lora_A), tuple(lora_B)
    device = lora_A[0].device
    key = ("factors", device)
    key += tuple((a.data_ptr(), a.stride(), a.shape, b.data_ptr(), b.stride()) for a, b in zip(lora_A, lora_B))

    def build():
        values = []
        for a, b in zip(lora_A, lora_B):
            values += [a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), b.stride(1), b.stride(0), a.shape[0], 0]
        return _device_table(values, (len(lora_A), TABLE_WIDTH), device)

    contiguous = all(a.is_contiguous() and b.is_contiguous() for a, b in zip(lora_A, lora_B))
    # what Triton's argument specialisation would have assumed of pointer and stride arguments
    aligned = contiguous and all(t.data_ptr() % 16 == 0 for pair in zip(lora_A, lora_B) for t in pair)
    rank = max(a.shape[0] for a in lora_A)
    return AdapterFactors(lora_A, lora_B, _kept(key, build), rank, contiguous, aligned)


def stacked_factors(lora_A: torch.Tensor, lora_B: torch.Tensor) -> AdapterFactors:
    """:func:`adapter_factors` of stacked ``(K, R, in)`` and ``(K, out, R)`` tensors (each adapter of rank R; views)."""
    return adapter_factors(lora_A.unbind(0), lora_B.unbind(0))


@triton.jit
def factor_pointer(
    table, adapter, COL: tl.constexpr, like, in_features, rank, UNIT_STRIDE: tl.constexpr, ALIGNED: tl.constexpr
):
    """``(pointer, stride over r, stride over the features)`` of factor ``COL`` (pointing to ``like``'s element type)
    of ``adapter`` (int32) in the factor table at ``table``. With ``UNIT_STRIDE`` (contiguous factors) the strides
    are those of contiguous rows, from ``in_features`` and the adapter's ``rank`` (kernel arguments where they can
    be: the compiler sees the factor as it would a pointer argument); with ``ALIGNED`` the pointer is 16-byte
    aligned."""
    pointer = tl.load(table + adapter * _TABLE_WIDTH + COL).to(tl.pointer_type(like.dtype.element_ty))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    if UNIT_STRIDE:
        if COL == _A_COL:  # A (r, in)
            return pointer, in_features, 1
        else:  # B (out, r)
            return pointer, 1, rank
    else:  # int32 (a factor holds < 2**31 elements), as stride arguments are: the offset tiles stay 32-bit
        entry = table + adapter * _TABLE_WIDTH + COL
        return pointer, tl.load(entry + 1).to(tl.int32), tl.load(entry + 2).to(tl.int32)


def grad_layout(ranks: Sequence[int], features: int, device: torch.device) -> torch.Tensor:
    """``(K, 2)`` int64 on ``device``: adapter k's offset in the flat gradient buffer and r_k (kept per shape)."""
    ranks = tuple(ranks)

    def build():
        values, offset = [], 0
        for r in ranks:
            values += [offset, r]
            offset += r * features
        return _device_table(values, (len(ranks), 2), device)

    return _kept(("grads", device, ranks, features), build)


def split_grads(flat: torch.Tensor, ranks: Sequence[int], features: int, transpose: bool) -> tuple[torch.Tensor, ...]:
    """Adapter k's gradient in the flat buffer: ``(r_k, features)`` with ``transpose`` (dA), else
    ``(features, r_k)`` (dB); views, no copy."""
    parts = flat.split([r * features for r in ranks])
    return tuple(p.view(r, features) if transpose else p.view(features, r) for p, r in zip(parts, ranks))
