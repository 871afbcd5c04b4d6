"""Value checks on page tables and KV slots: pure tensor code, no SGLang imports.

Each scan costs one host sync when everything is fine (a two-element ``tolist()``); finding the
coordinates of bad entries costs more but only runs once something is wrong. Callers must not call
these while a CUDA graph is being captured (the device guard covers that case).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LISTED_ROWS = 64


@dataclass(frozen=True)
class BadEntries:
    """Entries outside ``[lower, bound)``: how many, in which rows, and the first one (row-major)."""

    count: int
    rows: tuple[int, ...]
    row: int
    column: int
    value: int


@dataclass(frozen=True)
class Overflow:
    """A row whose ``cache_seqlens`` needs more pages than the table has columns."""

    row: int
    needed_pages: int
    width: int
    count: int


@dataclass(frozen=True)
class TableScan:
    bad: BadEntries | None
    overflow: Overflow | None

    @property
    def ok(self) -> bool:
        return self.bad is None and self.overflow is None


def live_pages(cache_seqlens: torch.Tensor, page_size: int) -> torch.Tensor:
    """Pages each row really uses: ``ceil(cache_seqlens / page_size)``. The rest of a row is garbage."""
    lens = cache_seqlens.to(torch.int64)
    return (lens + (page_size - 1)) // page_size


def scan_page_table(
    table: torch.Tensor, cache_seqlens: torch.Tensor, page_size: int, bound: int, lower: int = 0
) -> TableScan:
    """Check the live prefix of every row of ``table`` lies in ``[lower, bound)``.

    Only ``ceil(cache_seqlens[r] / page_size)`` entries of row ``r`` are checked: SGLang allocates page
    tables with ``torch.empty`` and writes only that prefix, so the tail is uninitialised memory.
    """
    rows = min(int(table.shape[0]), int(cache_seqlens.shape[0]))
    table = table[:rows]
    pages = live_pages(cache_seqlens[:rows], page_size)
    width = int(table.shape[1]) if table.dim() == 2 else 0
    cols = torch.arange(width, device=table.device)
    live = cols.unsqueeze(0) < pages.unsqueeze(1)
    bad_mask = live & ((table < lower) | (table >= bound))
    any_bad, any_overflow = torch.stack((bad_mask.any(), (pages > width).any())).tolist()
    bad = _locate(table, bad_mask) if any_bad else None
    overflow = None
    if any_overflow:
        over = (pages > width).nonzero().flatten()
        first = int(over[0])
        overflow = Overflow(row=first, needed_pages=int(pages[first]), width=width, count=int(over.numel()))
    return TableScan(bad=bad, overflow=overflow)


def _locate(values: torch.Tensor, bad_mask: torch.Tensor) -> BadEntries:
    coords = bad_mask.nonzero()
    row, col = (int(x) for x in coords[0])
    rows = torch.unique(coords[:, 0])[:MAX_LISTED_ROWS].tolist()
    return BadEntries(
        count=int(coords.shape[0]), rows=tuple(rows), row=row, column=col, value=int(values[row, col])
    )


def scan_slots(slots: torch.Tensor, lower: int, bound: int) -> BadEntries | None:
    """Check a 1-D tensor of KV slots lies in ``[lower, bound)``; ``row`` is the position in ``slots``."""
    flat = slots.reshape(-1)
    bad_mask = (flat < lower) | (flat >= bound)
    if not bool(bad_mask.any()):
        return None
    pos = bad_mask.nonzero().flatten()
    first = int(pos[0])
    return BadEntries(
        count=int(pos.numel()),
        rows=tuple(pos[:MAX_LISTED_ROWS].tolist()),
        row=first,
        column=0,
        value=int(flat[first]),
    )


def is_capturing(t: torch.Tensor) -> bool:
    """True while the current CUDA stream is capturing a graph (never true for CPU tensors)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()
