"""Allocator findings kept on the device until SGLang waits for a step anyway (``KVTRAP_ALLOCATOR_TRAP=drain``).

The allocator checks judge device tensors (the SWA slots an alloc hands out, the pages a free returns). Read on
the host at the call, each check is a host sync; in SGLang 0.5.23's overlap scheduler the allocator runs on the
schedule stream, which waits on the running forward, so such a sync also stalls the CPU until that forward ends
and the next step is launched late. In drain mode a check is one kernel launch
(:mod:`kvtrap.capture.allocator_kernels`) that folds the call's first bad element into a small per-allocator
record on the device (the first finding wins until it is read), and a copy of the record goes, without blocking,
into one of a few pinned host slots with a CUDA event behind it. Where SGLang waits for a step's results
(:mod:`kvtrap.capture.hooks.step_drain`, after that step's ``copy_done``) kvtrap reads the newest slot whose event
has passed: every check enqueued before that step's forward has then passed. When the scheduler goes idle it reads
with a wait (the frees of the last finished requests come after the last drain). A finding is judged there by the
same verdict as in call mode, with the call's own tensors, and raised before the step's tokens go out.

The price, said in the docs: the faulty result has been used by then (a page freed twice may have been handed
out again, a slot outside the pool written). Call mode (``KVTRAP_ALLOCATOR_TRAP=call``) prevents it at a host
sync per call. No value is read on the host here except the pinned snapshots, and only once their event passed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

#: The record's fields, in order (one int64 each).
FIELDS = ("count", "code", "position", "value", "owner", "call")
_COUNT = FIELDS.index("count")
#: Calls remembered for judging a finding (a finding is read within a step or two of its call).
REMEMBERED_CALLS = 256
#: Pinned snapshots in flight (one per checked call): the newest whose event has passed is read.
SLOTS = 8

Judge = Callable[[Any, dict[str, int]], Any]  # (the allocator, the finding's fields) -> Verdict


@dataclass
class Finding:
    fields: dict[str, int]
    judge: Judge | None  # None: the call fell out of the remembered ones


class Findings:
    """One allocator's device-side record (per armed session) and the host-side calls it may point at."""

    def __init__(self, device: torch.device, session: Any = None) -> None:
        self.device = device
        self.session = session  # the armed session whose checks fill it
        self.cuda = device.type == "cuda"
        self.buf = torch.zeros(len(FIELDS), dtype=torch.int64, device=device)
        n = SLOTS if self.cuda else 1
        self.host = [torch.zeros(len(FIELDS), dtype=torch.int64, pin_memory=self.cuda) for _ in range(n)]
        self.events: list[Any] = [torch.cuda.Event() if self.cuda else None for _ in range(n)]
        self.slot_snap = [0] * n  # the snapshot each slot last holds (0: none, or read)
        self.snaps = 0
        self.snapped_seq = 0  # the last call a snapshot was taken after
        self.stream: Any = None  # the stream the checks run on (SGLang's schedule stream)
        self.calls: OrderedDict[int, Judge] = OrderedDict()
        self.seq = 0
        self.reported = 0  # call number of the last finding reported (an older snapshot may still hold it)

    def begin(self, judge: Judge) -> int:
        """Register one checked call (its judge, for when a finding points at it); returns its number, which
        the check's kernel writes into the record. Host bookkeeping only."""
        self.seq += 1
        self.calls[self.seq] = judge
        while len(self.calls) > REMEMBERED_CALLS:
            self.calls.popitem(last=False)
        if self.cuda:
            self.stream = torch.cuda.current_stream(self.device)
        return self.seq

    def snapshot(self, *, current: bool = False) -> None:
        """Enqueue a copy of the record into the next pinned slot, after every check enqueued so far (after each
        checked call: a snapshot taken at the drain would pass only by the next one). ``current``: called by the
        checked call right after its :meth:`begin`, so the checks' stream is the current one and is not entered
        again."""
        if self.seq == self.snapped_seq:
            return  # no check since the last snapshot: that one (or a reset read earlier) says it all
        self.snapped_seq = self.seq
        self.snaps += 1
        slot = self.snaps % len(self.host)
        if self.cuda and self.stream is not None:
            if current:
                self.host[slot].copy_(self.buf, non_blocking=True)
                self.events[slot].record(self.stream)
            else:
                with torch.cuda.stream(self.stream):
                    self.host[slot].copy_(self.buf, non_blocking=True)
                    self.events[slot].record(self.stream)
        else:
            self.host[slot].copy_(self.buf)
        self.slot_snap[slot] = self.snaps

    def take(self, *, wait: bool = False) -> Finding | None:
        """The finding in the newest snapshot whose device work has finished (``wait``: snapshot now and
        synchronize, for error paths), if it was not reported yet; the record is then reset on the checks'
        stream."""
        if wait:
            self.snapshot()
        ready = [i for i, s in enumerate(self.slot_snap) if s]
        if wait and self.cuda:
            for i in ready:
                self.events[i].synchronize()
        done = [i for i in ready if not self.cuda or self.events[i].query()]
        if not done:
            return None
        newest = max(done, key=lambda i: self.slot_snap[i])
        raw = self.host[newest].tolist()
        for i in done:
            if self.slot_snap[i] <= self.slot_snap[newest]:
                self.slot_snap[i] = 0  # read (or superseded by a newer snapshot that has passed)
        if raw[_COUNT] == 0:  # the clean record of nearly every step: no dict built for it
            return None
        vals = dict(zip(FIELDS, (int(v) for v in raw), strict=True))
        if vals["call"] <= self.reported:
            return None
        self.reported = vals["call"]
        if self.cuda and self.stream is not None:
            with torch.cuda.stream(self.stream):  # ordered after every check enqueued so far
                self.buf.zero_()
        else:
            self.buf.zero_()
        return Finding(vals, self.calls.get(vals["call"]))
