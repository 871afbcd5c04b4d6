"""trtllm_mha hook: check the page table a layer is about to hand the attention kernel.

A thin adapter: SGLang's objects are read through :mod:`kvtrap.capture.sglang_view`, judged by
:func:`kvtrap.capture.verdict.judge_layer`, reported by the armed session. What stays here is the
hot path: per-forward caching, so a clean layer costs a few attribute reads and no host sync.

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
5. Page 0 for real requests (same scan, same sync): no live entry of the full ``page_table`` is the
   reserved padding page 0 in a row whose request slot (``forward_batch.req_pool_indices``) is real
   (not 0). CUDA-graph padding rows (slot 0, length 1) may read page 0. Not checked on the SWA table:
   ``free_swa`` clears the mapping of tokens that left the window to 0, so page 0 is a legal id there
   for pages outside the window. Not checked by the device guard either (see
   :func:`kvtrap.capture.sglang_view.padding_page_slots`).

6. KV writes (when the call stores K/V: ``save_kv_cache`` and ``k`` given): every location the layer's
   store writes lies in ``[0, rows)`` of the pool it writes: ``forward_metadata.swa_out_cache_loc``
   (the full->SWA translation, narrowed to the batch's tokens as SGLang narrows it) into the SWA
   sub-pool for SWA layers (per the live ``layers_mapping``), ``forward_batch.out_cache_loc`` into the
   full (or only) pool otherwise. Slot 0 (padding writes) is legal. Once per pool type per forward
   (one host sync each), skipped while capturing and for translating (unified) pools. It checks the
   range, not that a location belongs to the request (a wrong in-range slot overwrites another
   request's KV unseen).

Checks 1-3 are host-only attribute reads (a few microseconds) and also run during graph capture.
"""


from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvtrap.capture import checks
from kvtrap.capture.forward_cache import ForwardCache, forward_cache
from kvtrap.capture.patching import MethodTarget
from kvtrap.capture.session import current
from kvtrap.capture.sglang_view import (
    SWA,
    call_arg,
    handed_table_name,
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

MODULE = "sglang.srt.layers.attention.trtllm_mha_backend"
CLASS = "TRTLLMHAAttnBackend"
#: The ``--attention-backend`` name this adapter guards (``kvtrap doctor`` reports coverage from it).
ATTENTION_BACKEND = "trtllm_mha"


# ------------------------------------------------------------------------------------- the check
def _scan(
    entry: ForwardCache, name: str, table: Any, page_size: int, bound: int, forward_batch: Any
) -> checks.TableScan:
    key = (name, bound)
    scan = entry.scans.get(key)
    if scan is None:
        scan = checks.scan_page_table(
            table, entry.md.cache_seqlens_int32, page_size, bound,
            req_slots=padding_page_slots(name, forward_batch),
        )
        entry.scans[key] = scan
    return scan


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
    handed_name = handed_table_name(md, handed)
    entry = forward_cache(backend, md, live)
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
    scan = None if capturing or bound is None else _scan(entry, handed_name, handed, page_size, bound, forward_batch)
    if not (mismatch or drift) and (scan is None or scan.ok):
        if capturing and session.config.guard == "off":
            session.warn_once(
                "capture",
                "page-table values are not checked inside CUDA-graph capture or replay (host checks only); "
                "run eager (--cuda-graph-backend-decode disabled) or leave KVTRAP_GUARD at auto",
            )
        return  # the common case: a few attribute reads, no sync
    view = layer_snapshot(
        backend, layer, forward_batch, f"{CLASS}.{where}", handed_name=handed_name, layer_type=layer_type,
        index_in_pool=index_in_pool, bound=bound, drift=drift, capturing=capturing,
    )
    verdict = judge_layer(view, scan)
    if verdict is not None:
        session.report(verdict.violation, verdict.context, verdict.tensors,
                       safe_to_continue=verdict.safe_to_continue)


# ----------------------------------------------------------------------------- the KV write check
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
    picked = write_locs(backend, forward_batch, layer_type)
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
    view = write_snapshot(backend, layer, forward_batch, f"{CLASS}.{where}", layer_type=layer_type,
                          index_in_pool=index_in_pool, name=name, locs=locs, rows=rows, capturing=False)
    verdict = judge_write(view, bad)
    session.report(verdict.violation, verdict.context, verdict.tensors, safe_to_continue=verdict.safe_to_continue)


# ------------------------------------------------------------------------------------ wrappers
def _wrap(method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            # signature: (q, k, v, layer, forward_batch, save_kv_cache=True, **kw) since 0.5.x
            layer = call_arg(args, kwargs, 3, "layer")
            forward_batch = call_arg(args, kwargs, 4, "forward_batch")
            if layer is not None:
                check_forward(self, layer, forward_batch, method)
                k = call_arg(args, kwargs, 1, "k")
                save = args[5] if len(args) > 5 else kwargs.get("save_kv_cache", True)
                if save and k is not None:
                    check_write(self, layer, forward_batch, method)
            return original(self, *args, **kwargs)

        return wrapper

    return make


TARGETS = [MethodTarget(MODULE, CLASS, m, _wrap(m)) for m in ("forward_decode", "forward_extend")]
