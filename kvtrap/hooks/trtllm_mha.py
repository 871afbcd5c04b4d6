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
from typing import Any

from kvtrap import checks
from kvtrap.arming import current
from kvtrap.errors import (
    INDEX_SPACE_MISMATCH,
    PAGE_TABLE_OUT_OF_RANGE,
    SEQLENS_EXCEED_TABLE,
    SWA_STATE_DRIFT,
    Violation,
)
from kvtrap.patching import MethodTarget

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


def layer_pages(live: Any, layer_id: int, page_size: int) -> int:
    """Pages of the buffer this layer reads: its K buffer has ``size + page_size`` rows (page 0 padding)."""
    return int(live.get_key_buffer(layer_id).shape[0]) // page_size


def _sub_pool_pages(pool: Any, page_size: int) -> dict[str, int] | None:
    size = getattr(pool, "size", None)
    if size is None:
        return None
    return {"pages": (int(size) + page_size) // page_size, "rows": int(size) + page_size}


def pool_summary(live: Any, page_size: int) -> dict[str, Any]:
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
# backend -> (metadata object, {(table name, bound): scan}); the strong ref to the metadata keeps its
# id from being reused, so a new forward's metadata never hits an old entry.
_scans: weakref.WeakKeyDictionary[Any, tuple[Any, dict[tuple[str, int], checks.TableScan]]] = (
    weakref.WeakKeyDictionary()
)


def _scan(backend: Any, md: Any, name: str, table: Any, page_size: int, bound: int) -> checks.TableScan:
    entry = _scans.get(backend)
    if entry is None or entry[0] is not md:
        entry = (md, {})
        _scans[backend] = entry
    key = (name, bound)
    scan = entry[1].get(key)
    if scan is None:
        scan = checks.scan_page_table(table, md.cache_seqlens_int32, page_size, bound)
        entry[1][key] = scan
    return scan


def _forward_mode(forward_batch: Any) -> str | None:
    mode = getattr(forward_batch, "forward_mode", None)
    return getattr(mode, "name", None) if mode is not None else None


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
    expected_name = "swa_page_table" if layer_type == SWA else "page_table"
    mismatch = handed_name != expected_name
    drift = find_drift(backend, live)
    capturing = checks.is_capturing(handed)

    scan = None
    bound = None
    if not capturing:
        bound = layer_pages(live, layer_id, page_size)
        scan = _scan(backend, md, handed_name, handed, page_size, bound)
    elif not (mismatch or drift):
        session.warn_once(
            "capture",
            "page-table values are not checked inside CUDA-graph capture or replay (host checks only); "
            "run eager (--cuda-graph-backend-decode disabled) or enable the device guard",
        )
        return
    if not (mismatch or drift) and (scan is None or scan.ok):
        return

    window = getattr(layer, "sliding_window_size", None)
    pools = pool_summary(live, page_size)
    if bound is None:
        bound = layer_pages(live, layer_id, page_size)
    fatal = scan is not None and not scan.ok
    base = {
        "where": f"{CLASS}.{where}",
        "layer_id": layer_id,
        "layer_type": layer_type,
        "window": None if window is None else int(window),
        "table": handed_name,
        "pool": layer_type,
        "lower": 0,
        "bound": bound,
        "fatal": fatal,
    }
    bad = scan.bad if scan is not None else None
    if bad is not None:
        base.update(row=bad.row, column=bad.column, value=bad.value, count=bad.count, rows=bad.rows)
    details: dict[str, Any] = {"expected_table": expected_name, "handed_table": handed_name}
    if drift:
        details["drift"] = drift
    if scan is not None and scan.overflow is not None:
        o = scan.overflow
        details["overflow"] = {"row": o.row, "needed_pages": o.needed_pages, "width": o.width, "rows": o.count}

    if mismatch:
        violation = Violation(
            kind=INDEX_SPACE_MISMATCH,
            summary=(
                f"{layer_type.upper()} layer {layer_id} is handed {handed_name} instead of {expected_name}: "
                f"its ids index the wrong pool"
                + (" (backend SWA state is stale: " + ", ".join(drift) + ")" if drift else "")
            ),
            details=details,
            **base,
        )
    elif drift:
        violation = Violation(
            kind=SWA_STATE_DRIFT,
            summary="the backend's cached SWA state disagrees with the live KV pool: " + "; ".join(
                f"{k} is {v}" for k, v in drift.items()
            ),
            details=details,
            **base,
        )
    elif bad is not None:
        violation = Violation(
            kind=PAGE_TABLE_OUT_OF_RANGE,
            summary=(
                f"{handed_name} holds page ids outside the {layer_type} pool this layer reads "
                f"({bound} pages)"
            ),
            details=details,
            **base,
        )
    else:
        o = scan.overflow  # type: ignore[union-attr]
        # value/bound stay empty: the numbers are pages needed vs columns, said in the summary
        base.update(row=o.row, column=None, value=None, bound=o.width, lower=None, count=o.count)
        violation = Violation(
            kind=SEQLENS_EXCEED_TABLE,
            summary=(
                f"cache_seqlens row {o.row} needs {o.needed_pages} pages but {handed_name} has only "
                f"{o.width} columns"
            ),
            details=details,
            **{**base, "table": "cache_seqlens"},
        )

    context = {
        "hook": f"{CLASS}.{where}",
        "forward_mode": _forward_mode(forward_batch),
        "batch_size": int(md.cache_seqlens_int32.shape[0]),
        "page_size": page_size,
        "capturing": capturing,
        "layer": {"id": layer_id, "type": layer_type, "window": base["window"], "index_in_pool": index_in_pool},
        "pools": pools,
        "live_pool": {"class": type(live).__name__, "id": f"{id(live):#x}"},
        "backend": _backend_state(backend, live),
        "tables": _tables(md, handed_name, live, layer_id, page_size),
    }
    tensors: dict[str, Any] = {}
    if not capturing:  # copying device tensors to the host inside capture would abort it
        tensors = {
            "page_table": full_t,
            "swa_page_table": swa_t,
            "cache_seqlens": md.cache_seqlens_int32,
            "req_pool_indices": getattr(forward_batch, "req_pool_indices", None),
        }
    session.report(violation, context, tensors, safe_to_continue=not fatal)


def _backend_state(backend: Any, live: Any) -> dict[str, Any]:
    cached = getattr(backend, "_swa_kv_pool", None)
    mapping = getattr(backend, "_swa_full_to_swa_mapping", None)
    return {
        "class": type(backend).__name__,
        "use_sliding_window_kv_pool": getattr(backend, "use_sliding_window_kv_pool", None),
        "swa_kv_pool": None if cached is None else f"{type(cached).__name__}@{id(cached):#x}",
        "swa_kv_pool_is_live": cached is live,
        "has_swa_full_to_swa_mapping": mapping is not None,
        "swa_mapping_is_live": mapping is not None
        and mapping is getattr(live, "full_to_swa_index_mapping", None),
    }


def _tables(md: Any, handed_name: str, live: Any, layer_id: int, page_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    swa = is_swa_pool(live)
    for name in ("page_table", "swa_page_table"):
        table = getattr(md, name, None)
        if table is None:
            continue
        pool = SWA if name == "swa_page_table" else FULL
        sub = (live.swa_kv_pool if pool == SWA else live.full_kv_pool) if swa else live
        info = _sub_pool_pages(sub, page_size) if pool == SWA or swa else _sub_pool_pages(live, page_size)
        out[name] = {
            "pool": pool,
            "bound": None if info is None else info["pages"],
            "handed_to_layer": name == handed_name,
            "shape": list(table.shape),
        }
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
