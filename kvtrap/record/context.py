"""The typed pieces of a dump's ``context``: what the hook saw when the trap fired.

Writers (the capture hooks, the device-guard drain, the weight-free repro) build a :class:`Context`
from these pieces; :func:`kvtrap.record.dumpfile.load_dump` checks a manifest's ``context`` against
the same classes, so a field has one type, said once. ``dumps/FORMAT.md`` documents each field.

A :class:`Context` field left at :data:`ABSENT` is not written: an allocator dump has no ``layer``,
an attention dump no ``free_pages``. ``None`` is written as ``null`` (e.g. an unknown forward mode).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from kvtrap.record import schema


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


#: Marks a field that is not written to the manifest.
ABSENT: Any = _Absent()


def _class_key() -> Any:
    return field(metadata={"key": "class"})


@dataclass(frozen=True)
class LayerInfo:
    """``context.layer``: the layer as resolved from the *live* pool's ``layers_mapping``."""

    id: int | None
    type: str | None  # "swa" or "full": the pool the layer reads
    window: int | None
    index_in_pool: int | None


@dataclass(frozen=True)
class PoolPages:
    """``context.pools.<name>``: page count of a (sub-)pool, and its token rows when known."""

    pages: int | None
    rows: int | None = ABSENT


@dataclass(frozen=True)
class LivePool:
    """``context.live_pool``: ``backend.token_to_kv_pool`` at forward time."""

    class_: str = _class_key()
    id: str = ""


@dataclass(frozen=True)
class BackendState:
    """``context.backend``: the attention backend's cached SWA state, against the live pool."""

    class_: str = _class_key()
    use_sliding_window_kv_pool: bool | None = None
    swa_kv_pool: str | None = None
    swa_kv_pool_is_live: bool | None = None
    has_swa_full_to_swa_mapping: bool | None = None
    swa_mapping_is_live: bool | None = None
    # what the page-table width is sized from (ceil(max_context_len / page_size)), and how far
    # speculative verify rows may run past it (explain: spec-rows-past-context)
    max_context_len: int | None = None
    speculative_num_draft_tokens: int | None = None


@dataclass(frozen=True)
class TableInfo:
    """``context.tables.<name>``: a page table's pool and bound, and whether this layer reads it."""

    pool: str | None
    bound: int | None
    handed_to_layer: bool | None
    shape: list[int] = ABSENT


@dataclass(frozen=True)
class GuardTableInfo:
    """``context.guard.tables.<name>``: decodes the table id of each guard entry."""

    id: int
    pool: str | None
    layer_id: int | None


@dataclass(frozen=True)
class GuardSummary:
    """``context.guard``: what the device guard's record held when it was drained."""

    records: int
    total: int
    dropped: int
    redirected_to: int
    capacity: int
    tables: dict[str, GuardTableInfo]


@dataclass(frozen=True)
class Context:
    """``context``: every field a hook may write (each hook writes its own subset, see FORMAT.md)."""

    hook: str = ABSENT
    # attention hooks
    forward_mode: str | None = ABSENT
    speculative: bool | None = ABSENT
    batch_size: int = ABSENT
    page_size: int = ABSENT
    capturing: bool = ABSENT
    layer: LayerInfo = ABSENT
    pools: dict[str, PoolPages | None] = ABSENT
    live_pool: LivePool = ABSENT
    backend: BackendState = ABSENT
    tables: dict[str, TableInfo] = ABSENT
    # device guard
    guard: GuardSummary = ABSENT
    # allocator hooks
    size_full: int = ABSENT
    size_swa: int = ABSENT
    free_pages: dict[str, int | None] = ABSENT
    num_tokens: int = ABSENT
    args: dict[str, Any] = ABSENT

    def to_json(self) -> dict[str, Any]:
        return schema.to_json(self, ABSENT)

    def with_(self, **changes: Any) -> Context:
        return replace(self, **changes)

    def has(self, name: str) -> bool:
        return getattr(self, name) is not ABSENT
