"""What a snapshot means: one function per kind of snapshot, snapshot -> :class:`Verdict` (or ``None``).

The hooks and the weight-free repro call the same functions, so a trap in a server and a trap in a
repro write the same violation and the same context. A verdict is reported through
:meth:`kvtrap.capture.session.Session.report` (dump, then raise or log).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvtrap.capture.sglang_view import (
    EXPECTED_RAIL,
    AllocationSnapshot,
    FreeSnapshot,
    LayerSnapshot,
    RaggedSnapshot,
    WriteSnapshot,
)
from kvtrap.record.context import ABSENT, Context, LayerInfo, PoolPages
from kvtrap.record.kinds import Kind
from kvtrap.record.violation import Violation

if TYPE_CHECKING:
    from kvtrap.capture.checks import BadEntries, BadFree, RaggedScan, TableScan


@dataclass(frozen=True)
class Verdict:
    """A violation, what the hook saw (``context``), the tensors to dump, and whether going on is safe."""

    violation: Violation
    context: Context
    tensors: Mapping[str, Any] = field(default_factory=dict)
    safe_to_continue: bool = False


def judge_layer(view: LayerSnapshot, scan: TableScan | None) -> Verdict | None:
    """The most telling violation for this layer call, with its context and tensors; ``None`` if none.

    Order: index space (the concrete consequence for this layer), then drift (the stale state behind
    it), then out-of-range values, then rows wider than the table, then the padding page read for a
    real request. ``scan`` is the value scan of the
    handed table against ``view.bound`` (``None`` while capturing a CUDA graph).
    """
    mismatch = view.mismatch
    if not (mismatch or view.drift) and (scan is None or scan.ok):
        return None
    # page 0 read for a real request is in range (no fault, a wrong answer): not fatal on its own
    fatal = scan is not None and (scan.bad is not None or scan.overflow is not None)
    # During capture nothing checks the values of a table handed to the wrong layer type: the device
    # guard bounds each table by its own pool, not by the pool of every layer that reads it. So a
    # mismatch found while capturing is never safe to continue from, even in log mode.
    unsafe = fatal or (mismatch and scan is None)
    base: dict[str, Any] = {
        "where": view.where,
        "layer_id": view.layer_id,
        "layer_type": view.layer_type,
        "window": view.window,
        "table": view.handed_name,
        "pool": view.layer_type,
        "lower": 0,
        "bound": view.bound,
        "fatal": fatal,
    }
    bad = scan.bad if scan is not None else None
    if bad is not None:
        base.update(row=bad.row, column=bad.column, value=bad.value, count=bad.count, rows=bad.rows)
    details: dict[str, Any] = {"expected_table": view.expected_name, "handed_table": view.handed_name}
    if view.drift:
        details["drift"] = view.drift
    if scan is not None and scan.overflow is not None:
        o = scan.overflow
        details["overflow"] = {"row": o.row, "needed_pages": o.needed_pages, "width": o.width, "rows": o.count}

    if mismatch:
        stale = _stale_note(view.drift)
        violation = Violation(
            kind=Kind.INDEX_SPACE_MISMATCH,
            summary=(
                f"{view.layer_type.upper()} layer {view.layer_id} is handed {view.handed_name} instead of "
                f"{view.expected_name}: its ids index the wrong pool{stale}"
            ),
            details=details,
            **base,
        )
    elif view.drift:
        violation = Violation(
            kind=Kind.SWA_STATE_DRIFT,
            summary=_drift_summary(view.drift),
            details=details,
            **base,
        )
    elif bad is not None:
        violation = Violation(
            kind=Kind.PAGE_TABLE_OUT_OF_RANGE,
            summary=(
                f"{view.handed_name} holds page ids outside the {view.layer_type} pool this layer reads "
                f"({view.bound} pages)"
            ),
            details=details,
            **base,
        )
    elif scan is not None and scan.overflow is None and scan.swa_mismatch is not None:
        m = scan.swa_mismatch
        # an in-range id naming the wrong slot: no range to state
        base.update(row=m.row, column=m.column, value=m.value, count=m.count, rows=m.rows, lower=None, bound=None)
        details["pool_pages"] = view.bound
        details["swa_translation"] = "live entries differ from mapping[full_id * page_size] // page_size"
        violation = Violation(
            kind=Kind.INDEX_SPACE_MISMATCH,
            summary=(
                f"{view.handed_name} row {m.row} column {m.column} holds {m.value}, not the SWA translation of "
                f"the full-pool id at the same position ({m.count} such entries): the table was not "
                "translated (or translated with a stale mapping)"
            ),
            details=details,
            **base,
        )
    elif scan is not None and scan.overflow is None and scan.padding is not None:
        p = scan.padding
        slots = view.req_pool_indices
        slot = int(slots[p.row]) if slots is not None else None
        base.update(row=p.row, column=p.column, value=p.value, count=p.count, rows=p.rows, lower=1)
        details["req_pool_index"] = slot
        details["live_pages"] = _live_pages(view.cache_seqlens, p.row, view.page_size)
        violation = Violation(
            kind=Kind.PADDING_PAGE_FOR_REAL_REQUEST,
            summary=(
                f"{view.handed_name} row {p.row} (request slot {slot}) reads the reserved padding page 0 at "
                f"column {p.column}, inside its live prefix ({p.count} such entries); only CUDA-graph "
                "padding rows (request slot 0) may"
            ),
            details=details,
            **base,
        )
    else:
        o = scan.overflow  # type: ignore[union-attr]
        # value/bound stay empty: the numbers are pages needed vs columns, said in the summary
        base.update(row=o.row, column=None, value=None, bound=o.width, lower=None, count=o.count, table="cache_seqlens")
        violation = Violation(
            kind=Kind.SEQLENS_EXCEED_TABLE,
            summary=(
                f"cache_seqlens row {o.row} needs {o.needed_pages} pages but {view.handed_name} has only "
                f"{o.width} columns"
            ),
            details=details,
            **base,
        )

    context = _layer_context(view, tables=view.table_bounds)
    tensors: dict[str, Any] = {}
    if not view.capturing:  # copying device tensors to the host inside capture would abort it
        tensors = {**view.tables, "cache_seqlens": view.cache_seqlens, "req_pool_indices": view.req_pool_indices}
    return Verdict(violation, context, tensors, safe_to_continue=not unsafe)


def _stale_note(drift: dict[str, str]) -> str:
    return " (backend SWA state is stale: " + ", ".join(drift) + ")" if drift else ""


def _drift_summary(drift: dict[str, str]) -> str:
    return "the backend's cached SWA state disagrees with the live KV pool: " + "; ".join(
        f"{k} is {v}" for k, v in drift.items())


def _layer_context(view: LayerSnapshot | WriteSnapshot | RaggedSnapshot, **extra: Any) -> Context:
    """The context every dump of one layer's attention call carries (the batch, the layer, the pools)."""
    return Context(
        hook=view.where,
        forward_mode=view.forward_mode,
        speculative=view.speculative,
        batch_size=int(view.cache_seqlens.shape[0]),
        page_size=view.page_size,
        capturing=view.capturing,
        layer=LayerInfo(id=view.layer_id, type=view.layer_type, window=view.window,
                        index_in_pool=view.index_in_pool),
        pools=view.pools,
        live_pool=view.live_pool,
        backend=view.backend,
        **extra,
    )


def judge_write(view: WriteSnapshot, bad: BadEntries) -> Verdict:
    """A layer's K/V store is about to write outside the pool it writes (``bad``: from the slot scan)."""
    full = None
    if view.out_cache_loc is not None and bad.row < int(view.out_cache_loc.shape[0]):
        full = int(view.out_cache_loc.reshape(-1)[bad.row])
    pool = f"{view.layer_type} pool" if view.layer_type == "swa" or len(view.pools) > 1 else "KV pool"
    violation = Violation(
        kind=Kind.KV_WRITE_OUT_OF_RANGE,
        summary=(
            f"layer {view.layer_id} is about to store K/V at {view.name}[{bad.row}] = {bad.value},"
            f" outside the {pool} it writes ({view.rows} rows; {bad.count} such location(s))"
        ),
        where=view.where,
        layer_id=view.layer_id,
        layer_type=view.layer_type,
        window=view.window,
        table=view.name,
        pool=view.layer_type,
        row=bad.row,
        column=None,
        value=bad.value,
        lower=0,
        bound=view.rows,
        count=bad.count,
        rows=bad.rows,
        fatal=True,
        details={"out_cache_loc": full, "pool_rows": view.rows},
    )
    context = _layer_context(view, num_tokens=int(view.locs.numel()))
    tensors: dict[str, Any] = {}
    if not view.capturing:
        tensors = {
            "out_cache_loc": view.out_cache_loc,
            "swa_out_cache_loc": view.swa_out_cache_loc,
            "cache_seqlens": view.cache_seqlens,
            "req_pool_indices": view.req_pool_indices,
        }
    return Verdict(violation, context, tensors)


_INDPTR_PROBLEM = {
    "start": "does not start at 0",
    "decreasing": "decreases (a request's range ends before it starts)",
    "overrun": "ends past the end of the ids",
}


def judge_ragged(view: RaggedSnapshot, scan: RaggedScan | None, extend_bad: BadEntries | None = None) -> Verdict | None:
    """The most telling problem of one layer's ragged KV read, or ``None``.

    Order as :func:`judge_layer`: index space (the layer is handed ids of the other pool), drift, then a
    malformed ``indptr``, then live ids outside the rows of the pool this layer reads (the rail first, then
    the unified path's appended ids, ``extend_bad``). ``scan`` is ``None`` while capturing a CUDA graph.
    """
    mismatch = view.mismatch
    if not (mismatch or view.drift) and (scan is None or scan.ok) and extend_bad is None:
        return None
    malformed = scan is not None and scan.indptr_problem is not None
    bad = (scan.bad if scan is not None else None) or extend_bad
    on_extend = bad is not None and bad is extend_bad and view.extend is not None
    table = view.extend.name if on_extend else view.handed.name  # type: ignore[union-attr]
    fatal = malformed or bad is not None
    unsafe = fatal or (mismatch and scan is None)
    wrong_extend = view.extend is not None and view.extend.space != view.layer_type
    handed = view.extend.name if wrong_extend and view.handed.space == view.layer_type else view.handed.name  # type: ignore[union-attr]
    expected = EXPECTED_RAIL[(view.layer_type, view.extend is not None and handed == view.extend.name)]
    base: dict[str, Any] = {
        "where": view.where, "layer_id": view.layer_id, "layer_type": view.layer_type, "window": view.window,
        "table": handed if mismatch else table, "pool": view.layer_type, "lower": 0, "bound": view.bound,
        "fatal": fatal,
    }
    if bad is not None:
        base.update(row=bad.row, column=bad.column, value=bad.value, count=bad.count, rows=bad.rows)
    details: dict[str, Any] = {"expected_table": expected, "handed_table": handed}
    if view.extend is not None:
        details["extend_ids"] = view.extend.name
    if view.drift:
        details["drift"] = view.drift
    if mismatch:
        stale = _stale_note(view.drift)
        other = "full" if view.layer_type == "swa" else "SWA"
        what = f"{handed} instead of {expected}" if handed != expected else f"{handed} built with {other}-pool ids"
        kind, summary = Kind.INDEX_SPACE_MISMATCH, (
            f"{view.layer_type.upper()} layer {view.layer_id} is handed {what}: its ids index the {other} pool{stale}"
        )
    elif view.drift:
        kind, summary = Kind.SWA_STATE_DRIFT, _drift_summary(view.drift)
    elif malformed:
        assert scan is not None
        indptr_name = view.handed_name.replace("indices", "indptr")
        # a range says something for the first and last offsets only: [0, 1) and [0, len(ids)]
        edge = {"start": 1, "overrun": int(view.handed.indices.numel()) + 1}.get(scan.indptr_problem)
        base.update(table=indptr_name, row=scan.indptr_at, column=None, count=1, lower=None if edge is None else 0,
                    value=None if edge is None else scan.indptr_value, bound=edge)
        details.update(indptr_problem=scan.indptr_problem, indptr_value=scan.indptr_value)
        kind, summary = Kind.KV_INDPTR_MALFORMED, (
            f"{indptr_name} {_INDPTR_PROBLEM[scan.indptr_problem]}: [{scan.indptr_at}] = {scan.indptr_value}"
            f" ({view.handed_name} holds {int(view.handed.indices.numel())} ids)")
    else:
        assert bad is not None
        where_in = f"position {bad.row}" if on_extend else f"request {bad.row}, position {bad.column}"
        kind, summary = Kind.KV_INDICES_OUT_OF_RANGE, (
            f"{table} holds ids outside the {view.layer_type} pool layer {view.layer_id} reads ({view.bound} token"
            f" rows): {bad.value} at {where_in}; {bad.count} such id(s)")
    violation = Violation(kind=kind, summary=summary, details=details, **base)
    context = _layer_context(view, tables=view.table_bounds)
    tensors: dict[str, Any] = {}
    if not view.capturing:
        tensors = {**view.tensors, "req_pool_indices": view.req_pool_indices}
    return Verdict(violation, context, tensors, safe_to_continue=not unsafe)


def _live_pages(cache_seqlens: Any, row: int, page_size: int) -> int:
    return (int(cache_seqlens[row]) + page_size - 1) // page_size


def judge_allocation(view: AllocationSnapshot, bad: BadEntries) -> Verdict:
    """An allocator call handed out SWA slots outside the SWA pool (``bad``: where, from the slot scan).

    ``view.out`` / ``view.swa_slots`` may be None (a drain-mode finding whose call is no longer remembered)."""
    page_size = view.page_size
    swa_pages = view.bound // page_size - 1
    out = view.out.reshape(-1) if view.out is not None else None
    full_index = int(out[bad.row]) if out is not None and bad.row < out.numel() else None
    violation = Violation(
        kind=Kind.SWA_SLOT_OUT_OF_RANGE,
        summary=(
            f"{view.where} handed out full slot {full_index} whose SWA slot {bad.value} lies "
            f"outside the SWA pool ({swa_pages} pages of {page_size}; page 0 is reserved)"
        ),
        where=view.where,
        table="out_swa_indices",
        pool="swa",
        row=bad.row,
        column=None,
        value=bad.value,
        lower=page_size,
        bound=view.bound,
        count=bad.count,
        rows=bad.rows,
        fatal=True,
        details={"full_index": full_index, "swa_page": bad.value // page_size},
    )
    context = Context(
        hook=view.where,
        page_size=page_size,
        size_full=view.size_full,
        size_swa=view.size_swa,
        pools={
            "full": PoolPages(pages=None if view.full_pages is None else view.full_pages + 1),
            "swa": PoolPages(pages=swa_pages + 1),
        },
        free_pages={"full": view.free_full, "swa": view.free_swa},
        num_tokens=ABSENT if out is None else int(out.numel()),
        args={k: v for k, v in view.args.items() if isinstance(v, (int, float, str, bool))},
    )
    tensors = {} if out is None else {"out_full_indices": view.out, "out_swa_indices": view.swa_slots}
    for name in ("seq_lens", "prefix_lens", "last_loc"):
        value = view.args.get(name)
        if value is not None and hasattr(value, "detach"):
            tensors[name] = value
    return Verdict(violation, context, tensors)


_LISTED_FULL_PAGES = 64

_FREE_KINDS = {
    "reserved": Kind.SWA_FREE_RESERVED_PAGE,
    "double": Kind.SWA_DOUBLE_FREE,
    "not_owned": Kind.SWA_FREE_NOT_OWNED,
}


def judge_free(view: FreeSnapshot, bad: BadFree) -> Verdict:
    """A free is about to return an SWA page it must not: page 0, a page not handed out, another's page."""
    page_size = view.page_size
    freeing = None if view.freeing is None else [int(p) for p in view.freeing.reshape(-1)[:_LISTED_FULL_PAGES].tolist()]
    if bad.reason == "reserved":
        what = f"the reserved SWA page 0 (slots [0, {page_size}) are padding, never handed out)"
    elif bad.reason == "double":
        what = f"SWA page {bad.page}, which is not handed out (already freed: a double free)"
    else:
        what = (
            f"SWA page {bad.page}, handed out with full page {bad.owner}, which this free does not release"
            " (a stale full-to-SWA mapping)"
        )
    violation = Violation(
        kind=_FREE_KINDS[bad.reason],
        summary=f"{view.where} is about to return {what} to the SWA free list ({bad.count} such page(s))",
        where=view.where,
        table="released_swa_pages",
        pool="swa",
        row=bad.position,
        column=None,
        value=bad.page,
        # a range only says something for page 0; a double or foreign free is an in-range page
        lower=1 if bad.reason == "reserved" else None,
        bound=view.swa_pages + 1 if bad.reason == "reserved" else None,
        count=bad.count,
        fatal=True,
        details={"swa_page": bad.page, "owner_full_page": bad.owner, "freed_full_pages": freeing},
    )
    context = Context(
        hook=view.where,
        page_size=page_size,
        size_full=view.size_full,
        size_swa=view.size_swa,
        pools={"swa": PoolPages(pages=view.swa_pages + 1)},
        free_pages={"full": view.free_full, "swa": view.free_swa},
        num_tokens=0 if view.free_index is None else int(view.free_index.numel()),
        args={},
    )
    tensors: dict[str, Any] = {"released_swa_pages": view.released, "swa_page_owner": view.owner}
    if view.freeing is not None:
        tensors["freed_full_pages"] = view.freeing
    if view.free_index is not None:
        tensors["free_index"] = view.free_index
    return Verdict(violation, context, tensors)
