"""triton hook: check the ragged KV ids ``TritonAttnBackend`` hands a layer's attention kernel.

The triton backend reads K/V through CSR index sets built once per forward by ``init_forward_metadata``:
``kv_indptr`` / ``kv_indices`` (full-attention layers) and ``window_kv_indptr`` / ``window_kv_indices``
(layers with a sliding window; on an SWA pool these are translated to SWA-pool ids). The ids are token
slots at every page size (the kernels split them into page and offset), so valid ids are
``[0, rows)`` of the pool the layer reads (``size + page_size`` rows; slot 0's page is the padding page).

Before ``forward_decode`` / ``forward_extend`` run, for the layer:

1. Resolve the pool the layer reads from the *live* ``token_to_kv_pool`` and its ``layers_mapping``.
2. Index space: an SWA layer must be handed the (translated) window rail, a full layer ``kv_indices``.
3. Drift: the backend's cached ``use_sliding_window_kv_pool`` (decided at ``__init__`` from the runner's
   pool; it decides whether ``swa_out_cache_loc`` is built) must agree with the live pool.
4. Values: ``indptr`` starts at 0, never decreases and ends within ``indices``; every live id lies in
   ``[0, rows)``. Once per index set per forward (one host sync), skipped while a CUDA graph is captured.

The deterministic (unified) extend path (``--enable-deterministic-inference``) appends the current
tokens' ids to the prefix rail in ``_forward_extend_unified``; SWA layers must append the translated
``swa_out_cache_loc`` (SGLang #24394: the untranslated ``out_cache_loc`` faulted; fixed by #24395). That
path is checked on the ids really handed to ``build_unified_kv_indices`` (wrapped for the duration of the
``forward_extend`` call), so a wrong choice inside ``_forward_extend_unified`` is seen whatever made it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvtrap.capture import checks
from kvtrap.capture.forward_cache import ForwardCache, forward_cache
from kvtrap.capture.patching import MethodTarget
from kvtrap.capture.session import Session, current
from kvtrap.capture.sglang_view import (
    layer_pool,
    layer_rows,
    ragged_snapshot,
    rail_name,
    rail_space,
    translating,
    triton_rail,
)
from kvtrap.capture.verdict import judge_ragged

MODULE = "sglang.srt.layers.attention.triton_backend"
CLASS = "TritonAttnBackend"
#: The ``--attention-backend`` name this adapter guards (``kvtrap doctor`` reports coverage from it).
ATTENTION_BACKEND = "triton"


def _rows(session: Session, entry: ForwardCache, backend: Any, live: Any, layer_type: str) -> int | None:
    if layer_type not in entry.pages:
        entry.pages[layer_type] = None if translating(backend) else layer_rows(live, layer_type, int(backend.page_size))
        if entry.pages[layer_type] is None:
            session.warn_once("no-ragged-bound", f"ragged KV ids are not range-checked for {type(live).__name__}"
                              " (virtual ids or no pool size); index-space and drift checks still run")
    return entry.pages[layer_type]


def _scan_once(entry: ForwardCache, key: tuple[Any, ...], scan: Callable[[], Any]) -> Any:
    if key not in entry.scans:
        entry.scans[key] = scan()
    return entry.scans[key]


def check_ragged(
    backend: Any, layer: Any, forward_batch: Any, where: str,
    handed: tuple[str, Any, Any] | None = None, extend_ids: Any = None,
) -> None:
    """Check the rail ``layer`` is handed (``handed``: name, indptr, indices; by default the one SGLang's
    forward picks) and, for the unified extend path, the ids appended to it (``extend_ids``)."""
    session = current()
    if session is None:
        return
    md = getattr(backend, "forward_metadata", None)
    if md is None:
        return
    rail = handed if handed is not None else triton_rail(md, layer)
    if rail is None:
        return  # no rail for this layer: SGLang's own assert says so right after us
    name, indptr, indices = rail
    live = backend.token_to_kv_pool
    layer_type, index_in_pool = layer_pool(live, int(layer.layer_id))
    entry = forward_cache(backend, md, live)
    extend = None if extend_ids is None else (rail_name(md, forward_batch, extend_ids), extend_ids)
    mismatch = rail_space(name, live, layer_type) != layer_type or (
        extend is not None and rail_space(extend[0], live, layer_type) != layer_type)
    capturing = checks.is_capturing(indices)
    bound = _rows(session, entry, backend, live, layer_type)
    scan = extend_bad = None
    if not capturing and bound is not None:
        scan = _scan_once(entry, (name, id(indices), bound), lambda: checks.scan_ragged(indptr, indices, bound))
        if extend is not None:
            extend_bad = _scan_once(entry, (extend[0], id(extend_ids), bound),
                                    lambda: checks.scan_slots(extend_ids, 0, bound))
    if not (mismatch or entry.drift or extend_bad is not None) and (scan is None or scan.ok):
        if capturing and session.config.guard == "off":
            session.warn_once("capture-ragged", "ragged KV ids are not value-checked inside CUDA-graph capture or"
                              " replay (host checks only); run eager to check them every step")
        return  # the common case: a few attribute reads, no sync
    view = ragged_snapshot(
        backend, layer, forward_batch, f"{CLASS}.{where}", layer_type=layer_type, index_in_pool=index_in_pool,
        handed=rail, extend=extend, bound=bound, drift=entry.drift, capturing=capturing,
    )
    verdict = judge_ragged(view, scan, extend_bad)
    if verdict is not None:
        session.report(verdict.violation, verdict.context, verdict.tensors, safe_to_continue=verdict.safe_to_continue)


# ------------------------------------------------------------------------------------ wrappers
def _checked_unified_build(backend: Any, layer: Any, forward_batch: Any, build: Callable[..., Any]) -> Callable[..., Any]:
    def checked_build(prefix_indptr: Any, prefix_indices: Any, start: Any, lens: Any, ids: Any, bs: int) -> Any:
        name = rail_name(backend.forward_metadata, forward_batch, prefix_indices)
        check_ragged(backend, layer, forward_batch, "_forward_extend_unified",
                     handed=(name, prefix_indptr, prefix_indices), extend_ids=ids)
        return build(prefix_indptr, prefix_indices, start, lens, ids, bs)

    return checked_build


def _forward(method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            # signature: (q, k, v, layer, forward_batch, save_kv_cache=True, ...) in 0.5.23
            layer = args[3] if len(args) > 3 else kwargs.get("layer")
            forward_batch = args[4] if len(args) > 4 else kwargs.get("forward_batch")
            if layer is None or current() is None:
                return original(self, *args, **kwargs)
            build = self.__dict__.get("build_unified_kv_indices")
            if method != "forward_extend" or not getattr(self, "enable_deterministic", False) or build is None:
                check_ragged(self, layer, forward_batch, method)
                return original(self, *args, **kwargs)
            # Deterministic extend reads prefix + current ids merged by build_unified_kv_indices inside
            # _forward_extend_unified: checked on the arguments really handed to it. It is an instance
            # attribute (set in __init__), swapped for this call only.
            self.build_unified_kv_indices = _checked_unified_build(self, layer, forward_batch, build)
            try:
                return original(self, *args, **kwargs)
            finally:
                self.build_unified_kv_indices = build

        return wrapper

    return make


TARGETS = [MethodTarget(MODULE, CLASS, m, _forward(m)) for m in ("forward_decode", "forward_extend")]
