"""kvtrap: turn paged-KV illegal-address crashes in SGLang into deterministic Python exceptions + dumps.

Public API: :func:`armed` (arm the traps in-process), :class:`KVTrapError`, :class:`Violation`,
:class:`Config`, :func:`load_dump`. Importing kvtrap imports neither torch nor SGLang.
"""

from __future__ import annotations

from kvtrap.config import Config, ConfigError
from kvtrap.record.dumpfile import Dump, DumpError, load_dump
from kvtrap.record.violation import KVTrapError, Violation

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "Dump",
    "DumpError",
    "KVTrapError",
    "Violation",
    "armed",
    "load_dump",
    "__version__",
]


def armed(**settings: object):
    """Arm kvtrap's hooks in this process for the ``with`` block; see :func:`kvtrap.capture.arming.armed`."""
    from kvtrap.capture.arming import armed as _armed

    return _armed(**settings)
