"""SGLang #24394 re-introduced on purpose (``KVTRAP_INJECT=sglang-24394``): the triton backend's
deterministic (unified) extend hands SWA layers untranslated full-pool ids.

The bug (issue #24394, fixed by PR #24395): with ``--enable-deterministic-inference`` the triton backend
runs extend through ``_forward_extend_unified``, which merges each request's prefix ids (the SWA layer's
window rail, already translated to SWA-pool ids) with its current tokens' ids into one ragged list
(``build_unified_kv_indices``). The current tokens' half was ``forward_batch.out_cache_loc``, full-pool ids,
for every layer; on an ``SWAKVPool`` (Gemma 4 and other hybrid-SWA models) SWA layers then read the SWA
pool at full-pool slots: wrong keys while the ids are small, an illegal memory access once they pass the
SWA pool's rows. The fix translates them (``swa_out_cache_loc``), as the KV store already did.

The injection restores that effect in 0.5.23: while ``_forward_extend_unified`` runs for an SWA layer of an
SWA pool, the metadata's ``swa_out_cache_loc`` reads as the untranslated ``out_cache_loc``. The K/V store
(before that call, in ``forward_extend``) still writes the translated slots, as it did upstream.
"""

from __future__ import annotations

from typing import Any

from kvtrap.capture.bugs import patching_bug
from kvtrap.capture.patching import MethodTarget
from kvtrap.capture.sglang_view import SWA, call_arg, is_swa_pool, layer_pool

MODULE = "sglang.srt.layers.attention.triton_backend"
CLASS = "TritonAttnBackend"


def _untranslated_extend(original: Any) -> Any:
    def _forward_extend_unified(self: Any, *args: Any, **kwargs: Any) -> Any:
        # signature: (q, o, layer, forward_batch, causal, logits_soft_cap, sinks, ...) in 0.5.23
        layer = call_arg(args, kwargs, 2, "layer")
        forward_batch = call_arg(args, kwargs, 3, "forward_batch")
        md = self.forward_metadata
        pool = self.token_to_kv_pool
        if layer is None or not is_swa_pool(pool) or layer_pool(pool, int(layer.layer_id))[0] != SWA:
            return original(self, *args, **kwargs)
        translated = md.swa_out_cache_loc
        md.swa_out_cache_loc = forward_batch.out_cache_loc  # the pre-#24395 extend half: full-pool ids
        try:
            return original(self, *args, **kwargs)
        finally:
            md.swa_out_cache_loc = translated

    return _forward_extend_unified


INJECT_TARGETS = [MethodTarget(MODULE, CLASS, "_forward_extend_unified", _untranslated_extend)]

BUG = patching_bug(
    "sglang-24394",
    "triton deterministic extend hands SWA layers untranslated full-pool ids (SGLang #24394)",
    INJECT_TARGETS,
)
