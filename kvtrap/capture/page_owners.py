"""kvtrap's own record of the SWA pages an ``SWATokenToKVPoolAllocator`` has handed out and not freed.

One int64 tensor per allocator, ``owner[swa_page]``: the full page the SWA page was handed out with, or
:data:`FREE` (``-1``) when kvtrap has not seen it handed out (still in the free list, or freed). Two
extra entries: index 0 is the reserved padding page (never owned), the last one is a scratch slot that
masked writes go to, so recording an allocation needs no host sync.

The record belongs to one armed session: at the first sight of an allocator in a session it is seeded
from SGLang's own ``full_to_swa_index_mapping`` (every non-zero entry pairs a live full slot with its
SWA slot), so arming a process that already serves requests does not mistake live pages for free ones.
It is dropped on ``clear()`` (SGLang resets both free lists and the mapping there).

Kept in a ``WeakKeyDictionary`` beside the allocator, never as an attribute on it: an armed allocator
must be the same object, bit for bit, as an unarmed one.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

FREE = -1


@dataclass
class PageOwners:
    session: Any  # the session the record was built in (a new session re-seeds it)
    page_size: int
    owner: torch.Tensor  # [swa_pages + 2] int64: full page per SWA page, FREE if not handed out
    # full pages of SWA frees queued inside a free group (released at free_group_end)
    pending_full_pages: list[torch.Tensor] = field(default_factory=list)
    # per full page, the last drain-mode release check that freed it (kvtrap.capture.allocator_kernels)
    stamp: torch.Tensor | None = None

    def stamps(self, full_bound: int) -> torch.Tensor:
        """The stamp table over full pages ``[0, full_bound]`` (zeros at first; call numbers start at 1)."""
        if self.stamp is None or self.stamp.numel() != full_bound + 1:
            self.stamp = torch.zeros(full_bound + 1, dtype=torch.int64, device=self.owner.device)
        return self.stamp

    @property
    def scratch(self) -> int:
        return self.owner.numel() - 1

    def note_pairs(self, full_slots: torch.Tensor, swa_slots: torch.Tensor) -> None:
        """Record ``swa_slots[i] // ps`` as handed out with ``full_slots[i] // ps`` (zeros: no SWA peer)."""
        ps = self.page_size
        swa_pages = swa_slots.reshape(-1).to(torch.int64) // ps
        full_pages = full_slots.reshape(-1).to(torch.int64) // ps
        valid = (swa_pages > 0) & (swa_pages < self.scratch)
        index = torch.where(valid, swa_pages, torch.full_like(swa_pages, self.scratch))
        self.owner.index_put_((index,), full_pages)
        self._reset_scratch()

    def _reset_scratch(self) -> None:
        # fill_ takes the value as a kernel argument: ``owner[i] = FREE`` would build a device scalar and copy it
        self.owner.narrow(0, self.scratch, 1).fill_(FREE)

    def note_freed(self, pages: torch.Tensor) -> None:
        index = pages.reshape(-1).to(torch.int64).clamp(0, self.scratch)
        self.owner.index_fill_(0, index, FREE)
        self._reset_scratch()


_records: weakref.WeakKeyDictionary[Any, PageOwners] = weakref.WeakKeyDictionary()
# the SWA sub-allocator -> its SWA allocator (where the pages are released is the sub-allocator); a weak value too:
# the allocator holds the sub-allocator, so a strong one would keep both alive for good
_parents: weakref.WeakKeyDictionary[Any, weakref.ref[Any]] = weakref.WeakKeyDictionary()


def swa_pages_of(alloc: Any) -> int:
    sub = alloc.swa_attn_allocator
    pages = getattr(sub, "num_pages", None)
    return int(pages) if pages is not None else int(alloc.size_swa) // int(alloc.page_size)


def record_for(alloc: Any, session: Any) -> PageOwners:
    """The allocator's record in ``session``; built (and seeded from the live mapping) at first sight."""
    rec = _records.get(alloc)
    if rec is not None and rec.session is session:
        return rec
    ps = int(alloc.page_size)
    mapping = alloc.full_to_swa_index_mapping
    owner = torch.full((swa_pages_of(alloc) + 2,), FREE, dtype=torch.int64, device=mapping.device)
    rec = PageOwners(session=session, page_size=ps, owner=owner)
    live = mapping[:-1]  # the trailing -1 is SGLang's sentinel for last_loc == -1
    full_slots = torch.arange(live.numel(), dtype=torch.int64, device=live.device)
    rec.note_pairs(full_slots, live)
    _records[alloc] = rec
    _parents[alloc.swa_attn_allocator] = weakref.ref(alloc)
    return rec


def parent_of(sub: Any) -> Any | None:
    ref = _parents.get(sub)
    return None if ref is None else ref()


def existing(alloc: Any, session: Any) -> PageOwners | None:
    rec = _records.get(alloc)
    return rec if rec is not None and rec.session is session else None


def drop(alloc: Any) -> None:
    _records.pop(alloc, None)
