"""Row summaries of the page tables and index vectors in a dump. Pure numpy: no torch, no SGLang.

A page table is ``[bs, max_pages]`` and only each row's *live prefix* ``ceil(cache_seqlens / page_size)``
is meaningful (the rest of the buffer is whatever ``torch.empty`` left there). Every count here is over
live entries only, so a reader is never shown garbage beyond a row's end as if it were a bug.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtrap.record.dumpfile import ManifestRecord
from kvtrap.record.kinds import Kind

#: Tensors that hold page ids, ``[bs, max_pages]``.
PAGE_TABLES = ("page_table", "swa_page_table")
#: How many bad positions a summary keeps per row.
FIRST_BAD = 8


@dataclass(frozen=True)
class RowSummary:
    row: int
    seqlen: int | None  # cache_seqlens[row]; None when the dump has no cache_seqlens
    live: int  # live pages, clipped to the table width
    needed: int  # pages cache_seqlens needs (may exceed the width)
    min: int | None
    max: int | None
    bad: int  # live entries outside [lower, bound)
    negative: int  # live entries < 0
    first_bad: tuple[int, ...]  # columns of the first bad entries


@dataclass(frozen=True)
class TableSummary:
    """One 2-D page table: which pool bounds it, and a :class:`RowSummary` per row."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    pool: str | None
    lower: int
    bound: int | None
    handed_to_layer: bool | None
    rows: tuple[RowSummary, ...]

    @property
    def width(self) -> int:
        return int(self.shape[1]) if len(self.shape) > 1 else 0

    @property
    def live_ids(self) -> int:
        return sum(r.live for r in self.rows)

    @property
    def bad(self) -> int:
        return sum(r.bad for r in self.rows)

    @property
    def negative(self) -> int:
        return sum(r.negative for r in self.rows)

    @property
    def bad_rows(self) -> list[RowSummary]:
        return [r for r in self.rows if r.bad]

    @property
    def min(self) -> int | None:
        vals = [r.min for r in self.rows if r.min is not None]
        return min(vals) if vals else None

    @property
    def max(self) -> int | None:
        vals = [r.max for r in self.rows if r.max is not None]
        return max(vals) if vals else None

    @property
    def overflowing_rows(self) -> list[RowSummary]:
        """Rows whose ``cache_seqlens`` needs more pages than the table is wide."""
        return [r for r in self.rows if r.needed > r.live]


@dataclass(frozen=True)
class VectorSummary:
    """A 1-D index tensor (allocator outputs, ``cache_seqlens``...), with a bound when one is known."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    size: int
    min: int | float | None
    max: int | float | None
    lower: int | None = None
    bound: int | None = None
    bad: int = 0
    first_bad: tuple[int, ...] = ()
    duplicates: int = 0  # values that occur more than once (only counted for bounded index vectors)
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- primitives
def live_pages(cache_seqlens: np.ndarray, page_size: int) -> np.ndarray:
    """Pages each row needs: ``ceil(cache_seqlens / page_size)`` (int64, never negative)."""
    s = np.asarray(cache_seqlens).astype(np.int64).reshape(-1)
    ps = max(int(page_size), 1)
    return np.maximum((s + ps - 1) // ps, 0)


def live_mask(table: np.ndarray, pages: np.ndarray | None) -> np.ndarray:
    """Boolean ``[bs, width]``: True on each row's live prefix. ``pages=None`` marks the whole table live."""
    bs, width = table.shape
    if pages is None:
        return np.ones((bs, width), dtype=bool)
    n = np.zeros(bs, dtype=np.int64)
    k = min(bs, len(pages))
    n[:k] = np.minimum(pages[:k], width)
    return np.arange(width)[None, :] < n[:, None]


def bad_mask(table: np.ndarray, lower: int, bound: int | None) -> np.ndarray:
    t = table.astype(np.int64)
    bad = t < lower
    if bound is not None:
        bad |= t >= bound
    return bad


def parse_rows(spec: str, n: int) -> list[int]:
    """``"0,3-5,-1"`` -> ``[0, 3, 4, 5, n-1]``. Raises ``ValueError`` with a readable message."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        try:
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                i = int(part)
                out.append(i + n if i < 0 else i)
        except ValueError:
            raise ValueError(f"bad row spec {part!r}: use e.g. 0,3-5,-1") from None
    for i in out:
        if not 0 <= i < n:
            raise ValueError(f"row {i} out of range: the table has {n} row(s)")
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------------------- context
def page_size_of(record: ManifestRecord) -> int:
    ps = record.context.page_size
    return ps if isinstance(ps, int) and ps > 0 else 1


def pool_pages(record: ManifestRecord) -> dict[str, int]:
    """``{"full": pages, "swa": pages}`` from the context (only the pools the dump knows)."""
    pools = record.context.pools or {}
    return {name: int(info.pages) for name, info in pools.items() if info is not None and info.pages is not None}


def table_meta(record: ManifestRecord, name: str) -> tuple[str | None, int, int | None, bool | None]:
    """``(pool, lower, bound, handed_to_layer)`` for a page table.

    The bound is the page count of the pool the ids will be *read from*: the violation's bound when the
    violation is on this table; for the table handed to the layer, the pool the layer reads
    (``context.layer.type``), since that is what the kernel indexes; else the table's own pool.
    """
    ctx, viol = record.context, record.violation
    info = (ctx.tables or {}).get(name)
    pages = pool_pages(record)
    layer_type = (ctx.layer.type if ctx.layer is not None else None) or viol.layer_type
    handed = info.handed_to_layer if info is not None else None
    pool = info.pool if info is not None else None
    bound = info.bound if info is not None else None
    lower = 0
    if viol.table == name and viol.bound is not None:
        pool = viol.pool or pool
        bound = viol.bound
        if viol.lower is not None:
            lower = int(viol.lower)
    elif handed and layer_type in pages:
        pool, bound = layer_type, pages[layer_type]
    if pool is None:
        pool = "swa" if name.startswith("swa") else "full"
    if bound is None:
        bound = pages.get(pool)
    return pool, lower, (int(bound) if bound is not None else None), handed


# ------------------------------------------------------------------------------------------ summaries
def summarize_table(
    name: str,
    table: np.ndarray,
    cache_seqlens: np.ndarray | None,
    page_size: int,
    *,
    pool: str | None = None,
    lower: int = 0,
    bound: int | None = None,
    handed_to_layer: bool | None = None,
) -> TableSummary:
    t = np.asarray(table)
    if t.ndim != 2:
        t = t.reshape(t.shape[0] if t.ndim else 1, -1)
    bs, width = t.shape
    needed = live_pages(cache_seqlens, page_size) if cache_seqlens is not None else None
    mask = live_mask(t, needed)
    bad = bad_mask(t, lower, bound) & mask
    neg = (t.astype(np.int64) < 0) & mask
    rows: list[RowSummary] = []
    for i in range(bs):
        live_vals = t[i][mask[i]]
        bad_cols = np.flatnonzero(bad[i])
        has_len = needed is not None and i < len(needed)
        rows.append(
            RowSummary(
                row=i,
                seqlen=int(cache_seqlens[i]) if cache_seqlens is not None and i < len(cache_seqlens) else None,
                live=int(mask[i].sum()),
                needed=int(needed[i]) if has_len else (width if needed is None else 0),
                min=int(live_vals.min()) if live_vals.size else None,
                max=int(live_vals.max()) if live_vals.size else None,
                bad=int(bad_cols.size),
                negative=int(neg[i].sum()),
                first_bad=tuple(int(c) for c in bad_cols[:FIRST_BAD]),
            )
        )
    return TableSummary(
        name=name,
        shape=tuple(int(x) for x in table.shape),
        dtype=str(table.dtype),
        pool=pool,
        lower=lower,
        bound=bound,
        handed_to_layer=handed_to_layer,
        rows=tuple(rows),
    )


def summarize_vector(name: str, arr: np.ndarray, lower: int | None = None, bound: int | None = None) -> VectorSummary:
    a = np.asarray(arr).reshape(-1)
    bad_idx: np.ndarray = np.zeros(0, dtype=np.int64)
    dups = 0
    if a.size and (lower is not None or bound is not None) and np.issubdtype(a.dtype, np.integer):
        b = np.zeros(a.shape, dtype=bool)
        if lower is not None:
            b |= a < lower
        if bound is not None:
            b |= a >= bound
        bad_idx = np.flatnonzero(b)
        _, counts = np.unique(a, return_counts=True)
        dups = int((counts > 1).sum())

    def _num(x: Any) -> int | float:
        return int(x) if np.issubdtype(a.dtype, np.integer) or a.dtype == bool else float(x)

    return VectorSummary(
        name=name,
        shape=tuple(int(x) for x in np.asarray(arr).shape),
        dtype=str(a.dtype),
        size=int(a.size),
        min=_num(a.min()) if a.size else None,
        max=_num(a.max()) if a.size else None,
        lower=lower,
        bound=bound,
        bad=int(bad_idx.size),
        first_bad=tuple(int(i) for i in bad_idx[:FIRST_BAD]),
        duplicates=dups,
    )


def seqlens_of(tensors: Mapping[str, np.ndarray]) -> np.ndarray | None:
    for key in ("cache_seqlens", "seq_lens"):
        if key in tensors:
            return np.asarray(tensors[key]).reshape(-1)
    return None


def summarize_tables(record: ManifestRecord, tensors: Mapping[str, np.ndarray]) -> list[TableSummary]:
    """A :class:`TableSummary` for every page table in the dump, handed table first."""
    ps = page_size_of(record)
    seqlens = tensors.get("cache_seqlens")
    out: list[TableSummary] = []
    for name in list(PAGE_TABLES) + sorted(set(tensors) - set(PAGE_TABLES)):
        arr = tensors.get(name)
        if arr is None or np.asarray(arr).ndim != 2 or name == "guard_entries":
            continue
        if name not in PAGE_TABLES and name not in (record.context.tables or {}):
            continue
        pool, lower, bound, handed = table_meta(record, name)
        out.append(summarize_table(name, arr, seqlens, ps, pool=pool, lower=lower, bound=bound, handed_to_layer=handed))
    out.sort(key=lambda s: 0 if s.handed_to_layer else 1)
    return out


def summarize_vectors(record: ManifestRecord, tensors: Mapping[str, np.ndarray]) -> list[VectorSummary]:
    """A :class:`VectorSummary` for every tensor that is not a page table (bounded when the violation is on it)."""
    viol = record.violation
    tables = {s for s in tensors if np.asarray(tensors[s]).ndim == 2 and s != "guard_entries"}
    out: list[VectorSummary] = []
    for name in sorted(tensors):
        if name in tables or name == "guard_entries":
            continue
        lower = bound = None
        # seqlens_exceed_table names cache_seqlens with a bound in *pages* (width + 1): not a token bound
        if viol.table == name and viol.kind != Kind.SEQLENS_EXCEED_TABLE:
            lower, bound = viol.lower, viol.bound
        out.append(summarize_vector(name, tensors[name], lower, bound))
    return out


def in_gap(values: np.ndarray, low: int, high: int) -> np.ndarray:
    """True where ``low <= v < high`` (e.g. full-pool ids that are too big for the SWA pool)."""
    v = np.asarray(values).astype(np.int64)
    return (v >= low) & (v < high)


def live_values(table: np.ndarray, cache_seqlens: np.ndarray | None, page_size: int) -> np.ndarray:
    """The live entries of a page table, flattened (int64)."""
    t = np.asarray(table)
    pages = live_pages(cache_seqlens, page_size) if cache_seqlens is not None else None
    return t[live_mask(t, pages)].astype(np.int64)
