"""Re-introducing historical SGLang bugs on purpose (``KVTRAP_INJECT``), so repros and fixes can be proven.

Each entry names a bug, says which SGLang versions it applies to, and knows how to enable and disable
itself. Entries are registered in ``BUGS``; ``enable()`` refuses unknown names with the list of known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvtrap.config import ConfigError


@dataclass(frozen=True)
class Bug:
    name: str
    title: str
    enable: Callable[[], None]
    disable: Callable[[], None]


BUGS: dict[str, Bug] = {}
_enabled: list[str] = []


def register(bug: Bug) -> None:
    BUGS[bug.name] = bug


def sync(names: Iterable[str]) -> None:
    """Make exactly ``names`` enabled: enable the missing ones (unknown names raise), disable the rest."""
    wanted = list(names)
    enable(wanted)
    for name in [n for n in _enabled if n not in wanted]:
        BUGS[name].disable()
        _enabled.remove(name)


def enable(names: Iterable[str]) -> None:
    """Enable bugs by name; names come from a :class:`kvtrap.config.Config`, which refused unknown ones."""
    for name in names:
        _load(name)
        if name not in _enabled:
            BUGS[name].enable()
            _enabled.append(name)


def disable_all() -> None:
    while _enabled:
        BUGS[_enabled.pop()].disable()


def enabled() -> tuple[str, ...]:
    return tuple(_enabled)


def _load(name: str) -> None:
    # Entries live in their own modules (kvtrap.bugs.BUGS) and register themselves on import.
    import importlib

    from kvtrap.bugs import BUGS as MODULES

    if name not in BUGS:
        if name not in MODULES:
            raise ConfigError(f"unknown bug to inject {name!r}; known: {', '.join(sorted(MODULES)) or 'none'}")
        importlib.import_module(MODULES[name])
