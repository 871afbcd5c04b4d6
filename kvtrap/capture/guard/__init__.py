"""Device-side page-table guard that runs inside CUDA graphs.

``guard_page_table_`` (Triton, capturable) checks and redirects; ``GuardRecord`` holds what it found;
``check_and_raise`` drains the record on the host and turns it into a dump + ``KVTrapError``.
The entry layout and flag bits live in :mod:`kvtrap.record.guard_entry`.
Importing this package imports torch and triton.
"""

from kvtrap.capture.guard.drain import check_and_raise
from kvtrap.capture.guard.kernel import guard_page_table_
from kvtrap.capture.guard.record import Drained, GuardEntry, GuardRecord

__all__ = [
    "Drained",
    "GuardEntry",
    "GuardRecord",
    "check_and_raise",
    "guard_page_table_",
]
