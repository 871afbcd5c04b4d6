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


def slot_codes(slots: torch.Tensor, lower: int, bound: int) -> torch.Tensor:
    """Per slot: 0 inside ``[lower, bound)``, :data:`OUT_OF_RANGE` outside (the reference of
    :func:`kvtrap.capture.allocator_kernels.slot_check_`)."""
    flat = slots.reshape(-1)
    return ((flat < lower) | (flat >= bound)).to(torch.int64) * OUT_OF_RANGE


def scan_slots(slots: torch.Tensor, lower: int, bound: int) -> BadEntries | None:
    """Check a 1-D tensor of KV slots lies in ``[lower, bound)``; ``row`` is the position in ``slots``."""
    flat = slots.reshape(-1)
    bad_mask = slot_codes(flat, lower, bound) > 0
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


@dataclass(frozen=True)
class RaggedScan:
    """A ragged (CSR) index set: ``indptr`` (``bs + 1`` offsets) into a flat ``indices``.

    ``indptr_problem``: ``"start"`` (``indptr[0] != 0``), ``"decreasing"`` (a row ends before it starts)
    or ``"overrun"`` (the last offset is past ``len(indices)``), with the position in ``indptr`` and the
    value there. ``bad``: live ids outside ``[lower, bound)``; ``row`` is the request, ``column`` the
    position inside its range. Ids are only judged when ``indptr`` is sound (otherwise the live ranges are
    not known).
    """

    indptr_problem: str | None = None
    indptr_at: int | None = None
    indptr_value: int | None = None
    bad: BadEntries | None = None

    @property
    def ok(self) -> bool:
        return self.indptr_problem is None and self.bad is None


def scan_ragged(indptr: torch.Tensor, indices: torch.Tensor, bound: int, lower: int = 0) -> RaggedScan:
    """Check ``indptr`` is a sound CSR offset vector for ``indices`` and every live id lies in
    ``[lower, bound)``. Live ids are ``indices[indptr[0]:indptr[-1]]``: SGLang allocates the flat
    buffers with ``torch.empty`` (or reuses a CUDA-graph buffer), so the tail past ``indptr[-1]`` is garbage.

    One host sync (a four-flag ``tolist()``); locating the first problem costs more, only on failure.
    """
    ptr = indptr.reshape(-1).to(torch.int64)
    flat = indices.reshape(-1)
    n = int(flat.numel())
    if ptr.numel() == 0:
        return RaggedScan()
    first, last = ptr[0], ptr[-1]
    pos = torch.arange(n, device=flat.device)
    live = (pos >= first) & (pos < torch.clamp(last, max=n))
    bad_mask = live & ((flat < lower) | (flat >= bound))
    decreasing = ptr[1:] < ptr[:-1]
    found = torch.stack([first != 0, decreasing.any(), last > n, bad_mask.any()]).tolist()
    if found[0]:
        return RaggedScan("start", 0, int(first))
    if found[1]:
        at = int(decreasing.nonzero()[0]) + 1
        return RaggedScan("decreasing", at, int(ptr[at]))
    if found[2]:
        return RaggedScan("overrun", int(ptr.numel()) - 1, int(last))
    if not found[3]:
        return RaggedScan()
    hits = bad_mask.nonzero().flatten()
    at = int(hits[0])
    req = torch.searchsorted(ptr, hits, right=True) - 1
    row = int(req[0])
    bad = BadEntries(
        count=int(hits.numel()),
        rows=tuple(torch.unique(req)[:MAX_LISTED_ROWS].tolist()),
        row=row,
        column=at - int(ptr[row]),
        value=int(flat[at]),
    )
    return RaggedScan(bad=bad)


def is_capturing(t: torch.Tensor) -> bool:
    """True while the current CUDA stream is capturing a graph (never true for CPU tensors)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


#: Reason codes of the allocator checks, shared by the host scans here and the device-side record that the
#: sync-free mode keeps (:mod:`kvtrap.capture.deferred`): 0 is fine, 1-3 are :data:`RELEASE_REASONS` in order
#: of precedence, 4 an allocated slot outside its pool.
RELEASE_REASONS = ("reserved", "double", "not_owned")
OUT_OF_RANGE = len(RELEASE_REASONS) + 1


@dataclass(frozen=True)
class BadFree:
    """The first SWA page of a release that must not enter the free list, and why."""

    reason: str  # "reserved", "double" or "not_owned"
    position: int  # index in the released page ids
    page: int
    owner: int  # the full page kvtrap recorded for it (-1: not handed out)
    count: int  # pages of this release with the same problem


def swa_release_codes(
    pages: torch.Tensor, owner: torch.Tensor, freeing: torch.Tensor | None, full_bound: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Judge SWA page ids about to enter the free list against kvtrap's ownership record, on the device.

    ``owner[page]``: the full page the SWA page was handed out with, -1 when not handed out (index 0 is
    the reserved page). ``freeing``: the full pages the free call releases, or None when the release has
    no known full side (then ownership is not judged). ``full_bound``: more than any full page id.
    Returns the flat page ids, their owners and a reason code per page (0 fine, else 1 + index in
    :data:`RELEASE_REASONS`, the first that applies). Call mode reads it on the host
    (:func:`scan_swa_release`); drain mode runs the same verdict as one kernel
    (:func:`kvtrap.capture.allocator_kernels.release_check_`), which the tests hold to this reference.
    """
    flat = pages.reshape(-1).to(torch.int64)
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
        member = torch.zeros(full_bound + 1, dtype=torch.bool, device=flat.device)
        member[freeing.reshape(-1).to(torch.int64).clamp(0, full_bound)] = True
        not_owned = inside & (owners >= 0) & ~member[owners.clamp(0, full_bound)]
    zero = torch.zeros_like(flat)
    codes = torch.where(reserved, zero + 1, torch.where(double, zero + 2, torch.where(not_owned, zero + 3, zero)))
    return flat, owners, codes


def scan_swa_release(
    pages: torch.Tensor, owner: torch.Tensor, freeing: torch.Tensor | None, full_bound: int
) -> BadFree | None:
    """:func:`swa_release_codes`, read on the host: one host sync per call (the ``any``), more only when
    something is wrong."""
    if pages.numel() == 0:
        return None
    flat, owners, codes = swa_release_codes(pages, owner, freeing, full_bound)
    if not bool((codes > 0).any()):
        return None
    for code, reason in enumerate(RELEASE_REASONS, 1):
        hits = (codes == code).nonzero().flatten()
        if hits.numel():
            first = int(hits[0])
            return BadFree(reason, first, int(flat[first]), int(owners[first]), int(hits.numel()))
    return None
