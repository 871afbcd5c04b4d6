"""The record: what a trap writes and every report tool reads. Imports neither torch nor Triton.

* :mod:`.kinds`: the violation kinds (:class:`Kind`);
* :mod:`.violation`: :class:`Violation` and the exception that carries it, :class:`KVTrapError`;
* :mod:`.context`: the typed pieces of a dump's ``context`` (layer, pools, backend, tables, guard...);
* :mod:`.guard_entry`: the device guard's entry layout and flag bits, shared with its Triton kernels;
* :mod:`.schema`: type validation of JSON against those dataclasses;
* :mod:`.dumpfile`: writing and reading dumps (``dumps/FORMAT.md``), :class:`DumpError`.
"""

from __future__ import annotations

from kvtrap.record.context import Context
from kvtrap.record.dumpfile import Dump, DumpError, find_dumps, load_dump, write_dump
from kvtrap.record.kinds import Kind
from kvtrap.record.violation import KVTrapError, Violation

__all__ = ["Context", "Dump", "DumpError", "KVTrapError", "Kind", "Violation", "find_dumps", "load_dump",
           "write_dump"]
