"""SGLang #24402 re-introduced on purpose (``KVTRAP_INJECT=sglang-24402``): fa3's speculative SWA table
holds full-pool ids.

The bug (issue #24402, fixed by PR #24617): with fa3, EAGLE/EAGLE3 tree speculation (topk > 1) and a
hybrid SWA model (GPT-OSS, Gemma), ``FlashAttentionBackend._init_sliding_window_attn_spec_metadata``
concatenated the prefix rows of ``page_table`` and the draft rows of the expand table into
``swa_spec_metadata.page_table`` without translating them through ``full_to_swa_index_mapping``. SWA
layers of the target-verify forward read that table against the SWA pool: full-pool ids, which fault
once they exceed the SWA pool (an illegal memory access after minutes of MT-Bench in the report) and
read the wrong KV before that.

The injection runs SGLang 0.5.23's own method with ``use_sliding_window_kv_pool`` seen as False for the
duration of the call, which is exactly the pre-fix code path (the fix is the translation under that
flag); nothing else reads the flag in that method. Only the speculative SWA table is affected: the
forward still picks it for SWA layers (``forward_extend`` reads ``swa_spec_metadata`` first).
"""

from __future__ import annotations

from typing import Any

from kvtrap.capture.bugs import patching_bug
from kvtrap.capture.patching import MethodTarget

MODULE = "sglang.srt.layers.attention.flashattention_backend"
CLASS = "FlashAttentionBackend"


def _untranslated(original: Any) -> Any:
    def _init_sliding_window_attn_spec_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
        cached = self.__dict__.get("use_sliding_window_kv_pool")
        self.use_sliding_window_kv_pool = False  # the pre-#24617 code: no translation of either input
        try:
            return original(self, *args, **kwargs)
        finally:
            self.use_sliding_window_kv_pool = cached

    return _init_sliding_window_attn_spec_metadata


INJECT_TARGETS = [MethodTarget(MODULE, CLASS, "_init_sliding_window_attn_spec_metadata", _untranslated)]

BUG = patching_bug(
    "sglang-24402",
    "fa3 speculative SWA page table built from untranslated full-pool ids (SGLang #24402)",
    INJECT_TARGETS,
)
