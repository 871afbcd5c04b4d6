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
    # live entries equal to the reserved padding page 0 in rows of real requests (only when asked)
    padding: BadEntries | None = None
    # live SWA entries that differ from the full->SWA mapping applied to the full table (only when asked)
    swa_mismatch: BadEntries | None = None

    @property
    def ok(self) -> bool:
        return self.bad is None and self.overflow is None and self.padding is None and self.swa_mismatch is None


def live_pages(cache_seqlens: torch.Tensor, page_size: int) -> torch.Tensor:
    """Pages each row really uses: ``ceil(cache_seqlens / page_size)``. The rest of a row is garbage."""
    lens = cache_seqlens.to(torch.int64)
    return (lens + (page_size - 1)) // page_size


def scan_page_table(
    table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    page_size: int,
    bound: int,
    lower: int = 0,
    req_slots: torch.Tensor | None = None,
    full_table: torch.Tensor | None = None,
    swa_mapping: torch.Tensor | None = None,
) -> TableScan:
    """Check the live prefix of every row of ``table`` lies in ``[lower, bound)``.

    Only ``ceil(cache_seqlens[r] / page_size)`` entries of row ``r`` are checked: SGLang allocates page
    tables with ``torch.empty`` and writes only that prefix, so the tail is uninitialised memory.

    ``req_slots`` (the batch's ``req_pool_indices``, one per row): also find live entries equal to the
    reserved padding page 0 in rows whose request slot is real (not 0). Rows of request slot 0 are
    CUDA-graph padding rows and may read page 0. Folded into the same single host sync.

    ``full_table`` + ``swa_mapping`` (``table`` holds SWA page ids translated from ``full_table``, same
    live prefix; the mapping is SGLang's token-slot ``full_to_swa_index_mapping``): also find live
    entries that differ from ``mapping[full * page_size] // page_size``, which is how SGLang derives every
    SWA table (a full id whose token slot lies outside the mapping expects -1). Same single sync; the
    same check the device guard makes.
    """
    rows = min(int(table.shape[0]), int(cache_seqlens.shape[0]))
    if req_slots is not None:
        rows = min(rows, int(req_slots.shape[0]))
    table = table[:rows]
    pages = live_pages(cache_seqlens[:rows], page_size)
    width = int(table.shape[1]) if table.dim() == 2 else 0
    cols = torch.arange(width, device=table.device)
    live = cols.unsqueeze(0) < pages.unsqueeze(1)
    bad_mask = live & ((table < lower) | (table >= bound))
    flags = [bad_mask.any(), (pages > width).any()]
    pad_mask = None
    if req_slots is not None:
        pad_mask = live & (table == 0) & (req_slots[:rows] != 0).unsqueeze(1)
        flags.append(pad_mask.any())
    swa_mask = None
    if full_table is not None and swa_mapping is not None:
        swa_mask = live & (table.to(torch.int64) != _swa_of(full_table[:rows, :width], swa_mapping, page_size))
        flags.append(swa_mask.any())
    found = torch.stack(flags).tolist()
    any_bad, any_overflow = found[0], found[1]
    bad = _locate(table, bad_mask) if any_bad else None
    padding = _locate(table, pad_mask) if pad_mask is not None and found[2] else None
    swa_bad = _locate(table, swa_mask) if swa_mask is not None and found[-1] else None
    overflow = None
    if any_overflow:
        over = (pages > width).nonzero().flatten()
        first = int(over[0])
        overflow = Overflow(row=first, needed_pages=int(pages[first]), width=width, count=int(over.numel()))
    return TableScan(bad=bad, overflow=overflow, padding=padding, swa_mismatch=swa_bad)


def _swa_of(full: torch.Tensor, mapping: torch.Tensor, page_size: int) -> torch.Tensor:
    """``mapping[full * page_size] // page_size`` per entry; -1 where the token slot lies outside the
    mapping or maps to a negative slot (never a valid SWA page, so such an entry always differs)."""
    tok = full.to(torch.int64) * page_size
    inside = (tok >= 0) & (tok < mapping.numel())
    mapped = mapping.reshape(-1)[torch.where(inside, tok, torch.zeros_like(tok))].to(torch.int64)
    return torch.where(inside & (mapped >= 0), mapped // page_size, torch.full_like(mapped, -1))


def spec_full_rows(page_table: torch.Tensor, seqlens: torch.Tensor, expand_table: torch.Tensor,
                   expand_seqlens: torch.Tensor, draft_tokens: int, width: int) -> torch.Tensor:  # fmt: skip
    """The full-pool counterpart of fa3's speculative SWA table (``swa_spec_metadata.page_table``).

    fa3 (target verify, topk > 1, page size 1) builds one row per draft token ``i``: the prefix
    ``page_table[i // draft_tokens, :seqlens[i // draft_tokens]]`` followed by
    ``expand_table[i, :expand_seqlens[i]]``, both translated to SWA ids (SGLang's
    ``prepare_swa_spec_page_table_triton``). This builds the same rows from the untranslated tables,
    ``width`` columns (entries past a row's length are 0), so the scan can compare the two.
    """
    rows = int(expand_seqlens.shape[0])
    base = torch.arange(rows, device=page_table.device) // draft_tokens
    len_a = seqlens.to(torch.int64)[base].unsqueeze(1)
    len_b = expand_seqlens.to(torch.int64)[:rows].unsqueeze(1)
    cols = torch.arange(width, device=page_table.device).unsqueeze(0)
    a_idx = cols.clamp(max=page_table.shape[1] - 1).expand(rows, width)
    a = page_table[base].gather(1, a_idx).to(torch.int64)
    b_col = (cols - len_a).clamp(min=0, max=max(int(expand_table.shape[1]) - 1, 0))
    b = expand_table[:rows].gather(1, b_col).to(torch.int64)
    in_a = cols < len_a
    in_b = (cols >= len_a) & (cols < len_a + len_b)
    zero = torch.zeros_like(a)
    return torch.where(in_a, a, torch.where(in_b, b, zero))


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


@dataclass(frozen=True)
class BadFree:
    """The first SWA page of a release that must not enter the free list, and why."""

    reason: str  # "reserved", "double" or "not_owned"
    position: int  # index in the released page ids
    page: int
    owner: int  # the full page kvtrap recorded for it (-1: not handed out)
    count: int  # pages of this release with the same problem


def scan_swa_release(pages: torch.Tensor, owner: torch.Tensor, freeing: torch.Tensor | None) -> BadFree | None:
    """Check SWA page ids about to enter the free list against kvtrap's ownership record.

    ``owner[page]``: the full page the SWA page was handed out with, -1 when not handed out (index 0 is
    the reserved page). ``freeing``: the full pages the free call releases, or None when the release has
    no known full side (then ownership is not judged). One host sync per call (the ``any``), more only
    when something is wrong.
    """
    flat = pages.reshape(-1).to(torch.int64)
    if flat.numel() == 0:
        return None
    inside = (flat > 0) & (flat < owner.numel() - 1)
    owners = owner[torch.where(inside, flat, torch.zeros_like(flat))]
    reserved = flat == 0
    # a page twice in one release is a double free as well (SGLang's free_page_ids does not dedup)
    sorted_pages, order = torch.sort(flat)
    repeat = torch.zeros_like(flat, dtype=torch.bool)
    repeat[order[1:]] = sorted_pages[1:] == sorted_pages[:-1]
    double = inside & ((owners < 0) | repeat)
    not_owned = torch.zeros_like(reserved)
    if freeing is not None:
        not_owned = inside & (owners >= 0) & ~torch.isin(owners, freeing.reshape(-1).to(torch.int64))
    bad = reserved | double | not_owned
    if not bool(bad.any()):
        return None
    for reason, mask in (("reserved", reserved), ("double", double), ("not_owned", not_owned)):
        hits = mask.nonzero().flatten()
        if hits.numel():
            first = int(hits[0])
            return BadFree(reason, first, int(flat[first]), int(owners[first]), int(hits.numel()))
    return None  # out-of-pool ids: the allocation check's business
