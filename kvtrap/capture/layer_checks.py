"""The host checks every attention-backend adapter runs before a layer's kernels, once per forward.

An adapter (:mod:`kvtrap.capture.hooks.trtllm_mha`, :mod:`kvtrap.capture.hooks.fa3`) says only which
table the backend is about to hand a layer (a :class:`~kvtrap.capture.sglang_view.HandedTable`, through
its ``pick`` function); everything else is here and shared:

1. The pool the layer really reads is resolved from the *live* ``backend.token_to_kv_pool`` and its
   ``layers_mapping`` (not from the backend's cached SWA flags: those go stale in #26957), with its page
   count (``size + page_size`` rows).
2. Index space: an SWA layer must be handed a table of SWA ids, a full layer one of full-pool ids.
3. Drift: the backend's cached SWA state agrees with the live pool (:func:`sglang_view.find_drift`).
4. Values: the live prefix of every row (``ceil(cache_seqlens / page_size)`` entries) lies in
   ``[0, pages)``; no row needs more pages than the table is wide; page 0 is not read by a real request
   (full table only); and, where the adapter gives the full-pool counterpart of an SWA table, each live
   SWA entry equals ``mapping[full_entry * page_size] // page_size``. Scanned once per table per forward
   (one host sync), not once per layer; skipped while a CUDA graph is being captured.
5. KV writes: the locations the layer's store writes lie in ``[0, rows)`` of the pool it writes.
   The ragged adapters (:mod:`kvtrap.capture.hooks.triton`, :mod:`kvtrap.capture.hooks.flashinfer`) run
   this one too, through :func:`check_store`.

Checks 1-3 are host-only attribute reads (a few microseconds) and also run during graph capture. What is
checked once per forward and reused by every layer (drift, bounds, scans, clean write locations) is kept in
:mod:`kvtrap.capture.forward_cache`, the same per-forward cache the ragged checks use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvtrap.capture import checks
from kvtrap.capture.forward_cache import ForwardCache, forward_cache
from kvtrap.capture.session import current
from kvtrap.capture.sglang_view import (
    HandedTable,
    call_arg,
    layer_pages,
    layer_pool,
    layer_rows,
    layer_snapshot,
    padding_page_slots,
    translating,
    write_locs,
    write_snapshot,
)
from kvtrap.capture.verdict import judge_layer, judge_write

#: ``pick(backend, layer, forward_batch) -> HandedTable | None`` (None: this call reads no paged table
#: kvtrap checks, e.g. local or cross attention).
Pick = Callable[[Any, Any, Any], "HandedTable | None"]


def _scan(entry: ForwardCache, handed: HandedTable, page_size: int, bound: int, forward_batch: Any,
          layer_type: str) -> checks.TableScan:  # fmt: skip
    key = (handed.name, bound)
    scan = entry.scans.get(key)
    if scan is None:  # the first layer of this forward that reads this table (the rest hit the cache)
        mapping = getattr(entry.live, "full_to_swa_index_mapping", None) if layer_type == "swa" else None
        full = handed.full_ids if mapping is not None else None
        if callable(full):
            full = full()
        scan = checks.scan_page_table(
            handed.table, handed.cache_seqlens, page_size, bound,
            req_slots=padding_page_slots(handed.name, forward_batch),
            full_table=full, swa_mapping=None if full is None else mapping,
        )
        entry.scans[key] = scan
    return scan


def check_forward(backend: Any, layer: Any, forward_batch: Any, where: str, pick: Pick) -> None:
    """Checks 1-4 for one layer call; reports through the armed session (raise or log)."""
    session = current()
    if session is None:
        return
    md = getattr(backend, "forward_metadata", None)
    if md is None or getattr(md, "page_table", None) is None:
        return
    try:
        handed = pick(backend, layer, forward_batch)
    except Exception:
        return  # SGLang's own forward raises the same error right after us; don't mask it
    if handed is None:
        return
    live = backend.token_to_kv_pool
    page_size = int(backend.page_size)
    layer_type, index_in_pool = layer_pool(live, int(layer.layer_id))
    entry = forward_cache(backend, md, live)
    drift = entry.drift
    capturing = checks.is_capturing(handed.table)
    mismatch = handed.pool != layer_type
    if layer_type not in entry.pages:
        entry.pages[layer_type] = None if translating(backend) else layer_pages(live, layer_type, page_size)
    bound = entry.pages[layer_type]
    if bound is None:
        session.warn_once(
            "no-bound",
            f"page-table values are not checked for {type(live).__name__} (virtual ids or no pool size); "
            "index-space and drift checks still run",
        )
    scan = None if capturing or bound is None else _scan(entry, handed, page_size, bound, forward_batch, layer_type)
    if not (mismatch or drift) and (scan is None or scan.ok):
        if capturing and session.config.guard == "off":
            session.warn_once(
                "capture",
                "page-table values are not checked inside CUDA-graph capture or replay (host checks only); "
                "run eager (--cuda-graph-backend-decode disabled) or leave KVTRAP_GUARD at auto",
            )
        return  # the common case: a few attribute reads, no sync
    view = layer_snapshot(
        backend, layer, forward_batch, f"{type(backend).__name__}.{where}", handed=handed, layer_type=layer_type,
        index_in_pool=index_in_pool, bound=bound, drift=drift, capturing=capturing,
    )
    verdict = judge_layer(view, scan)
    if verdict is not None:
        session.report(verdict.violation, verdict.context, verdict.tensors,
                       safe_to_continue=verdict.safe_to_continue)


def check_write(backend: Any, layer: Any, forward_batch: Any, where: str) -> None:
    """Before the layer's K/V store: every write location lies in ``[0, rows)`` of the pool it writes.

    Scanned once per (forward, pool type) and cached (one host sync each), skipped while capturing.
    """
    session = current()
    if session is None or forward_batch is None:
        return
    md = getattr(backend, "forward_metadata", None)
    if md is None:
        return
    live = backend.token_to_kv_pool
    layer_type, index_in_pool = layer_pool(live, int(layer.layer_id))
    picked = write_locs(backend, layer, forward_batch, layer_type)
    if picked is None:
        return
    name, locs = picked
    if checks.is_capturing(locs):
        return  # no host sync inside a capture; the capture notice of check_forward says so
    entry = forward_cache(backend, md, live)
    source = getattr(md, "swa_out_cache_loc", None) if name == "swa_out_cache_loc" else forward_batch.out_cache_loc
    cached = entry.writes.get(layer_type)
    if cached is not None and cached[0] is source and cached[1] == int(locs.shape[0]):
        return  # this forward's locations for this pool were scanned clean already
    rows = None if translating(backend) else layer_rows(live, layer_type, int(backend.page_size))
    if rows is None:
        session.warn_once("no-write-bound", f"KV write locations are not checked for {type(live).__name__} "
                          "(virtual ids or no pool size)")
        return
    bad = checks.scan_slots(locs, 0, rows)
    if bad is None:
        entry.writes[layer_type] = (source, int(locs.shape[0]))
        return
    view = write_snapshot(backend, layer, forward_batch, f"{type(backend).__name__}.{where}",
                          layer_type=layer_type, index_in_pool=index_in_pool, name=name, locs=locs, rows=rows,
                          capturing=False)
    verdict = judge_write(view, bad)
    session.report(verdict.violation, verdict.context, verdict.tensors, safe_to_continue=verdict.safe_to_continue)


def check_store(backend: Any, args: tuple[Any, ...], kwargs: dict[str, Any], layer: Any, forward_batch: Any,
                where: str) -> None:  # fmt: skip
    """:func:`check_write` when this ``forward_decode`` / ``forward_extend`` call stores K/V: ``k`` given and
    ``save_kv_cache`` true (the signature every checked backend shares in 0.5.23:
    ``(q, k, v, layer, forward_batch, save_kv_cache=True, ...)``)."""
    k = call_arg(args, kwargs, 1, "k")
    save = args[5] if len(args) > 5 else kwargs.get("save_kv_cache", True)
    if save and k is not None:
        check_write(backend, layer, forward_batch, where)


def wrap_layer_call(method: str, pick: Pick) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The AROUND wrapper of a backend's ``forward_decode`` / ``forward_extend``: the checks, then SGLang.

    Both backends' signature: ``(q, k, v, layer, forward_batch, save_kv_cache=True, **kw)``.
    """

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            layer = call_arg(args, kwargs, 3, "layer")
            forward_batch = call_arg(args, kwargs, 4, "forward_batch")
            if layer is not None:
                check_forward(self, layer, forward_batch, method, pick)
                check_store(self, args, kwargs, layer, forward_batch, method)
            return original(self, *args, **kwargs)

        return wrapper

    return make
