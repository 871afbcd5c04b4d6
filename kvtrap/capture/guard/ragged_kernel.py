"""The device guard for ragged (CSR) KV index sets: ``kv_indptr`` / ``kv_indices`` as the triton backend reads them.

A ragged set gives request ``r`` the ids ``indices[indptr[r] : indptr[r + 1]]`` (token slots of the pool a
layer reads; the kernels split them into page and offset). The guard checks every live id against
``[0, bound)`` (``bound``: the token rows of that pool), redirects a bad one in place to ``safe_id`` (0:
SGLang's padding slot, always readable) and appends an entry to the same
:class:`~kvtrap.capture.guard.record.GuardRecord` the page-table guard uses: ``row`` = request,
``column`` = offset inside the request's range, ``value`` = the original id. It also checks the offsets
(:data:`~kvtrap.record.guard_entry.FLAG_INDPTR_MALFORMED`: row 0 not starting at 0, a range ending before it
starts or past ``len(indices)``); those are recorded, not changed (programs read each other's offsets, so
rewriting them would race), and the scan itself is clamped to ``[0, len(indices))``: the guard never reads
past the buffer.

Lengths come from the device ``indptr``: the launcher reads no device value and allocates nothing, so it can
be captured in a CUDA graph or run before a replay without a host sync. Grid ``(rows, splits)``: ``splits``
programs share one request's range (strided by ``BLOCK``), so a long request is not one program's loop.
Entry layout and flag bits: :mod:`kvtrap.record.guard_entry`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl

from kvtrap.capture.guard.kernel import (
    F_OUT_OF_RANGE,
    _append_entries,
    _append_one,
    _int_dtypes,
)
from kvtrap.record import guard_entry as _layout

if TYPE_CHECKING:
    import torch

    from kvtrap.capture.guard.record import GuardRecord

F_INDPTR_MALFORMED: tl.constexpr = tl.constexpr(_layout.FLAG_INDPTR_MALFORMED)

_BLOCK = 1024
_MAX_SPLITS = 16


@triton.jit(do_not_specialize=["numel", "bound", "table_id", "layer_id"])
def _ragged_guard_kernel(
    indptr_ptr,  # [rows + 1] offsets (int32/int64)
    indices_ptr,  # [numel] ids (int32/int64), checked and redirected in place
    counter_ptr,  # [1] int32: entries ever appended since the last drain
    entries_ptr,  # [max_entries, ENTRY_WIDTH] int64
    numel,  # ids in the buffer: no range may end past it
    bound,  # exclusive upper bound on ids (token rows of the pool read)
    table_id,
    layer_id,
    max_entries,
    BLOCK: tl.constexpr,
    SPLITS: tl.constexpr,
    SAFE_ID: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = tl.load(indptr_ptr + row).to(tl.int64)
    end = tl.load(indptr_ptr + row + 1).to(tl.int64)
    n = numel.to(tl.int64)
    if split == 0:
        # each offset is judged once: indptr[0] by row 0, indptr[r + 1] by row r
        if (row == 0) & (start != 0):
            _append_one(counter_ptr, entries_ptr, max_entries, table_id, layer_id, row, row, start, n,
                        F_INDPTR_MALFORMED)
        if (end < start) | (end > n):
            _append_one(counter_ptr, entries_ptr, max_entries, table_id, layer_id, row, row + 1, end, n,
                        F_INDPTR_MALFORMED)
    lo = tl.minimum(tl.maximum(start, 0), n)
    hi = tl.minimum(tl.maximum(end, lo), n)
    offs = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=tl.int64)
    for s in range(lo + split * BLOCK, hi, BLOCK * SPLITS):
        idx = s + offs
        m = idx < hi
        vals = tl.load(indices_ptr + idx, mask=m, other=0).to(tl.int64)
        oor = m & ((vals < 0) | (vals >= bound))
        if tl.sum(oor.to(tl.int32), axis=0) > 0:
            flags = tl.where(oor, F_OUT_OF_RANGE, 0).to(tl.int64)
            _append_entries(counter_ptr, entries_ptr, max_entries, oor, table_id, layer_id, row, idx - start, vals,
                            bound.to(tl.int64), flags)
            tl.store(indices_ptr + idx, (zero + SAFE_ID).to(indices_ptr.dtype.element_ty), mask=oor)


def splits_for(rows: int, numel: int) -> int:
    """Programs per request: about the ids one request can hold (a shape, not data) over ``BLOCK``, capped."""
    per_row = max(1, int(numel) // max(1, int(rows)))
    return max(1, min(_MAX_SPLITS, triton.cdiv(per_row, _BLOCK)))


def guard_ragged_(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    bound: int,
    record: GuardRecord,
    table_id: int,
    layer_id: int = -1,
    safe_id: int = 0,
) -> None:
    """Check the ids ``indices[indptr[r] : indptr[r + 1]]`` of every request ``r`` against ``[0, bound)``.

    ``indptr`` is 1-D with ``rows + 1`` offsets, ``indices`` 1-D (int32 or int64, contiguous) and modified in
    place: out-of-range live ids become ``safe_id`` (their original values are in ``record``). Ids past
    ``indptr[rows]`` are not read. Reads no device value: capturable.
    """
    if indptr.dim() != 1 or indices.dim() != 1:
        raise ValueError(f"indptr and indices must be 1-D; got {tuple(indptr.shape)} and {tuple(indices.shape)}")
    if indices.dtype not in _int_dtypes() or indptr.dtype not in _int_dtypes():
        raise ValueError(f"indptr and indices must be int32 or int64; got {indptr.dtype} and {indices.dtype}")
    if indices.numel() and indices.stride(0) != 1 or indptr.numel() and indptr.stride(0) != 1:
        raise ValueError("indptr and indices must be contiguous")
    if not 0 <= safe_id < bound:
        raise ValueError(f"safe_id {safe_id} is outside [0, {bound})")
    rows = indptr.shape[0] - 1
    if rows <= 0:
        return
    splits = splits_for(rows, indices.numel())
    _ragged_guard_kernel[(rows, splits)](
        indptr,
        indices,
        record.counter,
        record.entries,
        indices.numel(),
        int(bound),
        int(table_id),
        int(layer_id),
        record.capacity,
        BLOCK=_BLOCK,
        SPLITS=splits,
        SAFE_ID=int(safe_id),
        num_warps=4,
    )
