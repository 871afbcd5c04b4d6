"""Turning a non-empty guard record into a dump and a :class:`~kvtrap.record.violation.KVTrapError` (or a log line).

Call :func:`check_and_raise` at the drain point, outside any CUDA-graph capture:

* eager forward: right after the guard launches, before any layer reads the tables;
* CUDA-graph replay: after SGLang's ``copy_done.synchronize()`` for the step (``synced=True`` with
  ``GuardRecord.publish_`` captured in the graph: free when nothing was recorded), or right after the
  runner's replay returns (``synced=False``: one device read).

Reporting goes through :meth:`kvtrap.capture.session.Session.report`, the one path every kvtrap trap uses
(dump, raise in ``raise`` mode, rate-limited log in ``log`` mode). Entries the guard redirected are
safe to continue from, so ``log`` mode really continues.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvtrap.capture.guard.record import GuardRecord
from kvtrap.capture.session import Session
from kvtrap.config import Config
from kvtrap.record.context import Context
from kvtrap.record.violation import Violation


def check_and_raise(
    record: GuardRecord,
    config: Config | Session,
    context: Context | None = None,
    tensors: Mapping[str, Any] | None = None,
    *,
    synced: bool = False,
    where: str = "device_guard",
) -> Violation | None:
    """Drain ``record``; if the guard recorded anything, dump it and raise (``raise``) or log (``log``).

    ``config`` is the armed session (or a bare :class:`Config`, which gets a session of its own).
    Returns ``None`` when nothing was recorded, else (``log`` mode) the violation. ``context`` and
    ``tensors`` go into the dump (the page tables in ``tensors`` already hold the redirected values;
    the original ones are in the ``guard_entries`` tensor). A failed dump never hides the trap.
    """
    session = config if isinstance(config, Session) else Session(config)
    drained = record.drain(synced=synced)
    if not drained:
        return None
    violation = record.to_violation(drained, where=where)
    ctx = context or Context()
    ctx = ctx.with_(guard=record.summary(drained), hook=ctx.hook if ctx.has("hook") else where)
    all_tensors: dict[str, Any] = dict(tensors or {})
    all_tensors["guard_entries"] = record.entries_array(drained)
    session.report(violation, ctx, all_tensors, safe_to_continue=True)
    return violation
