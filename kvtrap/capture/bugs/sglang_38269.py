"""SGLang #38269 re-introduced on purpose (``KVTRAP_INJECT=sglang-38269``): the reserved SWA page 0 freed.

The bug (PR #38269 / #38519): PR #38159 moved ``SWAComponent.evict_component`` from ``free_swa(indices)``
to ``free_swa_segment(indices, start_pos=0)``, passing the node's *full* indices, slots without an SWA
peer (mapping 0) included. The segment path (``_free_swa_pages`` in 0.5.23) does not skip them: each
unmapped page becomes ``0 // page_size`` and the reserved padding page 0 goes back to the SWA free list
(over-free: ``available_size() > size``, or page 0 handed to a real request).

Where the injection sits, and why. 0.5.23's callers hand the segment path mapped slots only. A finished
request goes ``release_kv_cache`` -> ``BasePrefixCache.free_kv_row`` -> ``common.free_kv_row_segments``,
which splits its row: the window-evicted range ``[swa_dead_lo, swa_evicted_seqlen)`` (SWA side already
released by ``free_swa_out_of_window_slots``, mapping cleared) goes to ``free_full_segments``, the rest to
``free_segments`` -> ``free_swa_segment`` -> ``_free_swa_pages`` -> ``free_page_ids``. The injection
takes that split away (the dead range is made empty), so the whole row, window-evicted slots included,
goes down the unfiltered SWA segment path: the same mistake as #38159, a range whose SWA side is gone
sent to the SWA free. It fires at the end of every request whose window was evicted while it ran
(``--disable-radix-cache``: with the radix cache on, the tree takes the row at ``checkpoint`` and the
dead range is already empty). ``free_kv_row`` imports ``free_kv_row_segments`` at each call, so the
module-level name is the one to replace.

Not ``_release_swa`` (this entry's first injection): only ``free_swa`` reaches it, and ``free_swa``'s
callers in 0.5.23 are error cleanup, beam search and the flexkv/lmcache connectors: a real server run
with window eviction (E4B-like, trtllm_mha, page 64) never called it, and the armed run stayed clean.
"""

from __future__ import annotations

from typing import Any

from kvtrap.capture.bugs import patching_bug
from kvtrap.capture.patching import module_function

MODULE = "sglang.srt.mem_cache.common"


def _no_dead_range(original: Any) -> Any:
    def free_kv_row_segments(allocator: Any, segments: Any, **kwargs: Any) -> Any:
        # the window-evicted range no longer goes back full-side only: its unmapped slots reach the SWA free
        kwargs["swa_evicted_seqlen"] = kwargs.get("swa_dead_lo", 0)
        return original(allocator, segments, **kwargs)

    return free_kv_row_segments


INJECT_TARGETS = [module_function(MODULE, "free_kv_row_segments", _no_dead_range)]

BUG = patching_bug(
    "sglang-38269",
    "request release sends window-evicted (unmapped) slots down the SWA segment free: "
    "the reserved SWA page 0 freed (SGLang #38269)",
    INJECT_TARGETS,
)
