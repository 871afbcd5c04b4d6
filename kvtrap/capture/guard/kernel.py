"""The device-side page-table guard: one Triton launch per page table per forward, safe to capture.

For every row ``r`` of a page table the kernel reads ``cache_seqlens[r]`` on the device, derives the
live prefix ``ceil(seqlen / page_size)`` (clamped to the table width) and checks each live entry
against ``[0, bound)``, the page range of the pool the table indexes. Optionally (SWA tables) it
also checks that each live SWA entry equals the full->SWA slot mapping applied to the full table's
entry at the same position, which is how SGLang builds the SWA table.

Every bad entry is appended to a preallocated :class:`~kvtrap.capture.guard.record.GuardRecord` (one atomic
per program that found something) and, when it is out of range, overwritten in place with
``safe_page`` so that the attention kernel launched afterwards reads a page that exists. The guard
never synchronises with the host: the launcher reads no device value, so it can be captured into a
CUDA graph and replayed. The host learns about violations only when it drains the record.

Entry layout and flag bits: :mod:`kvtrap.record.guard_entry` (shared with the host readers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl

if TYPE_CHECKING:
    import torch

    from kvtrap.capture.guard.record import GuardRecord

from kvtrap.record import guard_entry as _layout

# The record layout (kvtrap.record.guard_entry) as tl.constexpr globals, so the kernels and every host
# reader share one definition.
_W: tl.constexpr = tl.constexpr(_layout.ENTRY_WIDTH)
_C_TABLE: tl.constexpr = tl.constexpr(_layout.COL_TABLE_ID)
_C_LAYER: tl.constexpr = tl.constexpr(_layout.COL_LAYER_ID)
_C_ROW: tl.constexpr = tl.constexpr(_layout.COL_ROW)
_C_COLUMN: tl.constexpr = tl.constexpr(_layout.COL_COLUMN)
_C_VALUE: tl.constexpr = tl.constexpr(_layout.COL_VALUE)
_C_BOUND: tl.constexpr = tl.constexpr(_layout.COL_BOUND)
_C_FLAGS: tl.constexpr = tl.constexpr(_layout.COL_FLAGS)
F_OUT_OF_RANGE: tl.constexpr = tl.constexpr(_layout.FLAG_OUT_OF_RANGE)
F_SWA_MISMATCH: tl.constexpr = tl.constexpr(_layout.FLAG_SWA_MISMATCH)
F_SEQLEN_EXCEEDS_TABLE: tl.constexpr = tl.constexpr(_layout.FLAG_SEQLEN_EXCEEDS_TABLE)

_MAX_BLOCK = 1024


@triton.jit
def _append_one(counter_ptr, entries_ptr, max_entries, table_id, layer_id, row, column, value, bound, flag):
    """Append one scalar entry (its own atomic); shared by every guard's row-level findings: the table overflow
    below and the ragged guard's malformed offsets."""
    slot = tl.atomic_add(counter_ptr, 1)
    if slot < max_entries:
        e = entries_ptr + slot.to(tl.int64) * _W
        tl.store(e + _C_TABLE, table_id.to(tl.int64))
        tl.store(e + _C_LAYER, layer_id.to(tl.int64))
        tl.store(e + _C_ROW, row)
        tl.store(e + _C_COLUMN, column.to(tl.int64))
        tl.store(e + _C_VALUE, value)
        tl.store(e + _C_BOUND, bound.to(tl.int64))
        tl.store(e + _C_FLAGS, tl.full([], flag, tl.int64))


@triton.jit
def _append_overflow(counter_ptr, entries_ptr, max_entries, table_id, layer_id, row, width, need):
    """Flag FLAG_SEQLEN_EXCEEDS_TABLE (shared by this guard and the fused metadata build): the row needs more pages than the table has (column=width, value=pages needed)."""
    _append_one(counter_ptr, entries_ptr, max_entries, table_id, layer_id, row, width, need, width,
                F_SEQLEN_EXCEEDS_TABLE)


@triton.jit
def _append_entries(
    counter_ptr, entries_ptr, max_entries, bad, table_id, layer_id, row, cols, values, bound, flags
):
    """Append one entry per set lane of ``bad`` (one atomic for the whole block); shared by this guard and
    the fused metadata build, like :func:`_append_overflow`."""
    bad_i = bad.to(tl.int32)
    nbad = tl.sum(bad_i, axis=0)
    if nbad > 0:
        base = tl.atomic_add(counter_ptr, nbad)
        slot = (base + tl.cumsum(bad_i, axis=0) - 1).to(tl.int64)
        keep = bad & (slot < max_entries)
        zero = tl.zeros_like(values)
        e = entries_ptr + slot * _W
        tl.store(e + _C_TABLE, zero + table_id, mask=keep)
        tl.store(e + _C_LAYER, zero + layer_id, mask=keep)
        tl.store(e + _C_ROW, zero + row, mask=keep)
        tl.store(e + _C_COLUMN, cols.to(tl.int64), mask=keep)
        tl.store(e + _C_VALUE, values, mask=keep)
        tl.store(e + _C_BOUND, zero + bound, mask=keep)
        tl.store(e + _C_FLAGS, flags, mask=keep)


@triton.jit(do_not_specialize=["width", "bound", "table_id", "layer_id", "map_numel"])
def _guard_kernel(
    table_ptr,  # [bs, stride] int32/int64 page ids, checked and redirected in place
    seqlens_ptr,  # [>= bs] cache_seqlens (tokens)
    counter_ptr,  # [1] int32: entries ever appended since the last drain
    entries_ptr,  # [max_entries, ENTRY_WIDTH] int64
    full_ptr,  # [bs, full_stride] full-pool page table (HAS_SWA), else any valid pointer
    map_ptr,  # full->SWA token-slot mapping (HAS_SWA), else any valid pointer
    table_stride,
    full_stride,
    width,  # table columns that may be read
    bound,  # exclusive upper bound on page ids (pages of the pool this table indexes)
    table_id,
    layer_id,
    max_entries,
    map_numel,
    PAGE_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_SWA: tl.constexpr,
    LOWER: tl.constexpr,  # inclusive lower bound (0: page 0 is in bounds)
    SAFE_PAGE: tl.constexpr,  # where out-of-range entries are redirected
):
    row = tl.program_id(0).to(tl.int64)
    seqlen = tl.load(seqlens_ptr + row).to(tl.int64)
    need = (seqlen + PAGE_SIZE - 1) // PAGE_SIZE
    live = tl.minimum(tl.maximum(need, 0), width)
    offs = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=tl.int64)

    row_ptr = table_ptr + row * table_stride
    # Loads are bounded by the table width, not by the live length, so the row load does not wait for
    # the seqlen load (one memory round trip instead of two); the live mask is applied afterwards.
    for start in range(0, width, BLOCK):
        cols = start + offs
        vals = tl.load(row_ptr + cols, mask=cols < width, other=0).to(tl.int64)
        m = cols < live
        oor = m & ((vals < LOWER) | (vals >= bound))
        flags = tl.where(oor, F_OUT_OF_RANGE, 0).to(tl.int64)
        if HAS_SWA:
            full = tl.load(full_ptr + row * full_stride + cols, mask=m, other=0).to(tl.int64)
            tok = full * PAGE_SIZE
            tok_ok = (tok >= 0) & (tok < map_numel)
            mapped = tl.load(map_ptr + tok, mask=m & tok_ok, other=-1).to(tl.int64)
            expect = tl.where(mapped < 0, -1, mapped // PAGE_SIZE)
            flags += tl.where(m & (expect != vals), F_SWA_MISMATCH, 0).to(tl.int64)
        bad = flags != 0
        if tl.sum(bad.to(tl.int32), axis=0) > 0:
            _append_entries(counter_ptr, entries_ptr, max_entries, bad, table_id, layer_id, row, cols, vals, bound,
                            flags)
            tl.store(row_ptr + cols, (zero + SAFE_PAGE).to(table_ptr.dtype.element_ty), mask=oor)

    # after the loop, so the row load above is issued before the seqlen load has returned
    if need > width:  # the kernel would read past the row: record once, nothing to redirect
        _append_overflow(counter_ptr, entries_ptr, max_entries, table_id, layer_id, row, width, need)


def block_for_width(width: int) -> int:
    """Columns one program checks per loop step: the table width rounded up to a power of two, capped."""
    return max(16, min(_MAX_BLOCK, triton.next_power_of_2(max(int(width), 1))))


def guard_page_table_(
    table: torch.Tensor,
    seqlens: torch.Tensor,
    page_size: int,
    bound: int,
    record: GuardRecord,
    table_id: int,
    layer_id: int = -1,
    safe_page: int = 0,
    swa_mapping: torch.Tensor | None = None,
    full_table: torch.Tensor | None = None,
) -> None:
    """Check ``table``'s live prefix against ``[0, bound)`` on the device; redirect bad entries.

    ``table`` is ``[bs, max_pages]`` (int32 or int64, rows may be strided, columns contiguous) and is
    modified in place: out-of-range live entries become ``safe_page`` (their original values are in
    ``record``). ``seqlens`` holds at least ``bs`` token counts (``cache_seqlens``). With
    ``swa_mapping`` (SGLang's ``full_to_swa_index_mapping``, token-slot indexed) and ``full_table``
    (the full-pool table of the same batch) the SWA translation of every live entry is checked too.
    Reads no device value: capturable.
    """
    if table.dim() != 2 or table.stride(1) != 1:
        raise ValueError(f"table must be 2-D with contiguous columns; got shape {tuple(table.shape)}")
    if table.dtype not in _int_dtypes():
        raise ValueError(f"table must be int32 or int64; got {table.dtype}")
    if (swa_mapping is None) != (full_table is None):
        raise ValueError("swa_mapping and full_table go together")
    if not 0 <= safe_page < bound:
        raise ValueError(f"safe_page {safe_page} is outside [0, {bound})")
    bs, cols = table.shape
    if bs == 0:
        return
    if seqlens.shape[0] < bs:
        raise ValueError(f"seqlens has {seqlens.shape[0]} entries for {bs} rows")
    width = cols
    has_swa = swa_mapping is not None
    if has_swa:
        assert full_table is not None and swa_mapping is not None
        if full_table.dim() != 2 or full_table.shape[0] < bs or full_table.stride(1) != 1:
            raise ValueError("full_table must be 2-D with contiguous columns and at least as many rows")
        width = min(width, full_table.shape[1])
        full, mapping, full_stride, map_numel = full_table, swa_mapping, full_table.stride(0), swa_mapping.numel()
    else:
        full, mapping, full_stride, map_numel = table, table, 0, 0
    _guard_kernel[(bs,)](
        table,
        seqlens,
        record.counter,
        record.entries,
        full,
        mapping,
        table.stride(0),
        full_stride,
        width,
        int(bound),
        int(table_id),
        int(layer_id),
        record.capacity,
        map_numel,
        PAGE_SIZE=int(page_size),
        BLOCK=block_for_width(width),
        HAS_SWA=has_swa,
        LOWER=0,  # page 0 is a real (padding) page: every id from 0 up is in bounds
        SAFE_PAGE=int(safe_page),
        num_warps=_warps(width),
    )


def _warps(width: int) -> int:
    return 1 if width <= 128 else (2 if width <= 512 else 4)


_INT: tuple[object, ...] = ()


def _int_dtypes() -> tuple[object, ...]:
    global _INT
    if not _INT:
        import torch

        _INT = (torch.int32, torch.int64)
    return _INT
