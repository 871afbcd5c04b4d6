"""The kinds of violation kvtrap reports. Dumps carry the kind's value; the explain rules key on it."""

from __future__ import annotations

from enum import Enum


class Kind(str, Enum):
    """A violation kind. A ``str`` subclass: ``Kind.X == "x"`` holds and JSON writes the plain value."""

    PAGE_TABLE_OUT_OF_RANGE = "page_table_out_of_range"  # a live page id outside [0, pages of the pool read)
    INDEX_SPACE_MISMATCH = "index_space_mismatch"  # an SWA layer handed the full-pool table (or vice versa)
    SWA_STATE_DRIFT = "swa_state_drift"  # backend SWA state cached at init disagrees with the live pool
    SEQLENS_EXCEED_TABLE = "seqlens_exceed_table"  # cache_seqlens needs more pages than the table is wide
    SWA_SLOT_OUT_OF_RANGE = "swa_slot_out_of_range"  # the allocator handed out an SWA slot outside the pool
    SWA_FREE_RESERVED_PAGE = "swa_free_reserved_page"  # a free returns the reserved SWA page 0 to the free list
    SWA_DOUBLE_FREE = "swa_double_free"  # a free returns an SWA page that is not handed out (already free)
    SWA_FREE_NOT_OWNED = "swa_free_not_owned"  # a free returns an SWA page paired with another full page
    PADDING_PAGE_FOR_REAL_REQUEST = "padding_page_for_real_request"  # a real request's live row reads page 0
    KV_WRITE_OUT_OF_RANGE = "kv_write_out_of_range"  # a layer's K/V store would write outside its pool's rows
    KV_INDPTR_MALFORMED = "kv_indptr_malformed"  # a ragged kv_indptr: not from 0, decreasing, or past kv_indices
    KV_INDICES_OUT_OF_RANGE = "kv_indices_out_of_range"  # a live ragged KV id outside [0, rows) of the pool read

    # plain text in messages and file names (Python 3.11+ would otherwise format the member name)
    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def parse(cls, value: str) -> Kind | str:
        """The member for a known value; an unknown value (a newer kvtrap's kind) stays a plain string."""
        try:
            return cls(value)
        except ValueError:
            return value
