"""trtllm_mha hook: check the page table a layer is about to hand the attention kernel.

A thin adapter: which table the backend hands a layer is its own ``_get_layer_page_table``
(:func:`kvtrap.capture.sglang_view.trtllm_handed_table`); the checks, the per-forward caching (a clean
layer costs a few attribute reads and no host sync) and the reporting are shared with every backend
adapter (:mod:`kvtrap.capture.layer_checks`).

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

from kvtrap.capture.layer_checks import wrap_layer_call
from kvtrap.capture.patching import MethodTarget
from kvtrap.capture.sglang_view import trtllm_handed_table

MODULE = "sglang.srt.layers.attention.trtllm_mha_backend"
CLASS = "TRTLLMHAAttnBackend"
#: The ``--attention-backend`` name this adapter guards (``kvtrap doctor`` reports coverage from it).
ATTENTION_BACKEND = "trtllm_mha"


def _pick(backend, layer, forward_batch):  # type: ignore[no-untyped-def]
    return trtllm_handed_table(backend, layer, forward_batch)


TARGETS = [MethodTarget(MODULE, CLASS, m, wrap_layer_call(m, _pick)) for m in ("forward_decode", "forward_extend")]
