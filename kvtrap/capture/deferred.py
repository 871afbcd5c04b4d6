"""Allocator findings kept on the device until SGLang waits for a step anyway (``KVTRAP_ALLOCATOR_TRAP=drain``).

The allocator checks judge device tensors (the SWA slots an alloc hands out, the pages a free returns). Read on
the host at the call, each check is a host sync; in SGLang 0.5.23's overlap scheduler the allocator runs on the
schedule stream, which waits on the running forward, so such a sync also stalls the CPU until that forward ends
and the next step is launched late. In drain mode a check only enqueues device work: its reason codes go into a
small per-allocator record (the first finding wins until it is read), copied without blocking to pinned
host memory, with a CUDA event behind the copy. Where SGLang waits for a step's results
(:mod:`kvtrap.capture.hooks.step_drain`) kvtrap asks the event (no wait) and, once it has passed, reads the
pinned copy: zero means nothing was found. A finding is judged there by the same verdict as in call mode, with
the call's own tensors (kept by reference), and raised before that step's tokens reach a client.

The price, said in the docs: the faulty result has been used by then (a page freed twice may have been handed
out again, a slot outside the pool written): the trap says so, a step or more late, instead of preventing it.
Call mode (``KVTRAP_ALLOCATOR_TRAP=call``) prevents it at a host sync per call.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

#: The record's fields, in order (one int64 each).
FIELDS = ("count", "code", "position", "value", "owner", "call")
#: Calls remembered for judging a finding: a finding older than this many checked calls is reported without
#: the call's tensors.
REMEMBERED_CALLS = 256

Judge = Callable[[dict[str, int]], Any]  # the finding's fields -> Verdict


@dataclass
class Finding:
    fields: dict[str, int]
    judge: Judge | None  # None: the call fell out of the remembered ones


class Findings:
    """One allocator's device-side record and the host-side calls it may point at."""

    def __init__(self, device: torch.device, session: Any = None) -> None:
        self.device = device
        self.session = session  # the armed session whose checks fill it
        cuda = device.type == "cuda"
        self.buf = torch.zeros(len(FIELDS), dtype=torch.int64, device=device)
        self.host = torch.zeros(len(FIELDS), dtype=torch.int64, pin_memory=cuda) if cuda else self.buf
        self.event = torch.cuda.Event() if cuda else None
        self.recorded = False  # a check ran since the last read
        self.calls: OrderedDict[int, Judge] = OrderedDict()
        self.seq = 0

    def add(self, codes: torch.Tensor, values: torch.Tensor, owners: torch.Tensor | None, judge: Judge) -> None:
        """Fold one checked call into the record: ``codes`` per element (0 fine), ``values`` the ids judged,
        ``owners`` what kvtrap's record said of them (or None). Enqueues device work only."""
        if codes.numel() == 0:
            return
        self.seq += 1
        self.calls[self.seq] = judge
        while len(self.calls) > REMEMBERED_CALLS:
            self.calls.popitem(last=False)
        hit = codes > 0
        first = torch.argmax(hit.to(torch.int8))  # the first hit (0 when there is none: then unused)
        seq = torch.full((), self.seq, dtype=torch.int64, device=codes.device)
        owner = owners[first] if owners is not None else torch.full_like(seq, -1)
        new = torch.stack([hit.sum(), codes[first], first, values[first], owner, seq]).to(torch.int64)
        take = (new[0] > 0) & (self.buf[0] == 0)  # the first finding wins until it is read
        self.buf.copy_(torch.where(take, new, self.buf))
        if self.host is not self.buf:
            self.host.copy_(self.buf, non_blocking=True)
            assert self.event is not None
            self.event.record()
        self.recorded = True

    def take(self) -> Finding | None:
        """The finding, if the device work behind the last check has finished and found something; the record
        is then reset. Never waits: an unfinished check is read at a later drain."""
        if not self.recorded:
            return None
        if self.event is not None and not self.event.query():
            return None
        vals = dict(zip(FIELDS, (int(v) for v in self.host.tolist()), strict=True))
        self.recorded = False
        if vals["count"] == 0:
            return None
        self.buf.zero_()
        if self.host is not self.buf:
            self.host.zero_()
        return Finding(vals, self.calls.get(vals["call"]))
