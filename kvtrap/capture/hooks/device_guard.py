"""Wiring the device guard (:mod:`kvtrap.capture.guard`) into SGLang's trtllm_mha backend and scheduler.

The guard state per backend (:func:`guard_metadata`), the eager-forward hook and the drain are shared with
the fa3 adapter (:mod:`kvtrap.capture.hooks.fa3_guard`), which only says where fa3 builds its tables.

Where each piece runs (SGLang 0.5.23):

* **CUDA-graph decode** (the default): the decode graph runner calls
  ``TRTLLMHAAttnBackend.init_forward_metadata_in_graph`` inside ``run_once``; it rebuilds the static
  page tables inside the graph through the module-level ``update_trtllm_mha_graph_metadata``. kvtrap
  replaces that name in ``trtllm_mha_backend`` with a wrapper and, for the duration of the in-graph
  call, sets a thread-local build context (an AROUND hook). With a context, the wrapper runs
  :func:`kvtrap.capture.guard.fused_metadata.update_metadata_guarded_`: SGLang's build and the guard in one
  launch, no extra kernel. Where the fused build does not apply (``fused_unsupported`` says why: a
  unified pool, table shapes the separate guard would check differently, a drifted SWA mapping) the
  wrapper calls SGLang's builder unchanged and, after the call, kvtrap launches the separate guard
  once per page table (full, and SWA when present), as before. Either way one check per table per
  forward, then a copy of the record's counter to pinned host memory. Captured once, replayed every
  step; no host sync. Without a context (any other caller) the wrapper is SGLang's builder.
* **Drain** (:func:`drain_all`, called from :mod:`kvtrap.capture.hooks.step_drain`):
  ``SchedulerBatchResultProcessor.process_batch_result_decode`` starts by waiting for the
  step (``result.copy_done.synchronize()``). kvtrap waits on the same event first (so SGLang's own wait
  becomes a no-op), reads the pinned counter (free when zero) and, if the guard recorded anything,
  dumps and raises before the step's tokens reach any client. With the overlap scheduler the next
  step may already be queued; it is guarded too (entries accumulate until drained).
* **Eager forwards** are checked on the host before each kernel (:mod:`kvtrap.capture.hooks.trtllm_mha`),
  which raises before anything runs. With ``KVTRAP_GUARD=on`` the guard also runs there, right after
  ``init_forward_metadata``, drained at once (one sync), so eager and graph runs use the same checks.

``KVTRAP_GUARD=auto`` (default) turns the guard on where CUDA is available; ``off`` disables it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvtrap.capture.patching import MethodTarget, module_function
from kvtrap.capture.session import current
from kvtrap.capture.sglang_view import backend_context, translating
from kvtrap.record.context import Context

MODULE = "sglang.srt.layers.attention.trtllm_mha_backend"
CLASS = "TRTLLMHAAttnBackend"
BUILDER = "update_trtllm_mha_graph_metadata"  # module-level name in MODULE, imported from sglang.kernels


@dataclass
class GuardState:
    record: Any  # GuardRecord
    table_ids: dict[str, int]
    backend: Any  # weakref.ref to the backend, for the dump context
    last_fallback: str | None = None  # why the last in-graph build used the separate guard (None: fused)
    # the dump's context and tensors for a drain: (backend, state) -> (Context, tensors); None: page tables'
    context: Callable[[Any, GuardState], tuple[Context, dict[str, Any]]] | None = None
    last_checked: dict[str, Any] = field(default_factory=dict)  # what the last launch checked (adapters' use)


_states: weakref.WeakKeyDictionary[Any, GuardState] = weakref.WeakKeyDictionary()
# _states' values in creation order, read by every drain: iterating a WeakKeyDictionary costs microseconds a step.
# A state whose backend is gone is skipped (and dropped), as _states drops it.
_drain_order: list[GuardState] = []


def guard_wanted(table: Any, guard: str) -> bool:
    if guard == "off" or not getattr(table, "is_cuda", False):
        return False
    return True  # "on", or "auto" with the tables on a CUDA device


def _state(backend: Any, device: Any) -> GuardState:
    return state_for(backend, device, {"page_table": ("full", False), "swa_page_table": ("swa", False)})


def state_for(
    backend: Any, device: Any, tables: dict[str, tuple[str, bool]],
    context: Callable[[Any, GuardState], tuple[Context, dict[str, Any]]] | None = None,
) -> GuardState:
    """``backend``'s guard state (one record per backend, created on first use: outside capture, since SGLang
    warms up eagerly), its tables registered: name -> (pool, ragged). Shared by every backend adapter."""
    state = _states.get(backend)
    if state is None:
        from kvtrap.capture.guard import GuardRecord

        record = GuardRecord(device=device)
        ids = {name: record.register_table(name, pool=pool, ragged=ragged) for name, (pool, ragged) in tables.items()}
        state = GuardState(record, ids, weakref.ref(backend), context=context)
        _states[backend] = state
        _drain_order[:] = [s for s in _drain_order if s.backend() is not None] + [state]
    return state


def guard_metadata(backend: Any, md: Any, *, publish: bool) -> GuardState:
    """Launch the guard on ``md``'s page tables (capturable: reads no device value)."""
    from kvtrap.capture.guard import guard_page_table_
    from kvtrap.capture.sglang_view import FULL, SWA, is_swa_pool, pool_summary

    live = backend.token_to_kv_pool
    page_size = int(backend.page_size)
    pools = pool_summary(live, page_size)
    state = _state(backend, md.page_table.device)
    seqlens = md.cache_seqlens_int32
    guard_page_table_(md.page_table, seqlens, page_size, pools[FULL].pages, state.record,
                      state.table_ids["page_table"])
    swa = getattr(md, "swa_page_table", None)
    if swa is not None and is_swa_pool(live):
        # The SWA translation check needs the token-level mapping; unified pools have none (None).
        mapping = getattr(live, "full_to_swa_index_mapping", None)
        guard_page_table_(
            swa, seqlens, page_size, pools[SWA].pages, state.record, state.table_ids["swa_page_table"],
            swa_mapping=mapping, full_table=None if mapping is None else md.page_table,
        )
    spec = getattr(md, "swa_spec_metadata", None)  # fa3, EAGLE tree verify: SWA layers' own table and lengths
    if spec is not None and getattr(spec, "page_table", None) is not None and is_swa_pool(live):
        # values only: its rows have no same-shaped full table to compare with (the host check rebuilds one)
        tid = state.table_ids.get("swa_spec_page_table")
        if tid is None:
            tid = state.table_ids["swa_spec_page_table"] = state.record.register_table("swa_spec_page_table", "swa")
        guard_page_table_(spec.page_table, spec.cache_seqlens_int32, page_size, pools[SWA].pages, state.record, tid)
    if publish:
        state.record.publish_()
    return state


def drain(state: GuardState, session: Any, *, synced: bool) -> None:
    if state.record.pending(synced=synced) == 0:
        return
    from kvtrap.capture.guard import check_and_raise
    backend = state.backend()
    if backend is None:
        context, tensors = Context(), {}
    elif state.context is not None:
        context, tensors = state.context(backend, state)
    else:
        context, tensors = backend_context(backend)
    check_and_raise(state.record, session, context, tensors, synced=synced)


# ------------------------------------------------------------------------------------ wrappers
@dataclass
class BuildContext:
    """Set while one backend's ``init_forward_metadata_in_graph`` runs; read by the replaced builder."""

    backend: Any
    guard: str  # the session's KVTRAP_GUARD value
    fused: GuardState | None = None  # set when the fused build ran (then no separate guard)
    fallback: str | None = None  # why the builder wrapper fell back to SGLang's builder


_local = threading.local()  # .ctx: the BuildContext of the in-graph call running on this thread


def current_build() -> BuildContext | None:
    return getattr(_local, "ctx", None)


def _fused_spec(ctx: BuildContext, kwargs: dict[str, Any]) -> tuple[Any, GuardState | None, str | None]:
    """The fused build's guard arguments for this call, or why the fused build does not apply."""
    from kvtrap.capture.guard.fused_metadata import GuardSpec, fused_unsupported
    from kvtrap.capture.sglang_view import FULL, SWA, is_swa_pool, pool_summary

    table = kwargs.get("page_table")
    if table is None or kwargs.get("skip_page_table"):
        return None, None, "the builder writes no page table (unified pool)"
    if not guard_wanted(table, ctx.guard):
        return None, None, "guard not wanted for these tables"
    backend = ctx.backend
    page_size = int(backend.page_size)
    if int(kwargs.get("page_size", -1)) != page_size:
        return None, None, f"builder page_size {kwargs.get('page_size')} != backend page_size {page_size}"
    live = backend.token_to_kv_pool
    pools = pool_summary(live, page_size)
    if pools[FULL] is None:
        return None, None, "the live pool has no size"
    state = _state(backend, table.device)
    # the same tables and bounds guard_metadata() would use: SWA only when the live pool is SWA
    check_swa = kwargs.get("swa_page_table") is not None and is_swa_pool(live) and pools[SWA] is not None
    spec = GuardSpec(
        record=state.record,
        full_bound=int(pools[FULL].pages),
        full_table_id=state.table_ids["page_table"],
        swa_bound=int(pools[SWA].pages) if check_swa else None,
        swa_table_id=state.table_ids["swa_page_table"],
        swa_mapping=live.full_to_swa_index_mapping if check_swa else None,
    )
    why = fused_unsupported(spec, **kwargs)
    return (None, None, why) if why is not None else (spec, state, None)


def _guarded_builder(original: Any) -> Any:
    """Replacement for ``trtllm_mha_backend.update_trtllm_mha_graph_metadata``."""

    def update_trtllm_mha_graph_metadata(*args: Any, **kwargs: Any) -> Any:
        ctx = current_build()
        if ctx is None or args:  # not inside a guarded in-graph build (or not SGLang's keyword call)
            return original(*args, **kwargs)
        spec, state, why = _fused_spec(ctx, kwargs)
        if spec is None:
            ctx.fallback = why
            return original(*args, **kwargs)
        from kvtrap.capture.guard.fused_metadata import update_metadata_guarded_

        update_metadata_guarded_(spec=spec, **kwargs)
        ctx.fused = state
        return None

    return update_trtllm_mha_graph_metadata


def _around_in_graph_metadata(original: Any) -> Any:
    def init_forward_metadata_in_graph(self: Any, *args: Any, **kwargs: Any) -> Any:
        session = current()
        if session is None or session.config.guard == "off" or translating(self):
            # unified pools address pages by virtual ids: the guard's pool bounds do not apply there
            return original(self, *args, **kwargs)
        ctx = BuildContext(self, session.config.guard)
        outer = current_build()  # nested calls (a multi-step draft backend's inner backends)
        _local.ctx = ctx
        try:
            out = original(self, *args, **kwargs)
        finally:
            _local.ctx = outer
        if ctx.fused is not None:
            # the builder checked every table it wrote: no separate guard launch
            ctx.fused.last_fallback = None
            ctx.fused.record.publish_()
            return out
        md = getattr(self, "forward_metadata", None)
        if md is not None and md.page_table is not None and guard_wanted(md.page_table, session.config.guard):
            # no fused build ran (SGLang's builder was not reached, e.g. ragged verify, or a
            # precondition failed): the separate guard checks the finished tables
            guard_metadata(self, md, publish=True).last_fallback = ctx.fallback or "builder not called"
        return out

    return init_forward_metadata_in_graph


def _after_eager_metadata(original: Any) -> Any:
    def init_forward_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        session = current()
        md = getattr(self, "forward_metadata", None)
        if session is not None and session.config.guard == "on" and md is not None and md.page_table is not None:
            if guard_wanted(md.page_table, "on") and not translating(self):
                drain(guard_metadata(self, md, publish=False), session, synced=False)
        return out

    return init_forward_metadata


def drain_all(session: Any, result: Any, *, waited: bool = False) -> None:
    """Read every guarded backend's record (trtllm_mha's, fa3's and triton's alike) before a decode step's results are
    used: the one drain point, called by :mod:`kvtrap.capture.hooks.step_drain` at the start of
    ``process_batch_result_decode``. ``result`` without ``copy_done`` (or ``None``): nothing to wait on. ``waited``:
    the caller has already waited on ``result.copy_done`` (the drain hook does, first)."""
    if not _drain_order:
        return
    copy_done = getattr(result, "copy_done", None)
    if copy_done is not None and not waited:
        copy_done.synchronize()  # SGLang's own first step; makes the pinned counter current
    synced = copy_done is not None
    for state in tuple(_drain_order):
        if state.backend() is not None:
            drain(state, session, synced=synced)


TARGETS = [
    MethodTarget(MODULE, CLASS, "init_forward_metadata_in_graph", _around_in_graph_metadata),
    module_function(MODULE, BUILDER, _guarded_builder),
    MethodTarget(MODULE, CLASS, "init_forward_metadata", _after_eager_metadata),
]
