"""Wiring the device guard into SGLang's flashinfer backend (``FlashInferAttnBackend``, SGLang 0.5.23): the ids its
CUDA-graph wrappers run on.

Where flashinfer builds what a CUDA graph reads (read from 0.5.23's code): before every replay the decode graph
runner calls ``init_forward_metadata_out_graph(fb_view)`` outside the captured graph; its indices updater gathers
each wrapper's ids straight into the cuda-graph wrapper's ``_paged_kv_indices_buf`` (wrapper 0 translated to
SWA-pool ids when the updater has an SWA pool), and ``plan`` copies the offsets into its ``_paged_kv_indptr_buf``
(planning reads lengths only, never ids). The captured ``run`` reads both. kvtrap launches the ragged guard
(:func:`kvtrap.capture.hooks.triton_guard.guard_rails`, the same kernel, record and drain as triton's) on each
wrapper's buffers right after that call returns: on the same stream, after ``plan``'s copies, no host sync.
Modes: decode, target verify, draft extend v2 (:func:`kvtrap.capture.sglang_view.flashinfer_graph_rails`); with
``in_capture=True`` nothing is launched (placeholders). Not guarded on the device: dLLM and prefill CUDA graphs,
the multi-step draft backend's per-step wrappers, unified (translating) pools.
"""

from __future__ import annotations

from typing import Any

from kvtrap.capture.hooks.device_guard import guard_wanted
from kvtrap.capture.hooks.triton_guard import guard_rails
from kvtrap.capture.patching import MethodTarget
from kvtrap.capture.session import current
from kvtrap.capture.sglang_view import flashinfer_graph_rails, translating

MODULE = "sglang.srt.layers.attention.flashinfer_backend"
CLASS = "FlashInferAttnBackend"


def _after_out_graph(original: Any) -> Any:
    def init_forward_metadata_out_graph(self: Any, forward_batch: Any, in_capture: bool = False, **kw: Any) -> Any:
        out = original(self, forward_batch, in_capture=in_capture, **kw)
        session = current()
        if in_capture or session is None or session.config.guard == "off" or translating(self):
            return out
        rails = flashinfer_graph_rails(self, forward_batch)
        if rails and guard_wanted(next(iter(rails.values())).indices, session.config.guard):
            guard_rails(self, rails, publish=True)
        return out

    return init_forward_metadata_out_graph


TARGETS = [MethodTarget(MODULE, CLASS, "init_forward_metadata_out_graph", _after_out_graph)]
