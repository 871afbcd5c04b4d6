"""SGLang #26957 re-introduced on purpose (``KVTRAP_INJECT=sglang-26957``).

The bug (PR #25103 introduced it on SGLang main; PRs #26966 / #27491 removed it; no PyPI release has
it): ``TRTLLMHAAttnBackend`` decides at ``__init__`` whether it serves an SWA pool, from the *draft*
runner's own small plain pool, so the draft backend caches ``_swa_kv_pool=None``,
``use_sliding_window_kv_pool=False``, ``_swa_full_to_swa_mapping=None``. At forward time
``frozen_kv_target_view`` / ``target_kv_pool_view`` swap ``backend.token_to_kv_pool`` to the target's
``SWAKVPool``, but the cached SWA state stays stale: SWA layers get full-pool page ids, which fault
once they exceed the SWA pool's page count.

The injection makes ``_resolve_swa_kv_pool`` answer ``None`` for draft workers whose own pool is not SWA,
as the buggy build did (SGLang >= 0.5.13, where that method exists; released builds fall back to the
allocator's pool for frozen-KV drafts). kvtrap's fix for it is :mod:`kvtrap.capture.fixes.sglang_26957`.
"""

from __future__ import annotations

from typing import Any

from kvtrap.capture.bugs import patching_bug
from kvtrap.capture.patching import MethodTarget
from kvtrap.capture.sglang_view import is_swa_pool

MODULE = "sglang.srt.layers.attention.trtllm_mha_backend"
CLASS = "TRTLLMHAAttnBackend"


# ------------------------------------------------------------------------------------- injection
def _buggy_resolver(original: Any) -> staticmethod:
    resolve = original.__func__ if isinstance(original, staticmethod) else original

    def _resolve_swa_kv_pool(model_runner: Any) -> Any:
        # The PR #25103 behaviour: a draft worker whose own pool is not SWA gets no SWA pool, even
        # for frozen-KV MTP, whose layers read the target's SWA pool through the views.
        if getattr(model_runner, "is_draft_worker", False) and not is_swa_pool(model_runner.token_to_kv_pool):
            return None
        return resolve(model_runner)

    return staticmethod(_resolve_swa_kv_pool)


INJECT_TARGETS = [MethodTarget(MODULE, CLASS, "_resolve_swa_kv_pool", _buggy_resolver)]


BUG = patching_bug(
    "sglang-26957",
    "frozen-KV MTP draft backend serves SWA layers the full-pool page table (SGLang #26957)",
    INJECT_TARGETS,
)
