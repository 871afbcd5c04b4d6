"""Wiring the device guard into SGLang's triton backend (``TritonAttnBackend``, SGLang 0.5.23): ragged KV ids.

Where triton builds what a CUDA graph reads (read from 0.5.23's code): ``TritonAttnBackend`` has no in-graph
metadata step (``init_forward_metadata_in_graph`` is the base class's no-op). Before every replay the decode
graph runner calls ``init_forward_metadata_out_graph(fb_view)`` *outside* the captured model graph (eagerly, or
inside SGLang's separate "metadata glue graph" that captures that call on its own); for decode, target verify,
draft extend v2 and dLLM extend it refills the static ``kv_indptr`` / ``cuda_graph_kv_indices`` and, with a
sliding window, ``window_kv_indptr`` / ``cuda_graph_window_kv_indices`` (translated to SWA-pool ids on an SWA
pool) that the captured kernels read. kvtrap launches the ragged guard
(:func:`kvtrap.capture.guard.ragged_kernel.guard_ragged_`) right after that call returns, on the same stream,
with no host sync (so it is also capturable into the glue graph): every live id of each set is checked against
the token rows of the pool its layers read (the window set against the SWA pool), bad ids are redirected to
slot 0 and recorded, broken offsets recorded. With ``in_capture=True`` (the runner binds the buffers before
capturing) nothing is launched: the buffers hold capture placeholders then.

The record, the per-backend state and the drain are :mod:`kvtrap.capture.hooks.device_guard`'s (its
``drain_all``, called at ``process_batch_result_decode`` by :mod:`kvtrap.capture.hooks.step_drain`). Eager
forwards are checked on the host before each layer (:mod:`kvtrap.capture.hooks.triton`).

EAGLE multi-step draft decode (``TritonMultiStepDraftBackend``): before each draft replay its own
``init_forward_metadata_out_graph(fb)`` fills every step's sets in one gather (``common_template``; its per-step
backends' ``init_forward_metadata_out_graph`` runs only while binding for capture). kvtrap guards step ``i``'s
row right after that call, with step ``i``'s backend's record (so a dump names that backend).

Not guarded on the device: the deterministic extend's aligned window set (eager only), unified (translating)
pools (virtual ids) and decode context parallelism (per-rank shards).
"""

from __future__ import annotations

from typing import Any

from kvtrap.capture.hooks.device_guard import GuardState, guard_wanted, state_for
from kvtrap.capture.patching import MethodTarget
from kvtrap.capture.session import current
from kvtrap.capture.sglang_view import (
    Rail,
    layer_rows,
    ragged_guard_context,
    sharded_kv,
    translating,
    triton_draft_graph_rails,
    triton_graph_rails,
)
from kvtrap.record.context import Context

MODULE = "sglang.srt.layers.attention.triton_backend"
CLASS = "TritonAttnBackend"
DRAFT_CLASS = "TritonMultiStepDraftBackend"


def _context(backend: Any, state: GuardState) -> tuple[Context, dict[str, Any]]:
    return ragged_guard_context(backend, state.last_checked)


def guard_rails(backend: Any, rails: dict[str, Rail], *, publish: bool) -> GuardState:
    """Launch the ragged guard on each set of ``rails`` (capturable: reads no device value)."""
    from kvtrap.capture.guard.ragged_kernel import guard_ragged_

    live = backend.token_to_kv_pool
    page_size = int(backend.page_size)
    first = next(iter(rails.values()))
    state = state_for(backend, first.indices.device, {}, _context)
    state.last_checked = rails
    for rail in rails.values():
        bound = layer_rows(live, rail.space, page_size)
        if bound is None:
            continue  # no pool size known: the host checks say so once
        tid = state.table_ids.get(rail.name)
        if tid is None:  # registered with the pool its ids index (the window set: SWA only on an SWA pool)
            tid = state.table_ids[rail.name] = state.record.register_table(rail.name, pool=rail.space, ragged=True)
        guard_ragged_(rail.indptr, rail.indices, bound, state.record, tid)
    if publish:
        state.record.publish_()
    return state


def _after_out_graph(original: Any) -> Any:
    def init_forward_metadata_out_graph(self: Any, forward_batch: Any, in_capture: bool = False, **kw: Any) -> Any:
        out = original(self, forward_batch, in_capture=in_capture, **kw)
        session = current()
        if in_capture or session is None or session.config.guard == "off" or translating(self) or sharded_kv(self):
            return out  # unified pools (virtual ids) and DCP shards are bounded elsewhere, not by the pool's rows
        rails = triton_graph_rails(self, forward_batch)
        if rails and guard_wanted(rails["kv_indices"].indices, session.config.guard):
            guard_rails(self, rails, publish=True)
        return out

    return init_forward_metadata_out_graph


def _after_draft_out_graph(original: Any) -> Any:
    def init_forward_metadata_out_graph(self: Any, forward_batch: Any, in_capture: bool = False, **kw: Any) -> Any:
        out = original(self, forward_batch, in_capture=in_capture, **kw)
        session = current()
        if in_capture or session is None or session.config.guard == "off" or translating(self):
            return out
        steps = triton_draft_graph_rails(self, forward_batch)
        if not steps or sharded_kv(self.attn_backends[0]) or not guard_wanted(steps[0]["kv_indices"].indices,
                                                                              session.config.guard):
            return out
        for inner, rails in zip(self.attn_backends, steps, strict=True):
            guard_rails(inner, rails, publish=True)  # step i's backend reads row i: its record, its dump
        return out

    return init_forward_metadata_out_graph


TARGETS = [
    MethodTarget(MODULE, CLASS, "init_forward_metadata_out_graph", _after_out_graph),
    MethodTarget(MODULE, DRAFT_CLASS, "init_forward_metadata_out_graph", _after_draft_out_graph),
]
