"""trtllm_mha trap: check the page table a layer is about to hand the attention kernel.

Before ``TRTLLMHAAttnBackend.forward_decode`` / ``forward_extend`` run, for the layer:

1. Resolve the pool the layer really reads from the *live* ``backend.token_to_kv_pool`` and its
   ``layers_mapping`` (not from the backend's cached SWA flags: those are what goes stale in #26957),
   and that pool's page count (K buffer rows // page_size).
2. Index space: an SWA layer must be handed the SWA-translated table, a full layer the full table.
3. Drift: the backend's cached SWA state (``_swa_kv_pool``, ``use_sliding_window_kv_pool``,
   ``_swa_full_to_swa_mapping``) must agree with the live pool. With SGLang #26957 the frozen-KV draft
   backend cached "no SWA pool" at init while the views swap the target's ``SWAKVPool`` in: caught
   here on the first step, long before full-pool ids outgrow the SWA pool.
4. Values: the live prefix of every row (``ceil(cache_seqlens / page_size)`` entries) lies in
   ``[0, pages)``, and no row needs more pages than the table is wide. Scanned once per table per
   forward (one host sync), not once per layer; skipped while a CUDA graph is being captured.

Checks 1-3 are host-only attribute reads (a few microseconds) and also run during graph capture.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvtrap import checks
from kvtrap.arming import current
from kvtrap.patching import MethodTarget
from kvtrap.record.context import BackendState, Context, LayerInfo, LivePool, PoolPages, TableInfo
from kvtrap.record.kinds import Kind
from kvtrap.record.violation import Violation

MODULE = "sglang.srt.layers.attention.trtllm_mha_backend"
CLASS = "TRTLLMHAAttnBackend"
FULL, SWA = "full", "swa"
_MISSING = object()


# --------------------------------------------------------------------------------------- live pool
def layer_pool(live: Any, layer_id: int) -> tuple[str, int | None]:
    """(``"swa"`` or ``"full"``, index inside that sub-pool) from the live pool's ``layers_mapping``."""
    mapping = getattr(live, "layers_mapping", None)
    if mapping is not None and layer_id in mapping:
        index, is_swa = mapping[layer_id]
        return (SWA if is_swa else FULL), int(index)
    return FULL, None


def is_swa_pool(pool: Any) -> bool:
    return getattr(pool, "swa_kv_pool", None) is not None and getattr(pool, "layers_mapping", None) is not None


def layer_pages(live: Any, layer_type: str, page_size: int) -> int | None:
    """Pages of the pool a layer of ``layer_type`` reads: ``size + page_size`` token rows (page 0 padding).

    From the (sub-)pool's ``size``, not from ``get_key_buffer``: that is not a pure accessor (FP4 pools
    dequantize a whole layer there, HiCache waits for a layer load) and its shape is token-major only in
    the NHD layout (``SGLANG_USE_HND_KVCACHE=1`` gives ``[pages, H, page, D]``). ``None``: no size known.
    """
    sub = (live.swa_kv_pool if layer_type == SWA else live.full_kv_pool) if is_swa_pool(live) else live
    info = _sub_pool_pages(sub, page_size)
    return None if info is None else info.pages


def translating(backend: Any) -> bool:
    """Unified KV pools address pages through virtual ids (``kv_index_translator``): other bounds apply."""
    return bool(getattr(getattr(backend, "kv_index_translator", None), "is_translating", False))


def _sub_pool_pages(pool: Any, page_size: int) -> PoolPages | None:
    size = getattr(pool, "size", None)
    if size is None:
        return None
    return PoolPages(pages=(int(size) + page_size) // page_size, rows=int(size) + page_size)


def pool_summary(live: Any, page_size: int) -> dict[str, PoolPages | None]:
    if is_swa_pool(live):
        return {
            FULL: _sub_pool_pages(live.full_kv_pool, page_size),
            SWA: _sub_pool_pages(live.swa_kv_pool, page_size),
        }
    return {FULL: _sub_pool_pages(live, page_size)}


def find_drift(backend: Any, live: Any) -> dict[str, str]:
    """Fields of the backend's cached SWA state that disagree with the live pool (empty when in sync)."""
    if not is_swa_pool(live):
        return {}
    problems: dict[str, str] = {}
    live_desc = f"{type(live).__name__}@{id(live):#x}"
    cached = getattr(backend, "_swa_kv_pool", _MISSING)
    if cached is None:
        problems["_swa_kv_pool"] = f"None, but the live pool is {live_desc}"
    elif cached is not _MISSING and cached is not live:
        # Equivalent when it shares the live pool's SWA buffers and mapping (a different wrapper object).
        same = getattr(cached, "swa_kv_pool", None) is live.swa_kv_pool and getattr(
            cached, "full_to_swa_index_mapping", None
        ) is getattr(live, "full_to_swa_index_mapping", None)
        if not same:
            problems["_swa_kv_pool"] = f"{type(cached).__name__}@{id(cached):#x}, not the live {live_desc}"
    if getattr(backend, "use_sliding_window_kv_pool", True) is False:
        problems["use_sliding_window_kv_pool"] = "False, but the live pool is an SWA pool"
    mapping = getattr(backend, "_swa_full_to_swa_mapping", _MISSING)  # read in-graph since 0.5.15
    translator = getattr(backend, "kv_index_translator", None)
    if mapping is not _MISSING and not getattr(translator, "is_translating", False):
        live_mapping = getattr(live, "full_to_swa_index_mapping", None)
        if mapping is None:
            problems["_swa_full_to_swa_mapping"] = "None, but the live pool has a full->SWA mapping"
        elif live_mapping is not None and mapping is not live_mapping:
            problems["_swa_full_to_swa_mapping"] = "a different tensor than the live pool's mapping"
    return problems


# ------------------------------------------------------------------------------------- the check
@dataclass
class _ForwardCache:
    """What stays fixed for one forward (one metadata object and one live pool): checked once, reused
    by every layer. Holding ``md`` keeps its id from being reused, so a new forward never hits it."""

    md: Any
    live: Any
    drift: dict[str, str]
    pages: dict[str, int]  # layer type -> pages of the pool such layers read
    scans: dict[tuple[str, int], checks.TableScan]


_forwards: weakref.WeakKeyDictionary[Any, _ForwardCache] = weakref.WeakKeyDictionary()


def _forward_cache(backend: Any, md: Any, live: Any) -> _ForwardCache:
    entry = _forwards.get(backend)
    if entry is None or entry.md is not md or entry.live is not live:
        entry = _ForwardCache(md, live, find_drift(backend, live), {}, {})
        _forwards[backend] = entry
    return entry


def _scan(entry: _ForwardCache, name: str, table: Any, page_size: int, bound: int) -> checks.TableScan:
    key = (name, bound)
    scan = entry.scans.get(key)
    if scan is None:
        scan = checks.scan_page_table(table, entry.md.cache_seqlens_int32, page_size, bound)
        entry.scans[key] = scan
    return scan


def _forward_mode(forward_batch: Any) -> str | None:
    mode = getattr(forward_batch, "forward_mode", None)
    return getattr(mode, "name", None) if mode is not None else None


@dataclass
class LayerCheck:
    """Everything the checks need about one layer's attention call, gathered from live objects.

    The trtllm_mha hook fills it from SGLang's backend; the weight-free repro (which cannot import
    SGLang's pools on the GPU machine) fills it directly. Either way :func:`evaluate` decides.
    """

    where: str
    layer_id: int
    layer_type: str
    window: int | None
    index_in_pool: int | None
    page_size: int
    bound: int | None  # pages of the pool this layer reads (None: unknown, values not checked)
    handed_name: str
    tables: dict[str, Any]  # "page_table", "swa_page_table" (None when absent)
    cache_seqlens: Any
    drift: dict[str, str]
    pools: dict[str, PoolPages | None]
    backend: BackendState
    live_pool: LivePool
    table_bounds: dict[str, TableInfo]
    forward_mode: str | None = None
    speculative: bool | None = None  # the batch carries spec_info (draft decode steps run as DECODE)
    req_pool_indices: Any = None
    capturing: bool = False

    @property
    def expected_name(self) -> str:
        return "swa_page_table" if self.layer_type == SWA else "page_table"


def check_forward(backend: Any, layer: Any, forward_batch: Any, where: str) -> None:
    session = current()
    if session is None:
        return
    md = getattr(backend, "forward_metadata", None)
    if md is None or getattr(md, "page_table", None) is None:
        return
    try:
        handed = backend._get_layer_page_table(layer, forward_batch)
    except Exception:
        return  # SGLang's own forward raises the same error right after us; don't mask it
    live = backend.token_to_kv_pool
    page_size = int(backend.page_size)
    layer_id = int(layer.layer_id)
    layer_type, index_in_pool = layer_pool(live, layer_id)
    full_t, swa_t = md.page_table, getattr(md, "swa_page_table", None)
    if swa_t is not None and handed is swa_t:
        handed_name = "swa_page_table"
    elif handed is full_t:
        handed_name = "page_table"
    else:
        handed_name = "other"
    entry = _forward_cache(backend, md, live)
    drift = entry.drift
    capturing = checks.is_capturing(handed)
    mismatch = handed_name != ("swa_page_table" if layer_type == SWA else "page_table")
    if layer_type not in entry.pages:
        entry.pages[layer_type] = None if translating(backend) else layer_pages(live, layer_type, page_size)
    bound = entry.pages[layer_type]
    if bound is None:
        session.warn_once(
            "no-bound",
            f"page-table values are not checked for {type(live).__name__} (virtual ids or no pool size); "
            "index-space and drift checks still run",
        )
    scan = None if capturing or bound is None else _scan(entry, handed_name, handed, page_size, bound)
    if not (mismatch or drift) and (scan is None or scan.ok):
        if capturing and session.config.guard == "off":
            session.warn_once(
                "capture",
                "page-table values are not checked inside CUDA-graph capture or replay (host checks only); "
                "run eager (--cuda-graph-backend-decode disabled) or leave KVTRAP_GUARD at auto",
            )
        return  # the common case: a few attribute reads, no sync
    window = getattr(layer, "sliding_window_size", None)
    view = LayerCheck(
        where=f"{CLASS}.{where}",
        layer_id=layer_id,
        layer_type=layer_type,
        window=None if window is None else int(window),
        index_in_pool=index_in_pool,
        page_size=page_size,
        bound=bound,
        handed_name=handed_name,
        tables={"page_table": full_t, "swa_page_table": swa_t},
        cache_seqlens=md.cache_seqlens_int32,
        drift=drift,
        pools=pool_summary(live, page_size),
        backend=backend_state(backend, live),
        live_pool=live_pool(live),
        table_bounds=_tables(md, handed_name, live, layer_id, page_size),
        forward_mode=_forward_mode(forward_batch),
        speculative=None if forward_batch is None else getattr(forward_batch, "spec_info", None) is not None,
        req_pool_indices=getattr(forward_batch, "req_pool_indices", None),
        capturing=capturing,
    )
    evaluate(session, view, scan)


def evaluate(session: Any, view: LayerCheck, scan: checks.TableScan | None) -> None:
    """Report the most telling violation for this layer call, if any (raises in raise mode).

    Order: index space (the concrete consequence for this layer), then drift (the stale state behind
    it), then out-of-range values, then rows wider than the table. ``scan`` is the value scan of the
    handed table against ``view.bound`` (``None`` while capturing a CUDA graph).
    """
    mismatch = view.handed_name != view.expected_name
    if not (mismatch or view.drift) and (scan is None or scan.ok):
        return
    fatal = scan is not None and not scan.ok
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
        stale = " (backend SWA state is stale: " + ", ".join(view.drift) + ")" if view.drift else ""
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
            summary="the backend's cached SWA state disagrees with the live KV pool: "
            + "; ".join(f"{k} is {v}" for k, v in view.drift.items()),
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

    context = Context(
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
        tables=view.table_bounds,
    )
    tensors: dict[str, Any] = {}
    if not view.capturing:  # copying device tensors to the host inside capture would abort it
        tensors = {**view.tables, "cache_seqlens": view.cache_seqlens, "req_pool_indices": view.req_pool_indices}
    session.report(violation, context, tensors, safe_to_continue=not unsafe)


def live_pool(live: Any) -> LivePool:
    return LivePool(class_=type(live).__name__, id=f"{id(live):#x}")


def backend_state(backend: Any, live: Any) -> BackendState:
    cached = getattr(backend, "_swa_kv_pool", None)
    mapping = getattr(backend, "_swa_full_to_swa_mapping", None)
    return BackendState(
        class_=type(backend).__name__,
        use_sliding_window_kv_pool=getattr(backend, "use_sliding_window_kv_pool", None),
        swa_kv_pool=None if cached is None else f"{type(cached).__name__}@{id(cached):#x}",
        swa_kv_pool_is_live=cached is live,
        has_swa_full_to_swa_mapping=mapping is not None,
        swa_mapping_is_live=mapping is not None and mapping is getattr(live, "full_to_swa_index_mapping", None),
        max_context_len=_int_or_none(getattr(backend, "max_context_len", None)),
        speculative_num_draft_tokens=_int_or_none(getattr(backend, "speculative_num_draft_tokens", None)),
    )


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _tables(md: Any, handed_name: str, live: Any, layer_id: int, page_size: int) -> dict[str, TableInfo]:
    out: dict[str, TableInfo] = {}
    swa = is_swa_pool(live)
    for name in ("page_table", "swa_page_table"):
        table = getattr(md, name, None)
        if table is None:
            continue
        pool = SWA if name == "swa_page_table" else FULL
        sub = (live.swa_kv_pool if pool == SWA else live.full_kv_pool) if swa else live
        info = _sub_pool_pages(sub, page_size) if pool == SWA or swa else _sub_pool_pages(live, page_size)
        out[name] = TableInfo(
            pool=pool,
            bound=None if info is None else info.pages,
            handed_to_layer=name == handed_name,
            shape=list(table.shape),
        )
    return out


# ------------------------------------------------------------------------------------ wrappers
def _wrap(method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            # signature: (q, k, v, layer, forward_batch, save_kv_cache=True, **kw) since 0.5.x
            layer = args[3] if len(args) > 3 else kwargs.get("layer")
            forward_batch = args[4] if len(args) > 4 else kwargs.get("forward_batch")
            if layer is not None:
                check_forward(self, layer, forward_batch, method)
            return original(self, *args, **kwargs)

        return wrapper

    return make


TARGETS = [MethodTarget(MODULE, CLASS, m, _wrap(m)) for m in ("forward_decode", "forward_extend")]
