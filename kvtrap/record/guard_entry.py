"""The device guard's record layout: one int64 row per bad entry, and the bits of its ``flags`` field.

Shared by the Triton kernels that append entries (:mod:`kvtrap.capture.guard.kernel`, which wraps these values
as ``tl.constexpr`` globals), the host drain, and the report tools that read a dump's ``guard_entries``.
Change a value here and every reader and writer follows; ``dumps/FORMAT.md`` documents them.
"""

from __future__ import annotations

#: Entry fields, in column order.
ENTRY_FIELDS = ("table_id", "layer_id", "row", "column", "value", "bound", "flags")
ENTRY_WIDTH = len(ENTRY_FIELDS)
COL_TABLE_ID, COL_LAYER_ID, COL_ROW, COL_COLUMN, COL_VALUE, COL_BOUND, COL_FLAGS = range(ENTRY_WIDTH)

#: ``flags`` bits.
FLAG_OUT_OF_RANGE = 1  # value outside [lower, bound): redirected to the safe page
FLAG_SWA_MISMATCH = 2  # SWA entry != full->SWA mapping of the full entry (recorded, not changed)
FLAG_SEQLEN_EXCEEDS_TABLE = 4  # cdiv(seqlen, page_size) > table width (column=width, value=pages needed)
#: ragged (CSR) index sets only: ``indptr[column]`` breaks the offsets (row 0 not starting at 0, an end before
#: its start, or past the ids' length ``bound``); ``value`` = that offset. Recorded, not changed.
FLAG_INDPTR_MALFORMED = 8

#: flag bit -> the name used in ``violation.details.entries_by_flag``.
FLAG_NAMES = {
    FLAG_OUT_OF_RANGE: "out_of_range",
    FLAG_SWA_MISMATCH: "swa_mismatch",
    FLAG_SEQLEN_EXCEEDS_TABLE: "seqlen_exceeds_table",
    FLAG_INDPTR_MALFORMED: "indptr_malformed",
}
