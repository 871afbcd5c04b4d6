"""The guard's preallocated device record and its host-side drain.

A :class:`GuardRecord` is allocated once (outside any CUDA graph) and handed to every guard launch.
The kernel appends entries with one atomic per program; nothing reads the record on the device side
again, so the launches can be captured and replayed freely. The host drains it after the step:

* eager forwards: right after the forward (``drain()`` synchronises: call it outside capture);
* CUDA-graph replay: after ``replay`` returns, or, without an extra synchronisation, after SGLang's own
  ``copy_done.synchronize()`` when :meth:`GuardRecord.publish_` was captured at the end of the graph
  (then ``pending(synced=True)`` reads a pinned host copy of the counter and only a non-zero count
  costs a device read).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from kvtrap.record.context import GuardSummary, GuardTableInfo
from kvtrap.record.guard_entry import (
    ENTRY_WIDTH,
    FLAG_INDPTR_MALFORMED,
    FLAG_NAMES,
    FLAG_OUT_OF_RANGE,
    FLAG_SEQLEN_EXCEEDS_TABLE,
)
from kvtrap.record.kinds import Kind
from kvtrap.record.violation import Violation

DEFAULT_CAPACITY = 64
_MAX_ROWS_LISTED = 64


class GuardEntry(NamedTuple):
    table_id: int
    layer_id: int
    row: int
    column: int
    value: int
    bound: int
    flags: int


@dataclass(frozen=True)
class GuardTable:
    """What the host knows about a table id: its name in dumps, the pool it indexes, the safe page.
    ``ragged``: a CSR index set (token-slot ids, :mod:`kvtrap.capture.guard.ragged_kernel`), not a page table."""

    name: str
    pool: str | None = None
    layer_id: int | None = None
    layer_type: str | None = None
    window: int | None = None
    ragged: bool = False


@dataclass
class Drained:
    """One drain: ``total`` entries were appended since the last drain, ``entries`` the first ones kept."""

    total: int
    entries: list[GuardEntry] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return self.total - len(self.entries)

    def __bool__(self) -> bool:
        return self.total > 0


class GuardRecord:
    """Counter (int32 ``[1]``) plus the first ``capacity`` entries (int64 ``[capacity, ENTRY_WIDTH]``) on ``device``.

    Allocate it before capture and keep it alive as long as any graph that captured a guard launch.
    ``register_table`` hands out the small integer ids the kernel writes into entries.
    """

    def __init__(
        self, capacity: int = DEFAULT_CAPACITY, device: torch.device | str | None = None, safe_page: int = 0
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.capacity = int(capacity)
        self.safe_page = int(safe_page)
        self.counter = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.entries = torch.zeros(self.capacity, ENTRY_WIDTH, dtype=torch.int64, device=self.device)
        self.tables: dict[int, GuardTable] = {}
        self._names: dict[str, int] = {}
        self._lock = threading.Lock()
        self.host_counter: torch.Tensor | None = None
        if self.device.type == "cuda":
            self.host_counter = torch.zeros(1, dtype=torch.int32, pin_memory=True)

    # ------------------------------------------------------------------------------- table ids
    def register_table(
        self,
        name: str,
        pool: str | None = None,
        layer_id: int | None = None,
        layer_type: str | None = None,
        window: int | None = None,
        ragged: bool = False,
    ) -> int:
        """Id for the table called ``name`` (same name, same id). Call outside the hot path or cache it."""
        with self._lock:
            if name in self._names:
                return self._names[name]
            tid = len(self._names)
            self._names[name] = tid
            self.tables[tid] = GuardTable(name, pool, layer_id, layer_type, window, ragged)
            return tid

    def table_name(self, table_id: int) -> str:
        t = self.tables.get(table_id)
        return t.name if t else f"table{table_id}"

    # ---------------------------------------------------------------------------- device side
    def reset_(self) -> None:
        """Zero the counter (a device op, no sync). Entries past the counter are never read."""
        self.counter.zero_()
        if self.host_counter is not None:
            self.host_counter.zero_()

    def publish_(self) -> None:
        """Queue a copy of the counter into pinned host memory (no sync; may be captured in a graph)."""
        if self.host_counter is not None:
            self.host_counter.copy_(self.counter, non_blocking=True)

    # ------------------------------------------------------------------------------ host side
    def pending(self, synced: bool = False) -> int:
        """Entries appended since the last drain. ``synced=True`` trusts the published host copy (no sync:
        valid only once the stream that ran ``publish_`` has been synchronised); otherwise a device read."""
        if synced and self.host_counter is not None:
            return int(self.host_counter.item())  # a host tensor: no device read, and no indexing op per drain
        _refuse_in_capture("GuardRecord.pending")
        return int(self.counter[0].item())

    def drain(self, synced: bool = False) -> Drained:
        """Read and reset the record: a host sync (skipped when ``synced`` and the published count is 0).

        Raises ``RuntimeError`` during CUDA-graph capture, where a sync would abort the capture.
        """
        total = self.pending(synced=synced)
        if total == 0:
            return Drained(0)
        _refuse_in_capture("GuardRecord.drain")
        total = int(self.counter[0].item())  # the published copy may be older than the device
        kept = min(total, self.capacity)
        rows = self.entries[:kept].to("cpu").tolist()
        self.reset_()
        # atomics append in no fixed order: sort so the "first" entry is the same run to run
        ents = sorted((GuardEntry(*map(int, r)) for r in rows), key=lambda e: (e.table_id, e.row, e.column))
        return Drained(total, ents)

    # ---------------------------------------------------------------------------- reporting
    def to_violation(self, drained: Drained, where: str = "device_guard") -> Violation:
        """The finding a drain holds, as a kvtrap :class:`Violation` (first out-of-range entry first)."""
        if not drained:
            raise ValueError("nothing was recorded")
        ents = drained.entries
        if not ents:  # capacity 0 kept nothing: should not happen (capacity >= 1)
            return Violation(Kind.PAGE_TABLE_OUT_OF_RANGE, "device guard recorded bad entries", where=where)
        first = _pick_first(ents)
        info = self.tables.get(first.table_id)
        name = info.name if info else f"table{first.table_id}"
        layer_id = first.layer_id if first.layer_id >= 0 else (info.layer_id if info else None)
        same = [e for e in ents if e.table_id == first.table_id and e.flags & first.flags]
        rows = tuple(sorted({e.row for e in same}))[:_MAX_ROWS_LISTED]
        by_flag = {name: sum(1 for e in ents if e.flags & bit) for bit, name in FLAG_NAMES.items()}
        tables = sorted({self.table_name(e.table_id) for e in ents})
        details: dict[str, Any] = {
            "recorded": len(ents),
            "dropped": drained.dropped,
            "redirected_to": self.safe_page,
            "entries_by_flag": by_flag,
            "tables": tables,
            "first_flags": first.flags,
        }
        ragged = bool(info and info.ragged)
        if first.flags & FLAG_OUT_OF_RANGE and ragged:
            kind, fatal = Kind.KV_INDICES_OUT_OF_RANGE, True
            summary = (
                f"Device guard: {by_flag['out_of_range']} live KV id(s) in {name} were outside [0, {first.bound})"
                f" (token rows of the {info.pool if info else '?'} pool), first {first.value} at request"
                f" {first.row}, position {first.column}; the guard redirected them to slot {self.safe_page} so the"
                " attention kernel completed (attention output for those requests is not valid)"
            )
            value, lower, bound, column = first.value, 0, first.bound, first.column
        elif first.flags & FLAG_OUT_OF_RANGE:
            kind, fatal = Kind.PAGE_TABLE_OUT_OF_RANGE, True
            summary = (
                f"Device guard: {by_flag['out_of_range']} live page id(s) in {name} were outside the pool;"
                f" the guard redirected them to page {self.safe_page} so the attention kernel completed"
                " (attention output for those rows is not valid)"
            )
            value, lower, bound, column = first.value, 0, first.bound, first.column
        elif first.flags & FLAG_INDPTR_MALFORMED:
            kind, fatal = Kind.KV_INDPTR_MALFORMED, True
            name = name.replace("indices", "indptr")
            summary = (
                f"Device guard: {by_flag['indptr_malformed']} offset(s) of {name} break the ranges:"
                f" [{first.column}] = {first.value} ({name.replace('indptr', 'indices')} holds {first.bound} ids;"
                " offsets start at 0 and never decrease); recorded, not changed"
            )
            value, lower, bound, column = first.value, 0, first.bound + 1, first.column
        elif first.flags & FLAG_SEQLEN_EXCEEDS_TABLE:
            kind, fatal = Kind.SEQLENS_EXCEED_TABLE, True
            summary = (
                f"Device guard: cache_seqlens of row {first.row} needs {first.value} pages but {name}"
                f" has {first.bound} columns"
            )
            value, lower, bound, column = first.value, 0, first.bound + 1, first.column
        else:
            kind, fatal = Kind.INDEX_SPACE_MISMATCH, False
            summary = (
                f"Device guard: {by_flag['swa_mismatch']} live entries of {name} differ from the full->SWA"
                " mapping applied to the full table (SWA translation skipped or stale)"
            )
            value, lower, bound, column = first.value, 0, first.bound, first.column
        return Violation(
            kind=kind,
            summary=summary,
            where=where,
            layer_id=layer_id,
            layer_type=info.layer_type if info else None,
            window=info.window if info else None,
            table=name,
            pool=info.pool if info else None,
            row=first.row,
            column=column,
            value=value,
            lower=lower,
            bound=bound,
            count=drained.total,
            rows=rows,
            fatal=fatal,
            details=details,
        )

    def entries_array(self, drained: Drained) -> Any:
        """The kept entries as an int64 numpy array ``[n, ENTRY_WIDTH]`` (the dump tensor ``guard_entries``)."""
        import numpy as np

        return np.asarray([list(e) for e in drained.entries], dtype=np.int64).reshape(-1, ENTRY_WIDTH)

    def summary(self, drained: Drained) -> GuardSummary:
        """``context.guard`` of the dump for this drain."""
        return GuardSummary(
            records=len(drained.entries),
            total=drained.total,
            dropped=drained.dropped,
            redirected_to=self.safe_page,
            capacity=self.capacity,
            tables={t.name: GuardTableInfo(tid, t.pool, t.layer_id) for tid, t in self.tables.items()},
        )


def _pick_first(entries: list[GuardEntry]) -> GuardEntry:
    for flag in (FLAG_OUT_OF_RANGE, FLAG_INDPTR_MALFORMED, FLAG_SEQLEN_EXCEEDS_TABLE):
        for e in entries:
            if e.flags & flag:
                return e
    return entries[0]


def _refuse_in_capture(what: str) -> None:
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{what} synchronises with the device and cannot run during CUDA-graph capture")
