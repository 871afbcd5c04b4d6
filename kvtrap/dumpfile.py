"""Kept only for code on other branches at merge time (repro/runner.py: find_dumps; the doctor's
prove_allocator_trap: load_dump): the dump reader lives in :mod:`kvtrap.record.dumpfile`. Delete this
file once those import ``kvtrap.record.dumpfile``."""

from kvtrap.record.dumpfile import find_dumps, load_dump

__all__ = ["find_dumps", "load_dump"]
