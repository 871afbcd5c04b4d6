"""Arming and disarming kvtrap's hooks: the ``armed()`` context manager and the plugin's process-wide arm.

Both paths install the same wrappers: the hooks (:mod:`kvtrap.capture.hooks`) and the default fixes
(:mod:`kvtrap.capture.fixes`). Sessions stack: the innermost
``armed()`` block's config is the one hooks use, and the wrappers are removed when the last session
ends. The plugin's session never ends. When nothing is armed the original methods are in place, so a
disarmed kvtrap costs nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from kvtrap.capture import bugs, fixes, hooks, patching
from kvtrap.capture.patching import MethodTarget
from kvtrap.capture.session import Session, _stack
from kvtrap.config import Config
from kvtrap.record.dumpfile import reset_dump_count

_lock = threading.RLock()


def all_targets() -> list[MethodTarget]:
    """Every method an armed kvtrap wraps, in a stable order: the hooks, then the default fixes (which
    act only when the session's config says fix=auto)."""
    return [*hooks.targets(), *fixes.targets()]


def _push(config: Config) -> Session:
    session = Session(config)
    with _lock:
        if not _stack:
            reset_dump_count()
        _stack.append(session)
        patching.install(all_targets())
    try:
        _after_arm(session)
    except BaseException:
        _pop(session)  # a refused setting (e.g. an unknown bug name) must not leave kvtrap armed
        raise
    return session


def _pop(session: Session) -> None:
    with _lock:
        if session in _stack:
            _stack.remove(session)
        _after_disarm()
        if not _stack:
            patching.uninstall(all_targets())


def _after_arm(session: Session) -> None:
    _sync_injections()


def _after_disarm() -> None:
    _sync_injections()


def _sync_injections() -> None:
    """Historical-bug injections are the union of what the armed sessions ask for: a bug injected by an
    inner ``armed()`` block goes away when that block ends, even if an outer session stays armed."""
    wanted: list[str] = []
    for session in _stack:
        wanted.extend(name for name in session.config.inject if name not in wanted)
    bugs.sync(wanted)


@contextmanager
def armed(**settings: object) -> Iterator[Session]:
    """Arm kvtrap for the block: ``with kvtrap.armed(mode="raise", dump_dir="dumps"): ...``.

    Keyword settings override ``KVTRAP_*`` environment variables (see :class:`kvtrap.Config`). The
    originals are restored on exit, also when the block raises; nesting is safe.
    """
    session = _push(Config.from_env(**settings))
    try:
        yield session
    finally:
        _pop(session)


def arm_process(config: Config) -> Session:
    """Arm for the rest of the process (the SGLang plugin). Idempotent."""
    with _lock:
        for session in _stack:
            if session.process_wide:
                return session
        session = _push(config)
        session.process_wide = True
        return session
