"""Kept only for ``repro/runner.py`` (owned by another change): the dump reader lives in
:mod:`kvtrap.record.dumpfile`. Delete this file once runner.py imports ``kvtrap.record.dumpfile``."""

from kvtrap.record.dumpfile import find_dumps

__all__ = ["find_dumps"]
