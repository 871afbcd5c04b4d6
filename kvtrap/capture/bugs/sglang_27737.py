"""SGLang #27737 re-introduced on purpose (``KVTRAP_INJECT=sglang-27737``): the flashinfer backend decides
whether it serves an SWA pool from the allocator, not from the active KV pool.

The bug (fixed by PR #27737, "flashinfer swa kv pool fix (dflash gemma 4)"): ``FlashInferAttnBackend`` resolved
its SWA pool at ``__init__`` from ``token_to_kv_pool_allocator`` (an SWA allocator type, then its kvcache).
With Gemma 4 + DFlash the runner's active pool is an SWA pool but its allocator is not an SWA allocator, so
the backend (and the indices updaters, which copy ``_swa_kv_pool``) resolved none: window layers' ids were
planned untranslated (full-pool slots read from the SWA pool) and the SWA write locations were not built.
Upstream it showed as the DFlash accept length collapsing over time. The fix checks the active pool first,
as ``TRTLLMHAAttnBackend._resolve_swa_kv_pool`` does (PR #27491).

The injection restores the allocator-based decision in ``_resolve_swa_kv_pool``; it bites where the active
pool is an SWA pool and the allocator is not an SWA allocator (or its kvcache is another pool).
"""

from __future__ import annotations

from typing import Any

from kvtrap.capture.bugs import patching_bug
from kvtrap.capture.patching import MethodTarget
from kvtrap.capture.sglang_view import is_swa_pool

MODULE = "sglang.srt.layers.attention.flashinfer_backend"
CLASS = "FlashInferAttnBackend"


def _allocator_resolver(original: Any) -> staticmethod:
    def _resolve_swa_kv_pool(model_runner: Any) -> Any:
        from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator

        # the pre-#27737 decision: the allocator's type and its kvcache, never the active pool
        allocator = model_runner.token_to_kv_pool_allocator
        if not isinstance(allocator, SWATokenToKVPoolAllocator):
            return None
        kvcache = allocator.get_kvcache()
        return kvcache if is_swa_pool(kvcache) else None

    return staticmethod(_resolve_swa_kv_pool)


INJECT_TARGETS = [MethodTarget(MODULE, CLASS, "_resolve_swa_kv_pool", _allocator_resolver)]

BUG = patching_bug(
    "sglang-27737",
    "flashinfer resolves its SWA pool from the allocator, not the active pool (SGLang #27737)",
    INJECT_TARGETS,
)
