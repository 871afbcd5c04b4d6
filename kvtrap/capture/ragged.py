"""The ragged-id check every backend with CSR index sets shares (triton, flashinfer): one layer's read.

The adapter says which index sets this forward has (``rails``) and which one the layer reads (``handed``);
this decides, with the per-forward cache (:mod:`kvtrap.capture.forward_cache`):

1. the pool the layer reads, from the *live* ``token_to_kv_pool`` and its ``layers_mapping``;
2. index space: the handed set (and ids appended to it, ``extend``) holds ids of that pool;
3. drift of the backend's cached SWA state against the live pool (once per forward), where that state
   decides what the read uses;
4. values: ``indptr`` sound, every live id in ``[0, token rows)`` of that pool: one host sync per index
   set per forward, none while a CUDA graph is being captured.

A clean layer costs a few attribute reads after the first layer of a forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvtrap.capture import checks
from kvtrap.capture.forward_cache import ForwardCache, forward_cache
from kvtrap.capture.session import Session, current
from kvtrap.capture.sglang_view import Rail, layer_pool, layer_rows, ragged_snapshot, sharded_kv, translating
from kvtrap.capture.verdict import judge_ragged


def _rows(session: Session, entry: ForwardCache, backend: Any, live: Any, layer_type: str) -> int | None:
    if layer_type not in entry.pages:
        entry.pages[layer_type] = None if translating(backend) else layer_rows(live, layer_type, int(backend.page_size))
        if entry.pages[layer_type] is None:
            session.warn_once("no-ragged-bound", f"ragged KV ids are not range-checked for {type(live).__name__}"
                              " (virtual ids or no pool size); index-space and drift checks still run")
    return entry.pages[layer_type]


def check_ragged(
    backend: Any, layer: Any, forward_batch: Any, where: str, rails: Callable[[Any, str], dict[str, Rail] | None],
    handed: str | Rail, extend: Rail | None = None, judge_drift: bool = True, device_guarded: bool = False,
) -> None:
    """Check the index set ``handed`` (a name in ``rails(live, layer_type)``, or a :class:`Rail`) that
    ``layer`` reads and the ids ``extend`` appended to it; report through the armed session.

    ``judge_drift=False``: the backend's cached SWA state does not decide what this read uses (it is still
    recorded in a dump's context when something else is wrong). ``device_guarded``: every CUDA-graph replay of the
    backend is value-checked by the device guard (triton), so capture is silent unless the guard is off
    (flashinfer's are only for some graphs: it warns once)."""
    session = current()
    if session is None:
        return
    md = getattr(backend, "forward_metadata", None)
    if md is None or sharded_kv(backend):
        return
    live = backend.token_to_kv_pool
    layer_type, index_in_pool = layer_pool(live, int(layer.layer_id))
    entry = forward_cache(backend, md, live)
    if layer_type not in entry.rails:
        entry.rails[layer_type] = rails(live, layer_type)
    sets = entry.rails[layer_type]
    rail = handed if isinstance(handed, Rail) else (sets or {}).get(handed)
    if rail is None or sets is None:
        return  # nothing planned for this layer: SGLang's own checks say so right after us
    drift = entry.drift if judge_drift else {}
    mismatch = rail.space != layer_type or (extend is not None and extend.space != layer_type)
    capturing = checks.is_capturing(rail.indices)
    bound = _rows(session, entry, backend, live, layer_type)
    scan = extend_bad = None
    if not capturing and bound is not None:
        key = (rail.name, id(rail.indices), bound)
        scan = entry.scans.get(key)
        if scan is None:
            scan = entry.scans[key] = checks.scan_ragged(rail.indptr, rail.indices, bound)
        if extend is not None:
            key = (extend.name, id(extend.indices), bound)
            if key not in entry.scans:
                entry.scans[key] = checks.scan_slots(extend.indices, 0, bound)
            extend_bad = entry.scans[key]
    if not (mismatch or drift or extend_bad is not None) and (scan is None or scan.ok):
        if capturing and (session.config.guard == "off" or not device_guarded):
            session.warn_once("capture-ragged", "ragged KV ids are not value-checked by the host checks inside"
                              " CUDA-graph capture or replay; the device guard (KVTRAP_GUARD, not off) checks the"
                              " replays of triton's graphs and of flashinfer's decode / verify / draft-extend graphs"
                              " (docs/guard.md); run eager to check every step")
        return  # the common case: a few attribute reads, no sync
    view = ragged_snapshot(
        backend, layer, forward_batch, where, layer_type=layer_type, index_in_pool=index_in_pool, rails=sets,
        handed=rail, extend=extend, bound=bound, drift=drift, capturing=capturing,
    )
    verdict = judge_ragged(view, scan, extend_bad)
    if verdict is not None:
        session.report(verdict.violation, verdict.context, verdict.tensors, safe_to_continue=verdict.safe_to_continue)
