"""The drain-mode allocator checks as one Triton launch per checked call (``KVTRAP_ALLOCATOR_TRAP=drain``).

Written as torch ops, the free check of one SGLang free call was about 60 small device ops (codes, ownership
lookups, a membership bitmap, folding the first finding into the record, marking the pages freed), and the
host-side dispatch of those ops, not the device work, is what a server pays: on an H200 it measured ~1.4 ms
of CPU per free call (``benchmarks/results/free-path-nvidia-h200.md``), and at concurrency 64 a decode step
makes several. Each check here is one launch that does all of it and reads nothing on the host.

Same verdicts as the torch references in :mod:`kvtrap.capture.checks` (``swa_release_codes``,
``slot_codes``), which call mode uses and the tests compare against:

* :func:`release_check_`: SWA pages about to enter the free list. Reserved page 0 (code 1), a page not handed
  out or freed twice in one call (2), a page handed out with a full page the call does not free (3). The
  ownership record is updated in the same pass (each page's owner is exchanged for ``FREE`` atomically, so a
  page twice in one release sees ``FREE`` the second time: the double free needs no sort; which of the two
  positions is named is the device's order of atomics). Membership in the call's full pages goes through a
  stamp table (the call's number written at each freed full page, then one load per owner): linear in the
  call's size, never cleared.
* :func:`slot_check_`: the SWA slots an allocation handed out (read through ``full_to_swa_index_mapping``,
  never past it) lie in ``[page_size, bound)`` (code 4), and, with the free checks on, their pages are recorded
  as owned by the allocation's full pages.

Both fold into the allocator's record (:class:`kvtrap.capture.deferred.Findings`: count, code, position, value,
owner, call number) the finding call mode would report for the call: the reason first by precedence, then its
first position, and the count of that reason; the first finding stays until the host reads it. One program
per launch walks the call's ids in blocks: a free or an allocation moves tens to a few thousand ids, and a
single program keeps the record update free of races.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvtrap.capture import checks

_BLOCK = 256  # ids per step of one program
_FREE: tl.constexpr = tl.constexpr(-1)
_CODE_RESERVED: tl.constexpr = tl.constexpr(1)
_CODE_DOUBLE: tl.constexpr = tl.constexpr(2)
_CODE_NOT_OWNED: tl.constexpr = tl.constexpr(3)
_CODE_OUT_OF_RANGE: tl.constexpr = tl.constexpr(checks.OUT_OF_RANGE)
assert checks.RELEASE_REASONS == ("reserved", "double", "not_owned")  # the codes above, in that order


def usable(t: torch.Tensor) -> bool:
    """Whether these kernels can run on ``t``'s device: CUDA, or anywhere under the Triton interpreter."""
    return bool(t.is_cuda) or os.environ.get("TRITON_INTERPRET") == "1"


_POS_BITS: tl.constexpr = tl.constexpr(40)  # a call checks fewer than 2**40 ids
_POS_MASK: tl.constexpr = tl.constexpr(2**40 - 1)
_NO_KEY: tl.constexpr = tl.constexpr(2**62)
_CODES: tl.constexpr = tl.constexpr(8)  # reason codes 0..7 (kvtrap.capture.checks: 1-3 free, 4 alloc)


@triton.jit
def _no_finding():
    """A call's running tally before its first block: per-code counts, the best key (none), value, owner."""
    return (tl.zeros([_CODES], tl.int64), tl.full([], _NO_KEY, tl.int64), tl.zeros([], tl.int64),
            tl.full([], -1, tl.int64))  # fmt: skip


@triton.jit
def _fold_block(idx, code, value, owner, counts, f_key, f_value, f_owner):
    """Add one block's hits (``code > 0``) to the call's running tally. The finding kept is the one call mode
    reports (kvtrap.capture.checks.scan_swa_release): the lowest code first (the reasons' precedence), then the
    lowest position; its count is the number of ids with that code."""
    hit = code > 0
    key = tl.where(hit, (code.to(tl.int64) << _POS_BITS) + idx, _NO_KEY)
    bkey = tl.min(key, axis=0)
    sel = hit & (key == bkey)
    take = bkey < f_key
    zero = tl.zeros(idx.shape, tl.int64)
    f_value = tl.where(take, tl.sum(tl.where(sel, value, zero), axis=0), f_value)
    f_owner = tl.where(take, tl.sum(tl.where(sel, owner, zero), axis=0), f_owner)
    f_key = tl.minimum(bkey, f_key)
    codes = tl.arange(0, _CODES)
    counts += tl.sum((code.to(tl.int32)[:, None] == codes[None, :]).to(tl.int64), axis=0)
    return counts, f_key, f_value, f_owner


@triton.jit
def _store_first(rec_ptr, counts, f_key, f_value, f_owner, seq):
    """The record's fields (kvtrap.capture.deferred.FIELDS order); the first finding wins until it is read."""
    f_code = f_key >> _POS_BITS
    count = tl.sum(tl.where(tl.arange(0, _CODES) == f_code, counts, 0), axis=0)
    if (f_key < _NO_KEY) & (tl.load(rec_ptr) == 0):
        tl.store(rec_ptr + 0, count)
        tl.store(rec_ptr + 1, f_code)
        tl.store(rec_ptr + 2, f_key & _POS_MASK)
        tl.store(rec_ptr + 3, f_value)
        tl.store(rec_ptr + 4, f_owner)
        tl.store(rec_ptr + 5, seq)


@triton.jit(do_not_specialize=["n", "owner_numel", "n_freeing", "freeing_div", "stamp_numel", "seq"])
def _release_check_kernel(
    pages_ptr,  # [n] SWA page ids about to enter the free list
    n,
    owner_ptr,  # [owner_numel] int64: full page per SWA page, FREE when not handed out (last: scratch)
    owner_numel,
    freeing_ptr,  # [n_freeing] what the call frees (token slots or full pages), or a dummy
    n_freeing,
    freeing_div,  # freeing // freeing_div = full page ids
    stamp_ptr,  # [stamp_numel] int64 per full page: the last call that freed it (membership without clearing)
    stamp_numel,
    rec_ptr,  # [6] int64 record
    seq,  # this call's number (unique per allocator and session: stamps of older calls never match)
    HAS_FREEING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if HAS_FREEING:
        # the full pages this call frees, stamped (ids past the table clamp to its last entry, as call mode's
        # bitmap clamps them); then each owner's membership is one load
        for fs in range(0, n_freeing, BLOCK):
            fidx = fs + tl.arange(0, BLOCK).to(tl.int64)
            fm = fidx < n_freeing
            fp = tl.load(freeing_ptr + fidx, mask=fm, other=0).to(tl.int64)
            fp = tl.minimum(tl.maximum(fp, 0) // freeing_div, stamp_numel - 1)
            tl.store(stamp_ptr + fp, tl.full([BLOCK], 0, tl.int64) + seq, mask=fm)
        tl.debug_barrier()  # one program: its stamps are visible to all its threads after this
    counts, f_key, f_value, f_owner = _no_finding()
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK).to(tl.int64)
        m = idx < n
        p = tl.load(pages_ptr + idx, mask=m, other=0).to(tl.int64)
        inside = m & (p > 0) & (p < owner_numel - 1)
        free = tl.full([BLOCK], _FREE, tl.int64)
        old = tl.atomic_xchg(owner_ptr + tl.where(inside, p, 0), free, mask=inside)
        owners = tl.where(inside, old, free)
        code = tl.where(m & (p == 0), _CODE_RESERVED, tl.where(inside & (owners < 0), _CODE_DOUBLE, 0))
        if HAS_FREEING:
            owned = inside & (owners >= 0)
            at = tl.minimum(tl.where(owned, owners, 0), stamp_numel - 1)
            member = tl.load(stamp_ptr + at, mask=owned, other=0) == seq
            code = tl.where((code == 0) & owned & ~member, _CODE_NOT_OWNED, code)
        counts, f_key, f_value, f_owner = _fold_block(idx, code.to(tl.int64), p, owners, counts, f_key, f_value,
                                                      f_owner)  # fmt: skip
    _store_first(rec_ptr, counts, f_key, f_value, f_owner, seq)


@triton.jit(do_not_specialize=["n", "mapping_numel", "lower", "bound", "owner_numel", "page_size", "seq"])
def _slot_check_kernel(
    full_ptr,  # [n] full-pool token slots the allocation returned
    n,
    mapping_ptr,  # full_to_swa_index_mapping
    mapping_numel,
    slots_ptr,  # [n] out: the SWA slot of each (-1 for a full slot outside the mapping)
    lower,
    bound,
    owner_ptr,  # ownership record (NOTE) or a dummy
    owner_numel,
    page_size,
    rec_ptr,
    seq,
    NOTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    counts, f_key, f_value, f_owner = _no_finding()
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK).to(tl.int64)
        m = idx < n
        full = tl.load(full_ptr + idx, mask=m, other=0).to(tl.int64)
        known = m & (full >= 0) & (full < mapping_numel)  # never read past the mapping (torch would raise)
        slot = tl.load(mapping_ptr + tl.where(known, full, 0), mask=known, other=-1)
        tl.store(slots_ptr + idx, slot, mask=m)
        slot = slot.to(tl.int64)
        code = tl.where(m & ((slot < lower) | (slot >= bound)), _CODE_OUT_OF_RANGE, 0).to(tl.int64)
        if NOTE:
            # record the pairing (kvtrap.capture.page_owners.note_pairs); a slot without an SWA peer reads 0
            swa_page = tl.where(slot >= 0, slot // page_size, 0)
            valid = known & (swa_page > 0) & (swa_page < owner_numel - 1)
            tl.store(owner_ptr + tl.where(valid, swa_page, 0), full // page_size, mask=valid)
        counts, f_key, f_value, f_owner = _fold_block(idx, code, slot, tl.full([BLOCK], -1, tl.int64), counts, f_key,
                                                      f_value, f_owner)  # fmt: skip
    _store_first(rec_ptr, counts, f_key, f_value, f_owner, seq)


def release_check_(
    pages: torch.Tensor,
    owner: torch.Tensor,
    freeing: torch.Tensor | None,
    freeing_div: int,
    stamp: torch.Tensor,
    record: torch.Tensor,
    seq: int,
) -> None:
    """Judge ``pages`` (flat SWA page ids) against ``owner`` and mark them freed there; fold the call-mode finding
    into ``record`` as call ``seq``. ``freeing``: what the call frees (``freeing // freeing_div`` are full page
    ids) or None when the release has no known full side (ownership is then not judged). ``stamp``: an int64
    scratch table over the full pages (``page_owners.PageOwners.stamp``); ``seq`` must not repeat for it. One
    launch."""
    n = int(pages.numel())
    if n == 0:
        return
    has = freeing is not None
    if freeing is None:
        f = owner  # any tensor: HAS_FREEING=False never reads it
    else:  # the kernel indexes it flat: a 1-D contiguous tensor as it is, anything else copied so
        f = freeing if freeing.dim() == 1 and freeing.is_contiguous() else freeing.reshape(-1).contiguous()
    _release_check_kernel[(1,)](
        pages, n, owner, owner.numel(), f, int(f.numel()) if has else 0, max(int(freeing_div), 1), stamp,
        stamp.numel(), record, seq, HAS_FREEING=has, BLOCK=_BLOCK,
    )  # fmt: skip


def slot_check_(
    full_slots: torch.Tensor,
    mapping: torch.Tensor,
    slots: torch.Tensor,
    lower: int,
    bound: int,
    owner: torch.Tensor | None,
    page_size: int,
    record: torch.Tensor,
    seq: int,
) -> None:
    """Write the SWA slots of an allocation (``mapping[full_slots]``, flat) into ``slots``, check each against
    ``[lower, bound)`` and fold the first bad one into ``record`` as call ``seq``; with ``owner``, record their
    pages as handed out with the allocation's full pages. One launch."""
    n = int(full_slots.numel())
    if n == 0:
        return
    note = owner is not None
    o = owner if note else record
    _slot_check_kernel[(1,)](
        full_slots, n, mapping, mapping.numel(), slots, int(lower), int(bound), o, o.numel(), int(page_size), record,
        seq, NOTE=note, BLOCK=_BLOCK,
    )  # fmt: skip
