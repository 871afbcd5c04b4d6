"""An armed kvtrap session (its frozen config, and what happens when a hook finds a violation), and the
stack of armed sessions that every hook reads through :func:`current`.

Hooks, fixes and the guard import this module; :mod:`kvtrap.capture.arming` (above them) pushes and
pops sessions and installs the hooks, so nothing below arming imports arming.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtrap.config import Config
from kvtrap.record.context import Context
from kvtrap.record.dumpfile import write_dump
from kvtrap.record.violation import KVTrapError, Violation

logger = logging.getLogger("kvtrap")

_stack: list[Session] = []  # innermost last; changed only by kvtrap.capture.arming under its lock


def current() -> Session | None:
    """The innermost armed session, or ``None``. Called on every hooked call: keep it trivial."""
    return _stack[-1] if _stack else None


def armed_sessions() -> tuple[Session, ...]:
    return tuple(_stack)


@dataclass
class Session:
    """Per-arming mutable bookkeeping around an immutable :class:`Config`.

    ``log`` mode deduplicates by signature (kind, hook, layer, table): the same stale state seen on
    every layer of every step is logged and dumped once, then only counted.
    """

    config: Config
    counts: dict[tuple[Any, ...], int] = field(default_factory=dict)
    logged: int = 0
    warned: set[str] = field(default_factory=set)
    last_error: KVTrapError | None = None
    process_wide: bool = False  # the plugin's session, never popped
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def warn_once(self, key: str, message: str) -> None:
        with self._lock:
            if key in self.warned:
                return
            self.warned.add(key)
        logger.warning("kvtrap: %s", message)

    def report(
        self,
        violation: Violation,
        context: Context,
        tensors: Mapping[str, Any],
        *,
        safe_to_continue: bool = False,
    ) -> None:
        """Dump and raise, or (``log`` mode, and only when continuing is safe) dump, log and return.

        ``safe_to_continue`` is true when nothing out of bounds will be launched if the caller goes on:
        index-space and drift findings before ids outgrow the pool, or bad entries the device guard
        already redirected. Anything else raises in both modes, since going on would crash the process
        and lose the evidence.
        """
        raise_now = self.config.mode == "raise" or not safe_to_continue
        signature = (violation.kind, violation.where, violation.layer_id, violation.table)
        with self._lock:
            seen = self.counts.get(signature, 0)
            self.counts[signature] = seen + 1
        if not raise_now and seen:
            return  # already logged and dumped once in this session
        path, dump_error = self._dump(violation, context, tensors)
        error = KVTrapError(violation, path, dump_error)
        if raise_now:
            self.last_error = error
            raise error
        with self._lock:
            self.logged += 1
            quiet = self.logged > self.config.log_limit
        if not quiet:
            logger.warning("%s (mode=log: continuing)", error)
        elif self.logged == self.config.log_limit + 1:
            logger.warning("kvtrap: log limit (%d) reached; further violations are counted only",
                           self.config.log_limit)

    def _dump(
        self, violation: Violation, context: Context, tensors: Mapping[str, Any]
    ) -> tuple[Path | None, str | None]:
        try:
            path = write_dump(violation, context, tensors, self.config)
        except Exception as exc:  # a failing dump must never hide the trap
            return None, f"{type(exc).__name__}: {exc}"
        if path is None:
            return None, f"dump cap reached (KVTRAP_MAX_DUMPS={self.config.max_dumps})"
        return path, None
