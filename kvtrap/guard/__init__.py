"""Device-side page-table guard that runs inside CUDA graphs.

``guard_page_table_`` (Triton, capturable) checks and redirects; ``GuardRecord`` holds what it found;
``check_and_raise`` drains the record on the host and turns it into a dump + ``KVTrapError``.
Importing this package imports torch and triton.
"""

from kvtrap.guard.drain import check_and_raise
from kvtrap.guard.kernel import (
    ENTRY_FIELDS,
    FLAG_OUT_OF_RANGE,
    FLAG_SEQLEN_EXCEEDS_TABLE,
    FLAG_SWA_MISMATCH,
    guard_page_table_,
)
from kvtrap.guard.record import Drained, GuardEntry, GuardRecord

__all__ = [
    "ENTRY_FIELDS",
    "FLAG_OUT_OF_RANGE",
    "FLAG_SEQLEN_EXCEEDS_TABLE",
    "FLAG_SWA_MISMATCH",
    "Drained",
    "GuardEntry",
    "GuardRecord",
    "check_and_raise",
    "guard_page_table_",
]
