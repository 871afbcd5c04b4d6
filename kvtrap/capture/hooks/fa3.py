"""fa3 hook: check the paged table SGLang's FlashAttention backend is about to hand a layer's kernel.

``FlashAttentionBackend`` (``sglang.srt.layers.attention.flashattention_backend``) is SGLang 0.5.23's
default attention backend on Hopper for MHA and MLA models (``--attention-backend fa3``; the same class
serves ``fa4``). Before its ``forward_decode`` / ``forward_extend`` (before the K/V store and the
FlashAttention kernels), for the layer:

* which table the kernel gets, chosen as fa3 chooses it (:func:`kvtrap.capture.sglang_view.fa3_handed_table`):
  ``swa_page_table`` for SWA layers when the backend believes it serves an SWA pool
  (``use_sliding_window_kv_pool``, cached at ``__init__``), ``swa_spec_metadata.page_table`` for SWA
  layers in a topk > 1 target verify, ``page_table`` otherwise;
* then the shared checks (:mod:`kvtrap.capture.layer_checks`): index space against the live pool's
  ``layers_mapping``, drift of ``use_sliding_window_kv_pool`` against the live pool, values of the live
  prefix against the pages of the pool the layer reads, rows wider than the table (fa3's eager table is
  ``ceil(max_seq_len_k / page_size)`` columns, cut at the ``req_to_token`` width: speculative rows past
  the context length show up here), page 0 for real requests, and for SWA tables the translation
  ``swa == mapping[full * page_size] // page_size`` (for the speculative SWA table against the full-pool
  rows it was built from: SGLang #24402), then the K/V write locations.

Once per table per forward (one host sync per scan, cached across layers), none during graph capture.
CUDA-graph replays are covered by the device guard (:mod:`kvtrap.capture.hooks.device_guard`).
"""

from __future__ import annotations

from typing import Any

from kvtrap.capture import checks
from kvtrap.capture.layer_checks import wrap_layer_call
from kvtrap.capture.patching import MethodTarget
from kvtrap.capture.sglang_view import HandedTable, fa3_handed_table

MODULE = "sglang.srt.layers.attention.flashattention_backend"
CLASS = "FlashAttentionBackend"
#: The ``--attention-backend`` name this adapter guards (``kvtrap doctor`` reports coverage from it).
ATTENTION_BACKEND = "fa3"


def _picker(method: str):  # type: ignore[no-untyped-def]
    def pick(backend: Any, layer: Any, forward_batch: Any) -> HandedTable | None:
        return fa3_handed_table(backend, layer, method, checks.spec_full_rows)

    return pick


TARGETS = [MethodTarget(MODULE, CLASS, m, wrap_layer_call(m, _picker(m))) for m in ("forward_decode", "forward_extend")]
