"""SGLang #25805 re-introduced on purpose (``KVTRAP_INJECT=sglang-25805``): stale full-to-SWA mappings
after ``alloc_extend_swa_tail``.

The bug (fixed by PR #25805, seen in disaggregated decode with MTP): ``alloc_extend_swa_tail`` gives the
whole extend full KV but only its tail SWA KV, and wrote the mapping for the tail only. The head's full
slots are recycled pages; when those still held a previous request's mapping, the head kept pointing at
SWA pages it never owned, and freeing or evicting the request freed them: a double free of pages already
released, or another request's live page (``available_size() > size`` assertions after ~2000 requests).
The fix clears the head's mapping (``clear_full_to_swa_mapping(alloc_full_indices[:-swa_tail_len])``).

The injection runs 0.5.23's method and then puts back the head entries it cleared, which leaves the
mapping as the unfixed method did.
"""

from __future__ import annotations

from typing import Any

from kvtrap.capture.bugs import patching_bug
from kvtrap.capture.patching import MethodTarget

MODULE = "sglang.srt.mem_cache.allocator.swa"
CLASS = "SWATokenToKVPoolAllocator"


def _keep_head_mapping(original: Any) -> Any:
    def alloc_extend_swa_tail(self: Any, *args: Any, **kwargs: Any) -> Any:
        before = self.full_to_swa_index_mapping.clone()
        out = original(self, *args, **kwargs)
        tail = kwargs["swa_tail_len"] if "swa_tail_len" in kwargs else args[6]
        if out is not None and 0 < tail < out.numel():
            head = out[:-tail]
            self.full_to_swa_index_mapping[head] = before[head]  # what was there before the call
        return out

    return alloc_extend_swa_tail


INJECT_TARGETS = [MethodTarget(MODULE, CLASS, "alloc_extend_swa_tail", _keep_head_mapping)]

BUG = patching_bug(
    "sglang-25805",
    "alloc_extend_swa_tail leaves recycled full slots mapped to SWA pages they do not own (SGLang #25805)",
    INJECT_TARGETS,
)
