"""Turning a non-empty guard record into a dump and a :class:`~kvtrap.errors.KVTrapError` (or a log line).

Call :func:`check_and_raise` at the drain point, outside any CUDA-graph capture:

* eager forward: right after the attention forward of the step (or the whole model forward);
* CUDA-graph replay: right after the runner's ``replay`` returns (``synced=False``: one device read),
  or after SGLang's ``copy_done.synchronize()`` for the step (``synced=True`` with
  ``GuardRecord.publish_`` captured at the end of the graph: free when nothing was recorded).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from kvtrap.config import Config
from kvtrap.dumpfile import write_dump
from kvtrap.errors import KVTrapError, Violation
from kvtrap.guard.record import GuardRecord

logger = logging.getLogger("kvtrap.guard")

_log_lock = threading.Lock()
_logged = 0


def check_and_raise(
    record: GuardRecord,
    config: Config,
    context: Mapping[str, Any] | None = None,
    tensors: Mapping[str, Any] | None = None,
    *,
    synced: bool = False,
    where: str = "device_guard",
) -> Violation | None:
    """Drain ``record``; if the guard recorded anything, dump it and raise (``raise``) or log (``log``).

    Returns ``None`` when nothing was recorded, else (``log`` mode) the violation. ``context`` and
    ``tensors`` go into the dump (the page tables in ``tensors`` already hold the redirected values;
    the original ones are in the ``guard_entries`` tensor). A failed dump never hides the trap.
    """
    drained = record.drain(synced=synced)
    if not drained:
        return None
    violation = record.to_violation(drained, where=where)
    ctx = dict(context or {})
    ctx["guard"] = {
        "records": len(drained.entries),
        "total": drained.total,
        "dropped": drained.dropped,
        "redirected_to": record.safe_page,
        "capacity": record.capacity,
        "tables": dict(record.describe_tables()),
    }
    ctx.setdefault("hook", where)
    all_tensors: dict[str, Any] = dict(tensors or {})
    all_tensors["guard_entries"] = record.entries_array(drained)
    path = None
    dump_error = None
    try:
        path = write_dump(violation, ctx, all_tensors, config)
    except Exception as exc:  # a full disk must not turn a trap into a silent pass
        dump_error = f"{type(exc).__name__}: {exc}"
    if config.mode == "raise":
        raise KVTrapError(violation, path, dump_error)
    _log(violation, path, dump_error, config)
    return violation


def _log(violation: Violation, path: object, dump_error: str | None, config: Config) -> None:
    global _logged
    with _log_lock:
        _logged += 1
        n = _logged
    if n > config.log_limit:
        return
    msg = f"kvtrap [{violation.kind}] in {violation.where}: {violation.describe()}"
    if path is not None:
        msg += f" Dump: {path}."
    elif dump_error:
        msg += f" The dump could not be written: {dump_error}."
    if n == config.log_limit:
        msg += " (log limit reached: later guard events are counted, not logged)"
    logger.warning(msg)


def reset_log_count() -> None:
    global _logged
    with _log_lock:
        _logged = 0
