"""Arming and disarming kvtrap's hooks: the ``armed()`` context manager and the plugin's process-wide arm.

Both paths install the same wrappers (:func:`kvtrap.hooks.all_targets`). Sessions stack: the innermost
``armed()`` block's config is the one hooks use, and the wrappers are removed when the last session
ends. The plugin's session never ends. When nothing is armed the original methods are in place, so a
disarmed kvtrap costs nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from kvtrap import patching
from kvtrap.config import Config
from kvtrap.record.dumpfile import reset_dump_count
from kvtrap.session import Session

_lock = threading.RLock()
_stack: list[Session] = []


def current() -> Session | None:
    """The innermost armed session, or ``None``. Called on every hooked call: keep it trivial."""
    return _stack[-1] if _stack else None


def _push(config: Config) -> Session:
    from kvtrap.hooks import all_targets

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
    from kvtrap.hooks import all_targets

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
    from kvtrap import inject

    wanted: list[str] = []
    for session in _stack:
        wanted.extend(name for name in session.config.inject if name not in wanted)
    inject.sync(wanted)


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
