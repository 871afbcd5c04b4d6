"""Wiring the device guard into SGLang's fa3 backend (``FlashAttentionBackend``, SGLang 0.5.23).

Where fa3 builds the tables a CUDA graph reads (read from 0.5.23's code):

* **Decode, target verify, draft decode, draft extend replays**: the decode graph runner calls
  ``init_forward_metadata_out_graph(fb_view)`` before each replay, *outside* the captured model graph
  (eagerly, or inside SGLang's separate "metadata glue graph" that captures that call itself). It fills
  the static ``page_table`` / ``swa_page_table`` buffers (``normal_decode_set_metadata``, or torch ops
  for topk > 1 and draft extend; the speculative SWA table through ``_init_sliding_window_attn_spec_metadata``).
  kvtrap launches the guard right after it returns, on the same stream, no host sync (so it is also
  capturable into the glue graph): every table the graph will read is checked and bad entries are
  redirected to page 0 before the replay. With ``in_capture=True`` (the runner binds the buffers before
  capturing the model graph) nothing is launched: the tables hold capture placeholders.
* **Draft extend built in the graph** (``init_forward_metadata_in_graph``, draft_extend_v2 only, where
  ``draft_extend_set_metadata`` runs inside the captured graph): the guard launch follows it in the same
  capture, so it is replayed with it.
* **Eager forwards** are checked on the host (:mod:`kvtrap.capture.hooks.fa3`); with ``KVTRAP_GUARD=on``
  the guard also runs after ``init_forward_metadata`` and is drained at once, as for trtllm_mha.

The record, the per-backend state and the drain are :mod:`kvtrap.capture.hooks.device_guard`'s (its
``drain_all``, called at ``process_batch_result_decode`` by :mod:`kvtrap.capture.hooks.step_drain`, drains
fa3's records with trtllm_mha's). Not guarded: the topk > 1 cascade's expand table, the
prefill-aware SWA table, unified (translating) pools.
"""

from __future__ import annotations

from typing import Any

from kvtrap.capture.hooks.device_guard import _after_eager_metadata, guard_metadata, guard_wanted
from kvtrap.capture.patching import MethodTarget
from kvtrap.capture.session import current
from kvtrap.capture.sglang_view import translating

MODULE = "sglang.srt.layers.attention.flashattention_backend"
CLASS = "FlashAttentionBackend"


def _guard_if_wanted(backend: Any, md: Any) -> None:
    session = current()
    if session is None or session.config.guard == "off" or md is None or translating(backend):
        return  # unified pools address pages by virtual ids: the guard's pool bounds do not apply there
    table = getattr(md, "page_table", None)
    if table is not None and guard_wanted(table, session.config.guard):
        guard_metadata(backend, md, publish=True)


def _after_out_graph(original: Any) -> Any:
    def init_forward_metadata_out_graph(self: Any, forward_batch: Any, in_capture: bool = False, **kw: Any) -> Any:
        out = original(self, forward_batch, in_capture=in_capture, **kw)
        if not in_capture:
            _guard_if_wanted(self, getattr(self, "forward_metadata", None))
        return out

    return init_forward_metadata_out_graph


def _after_in_graph(original: Any) -> Any:
    def init_forward_metadata_in_graph(self: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, forward_batch, *args, **kwargs)
        mode = getattr(forward_batch, "forward_mode", None)
        if mode is not None and mode.is_draft_extend_v2():  # the only mode fa3 builds inside the graph
            built = getattr(self, "draft_extend_metadata", {}).get(getattr(forward_batch, "batch_size", None))
            _guard_if_wanted(self, built)
        return out

    return init_forward_metadata_in_graph


TARGETS = [
    MethodTarget(MODULE, CLASS, "init_forward_metadata_out_graph", _after_out_graph),
    MethodTarget(MODULE, CLASS, "init_forward_metadata_in_graph", _after_in_graph),
    MethodTarget(MODULE, CLASS, "init_forward_metadata", _after_eager_metadata),
]
