"""Wiring the device guard (:mod:`kvtrap.guard`) into SGLang's trtllm_mha backend and scheduler.

Where each piece runs (SGLang 0.5.23):

* **CUDA-graph decode** (the default): the decode graph runner calls
  ``TRTLLMHAAttnBackend.init_forward_metadata_in_graph`` inside ``run_once``; it rebuilds the static
  page tables inside the graph. Right after it, still inside the same graph and before any layer reads
  the tables, kvtrap launches the guard once per page table (full, and SWA when present) and queues a
  copy of the record's counter to pinned host memory. Captured once, replayed every step; no host sync.
* **Drain**: ``SchedulerBatchResultProcessor.process_batch_result_decode`` starts by waiting for the
  step (``result.copy_done.synchronize()``). kvtrap waits on the same event first (so SGLang's own wait
  becomes a no-op), reads the pinned counter (free when zero) and, if the guard recorded anything,
  dumps and raises before the step's tokens reach any client. With the overlap scheduler the next
  step may already be queued; it is guarded too (entries accumulate until drained).
* **Eager forwards** are checked on the host before each kernel (:mod:`kvtrap.hooks.trtllm_mha`),
  which raises before anything runs. With ``KVTRAP_GUARD=on`` the guard also runs there, right after
  ``init_forward_metadata``, drained at once (one sync), so eager and graph runs use the same checks.

``KVTRAP_GUARD=auto`` (default) turns the guard on where CUDA is available; ``off`` disables it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from kvtrap.arming import current
from kvtrap.patching import MethodTarget

MODULE = "sglang.srt.layers.attention.trtllm_mha_backend"
CLASS = "TRTLLMHAAttnBackend"
DRAIN_MODULE = "sglang.srt.managers.scheduler_components.batch_result_processor"
DRAIN_CLASS = "SchedulerBatchResultProcessor"


@dataclass
class GuardState:
    record: Any  # GuardRecord
    table_ids: dict[str, int]
    backend: Any  # weakref.ref to the backend, for the dump context


_states: weakref.WeakKeyDictionary[Any, GuardState] = weakref.WeakKeyDictionary()


def guard_wanted(table: Any, guard: str) -> bool:
    if guard == "off" or not getattr(table, "is_cuda", False):
        return False
    return True  # "on", or "auto" with the tables on a CUDA device


def _state(backend: Any, device: Any) -> GuardState:
    state = _states.get(backend)
    if state is None:
        from kvtrap.guard import GuardRecord

        record = GuardRecord(device=device)
        ids = {
            "page_table": record.register_table("page_table", pool="full"),
            "swa_page_table": record.register_table("swa_page_table", pool="swa"),
        }
        state = GuardState(record, ids, weakref.ref(backend))
        _states[backend] = state
    return state


def guard_metadata(backend: Any, md: Any, *, publish: bool) -> GuardState:
    """Launch the guard on ``md``'s page tables (capturable: reads no device value)."""
    from kvtrap.guard import guard_page_table_
    from kvtrap.hooks.trtllm_mha import FULL, SWA, is_swa_pool, pool_summary

    live = backend.token_to_kv_pool
    page_size = int(backend.page_size)
    pools = pool_summary(live, page_size)
    state = _state(backend, md.page_table.device)
    seqlens = md.cache_seqlens_int32
    guard_page_table_(md.page_table, seqlens, page_size, pools[FULL]["pages"], state.record,
                      state.table_ids["page_table"])
    swa = getattr(md, "swa_page_table", None)
    if swa is not None and is_swa_pool(live):
        guard_page_table_(
            swa, seqlens, page_size, pools[SWA]["pages"], state.record, state.table_ids["swa_page_table"],
            swa_mapping=live.full_to_swa_index_mapping, full_table=md.page_table,
        )
    if publish:
        state.record.publish_()
    return state


def drain(state: GuardState, session: Any, *, synced: bool) -> None:
    from kvtrap.guard import check_and_raise
    from kvtrap.hooks.trtllm_mha import _backend_state, pool_summary

    if state.record.pending(synced=synced) == 0:
        return
    backend = state.backend()
    context: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    if backend is not None:
        live = backend.token_to_kv_pool
        md = getattr(backend, "forward_metadata", None)
        context = {
            "page_size": int(backend.page_size),
            "pools": pool_summary(live, int(backend.page_size)),
            "live_pool": {"class": type(live).__name__, "id": f"{id(live):#x}"},
            "backend": _backend_state(backend, live),
            "capturing": False,
        }
        if md is not None:
            context["batch_size"] = int(md.cache_seqlens_int32.shape[0])
            tensors = {
                "page_table": md.page_table,
                "swa_page_table": getattr(md, "swa_page_table", None),
                "cache_seqlens": md.cache_seqlens_int32,
            }
    check_and_raise(state.record, session, context, tensors, synced=synced)


# ------------------------------------------------------------------------------------ wrappers
def _after_in_graph_metadata(original: Any) -> Any:
    def init_forward_metadata_in_graph(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        session = current()
        md = getattr(self, "forward_metadata", None)
        if session is not None and md is not None and guard_wanted(md.page_table, session.config.guard):
            guard_metadata(self, md, publish=True)
        return out

    return init_forward_metadata_in_graph


def _after_eager_metadata(original: Any) -> Any:
    def init_forward_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        session = current()
        md = getattr(self, "forward_metadata", None)
        if session is not None and session.config.guard == "on" and md is not None and md.page_table is not None:
            if guard_wanted(md.page_table, "on"):
                drain(guard_metadata(self, md, publish=False), session, synced=False)
        return out

    return init_forward_metadata


def _drain_before_results(original: Any) -> Any:
    def process_batch_result_decode(self: Any, batch: Any, result: Any, *args: Any, **kwargs: Any) -> Any:
        session = current()
        if session is not None and len(_states):
            copy_done = getattr(result, "copy_done", None)
            if copy_done is not None:
                copy_done.synchronize()  # SGLang's own first step; makes the pinned counter current
            for state in list(_states.values()):
                drain(state, session, synced=copy_done is not None)
        return original(self, batch, result, *args, **kwargs)

    return process_batch_result_decode


TARGETS = [
    MethodTarget(MODULE, CLASS, "init_forward_metadata_in_graph", _after_in_graph_metadata),
    MethodTarget(MODULE, CLASS, "init_forward_metadata", _after_eager_metadata),
    MethodTarget(DRAIN_MODULE, DRAIN_CLASS, "process_batch_result_decode", _drain_before_results),
]
