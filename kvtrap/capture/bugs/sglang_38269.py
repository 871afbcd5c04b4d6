"""SGLang #38269 re-introduced on purpose (``KVTRAP_INJECT=sglang-38269``): the reserved SWA page 0 freed.

The bug (PR #38269 / #38519): PR #38159 moved ``SWAComponent.evict_component`` from ``free_swa(indices)``
to ``free_swa_segment(indices, start_pos=0)``. The node's *full* indices are passed on purpose, so that
slots without an SWA peer (mapping 0) are skipped, but only ``free_swa``'s ``_release_swa`` filters
``> 0``; the segment path turns each unmapped page into ``0 // page_size`` and returns the reserved
padding page 0 to the SWA free list (over-free: ``available_size() > size``, then page 0 handed out to
a real request). 0.5.23 still has the unfiltered segment path (``_free_swa_pages``), reached from the
unified radix cache's ``apply_component_action``.

The injection takes the filter away from the set-shaped path as well: ``_release_swa`` releases the
pages of every slot it is given, as the segment path does. Any ``free_swa`` whose slots include pages
already released from the SWA side (window eviction, a node freed again by its full indices, the page
expansion's unallocated tail) then frees page 0 in the real allocator.
"""

from __future__ import annotations

from typing import Any

from kvtrap.capture.bugs import patching_bug
from kvtrap.capture.patching import MethodTarget

MODULE = "sglang.srt.mem_cache.allocator.swa"
CLASS = "SWATokenToKVPoolAllocator"


def _unfiltered_release(original: Any) -> Any:
    def _release_swa(self: Any, swa_indices: Any) -> None:
        if self.page_size == 1:
            return original(self, swa_indices)
        # the segment path's arithmetic, no `> 0`: an unmapped slot reads 0 and becomes page 0
        import torch

        self.swa_attn_allocator.free_page_ids(torch.unique(swa_indices // self.page_size))

    return _release_swa


INJECT_TARGETS = [MethodTarget(MODULE, CLASS, "_release_swa", _unfiltered_release)]

BUG = patching_bug(
    "sglang-38269",
    "SWA free path without the `> 0` filter returns the reserved SWA page 0 to the free list (SGLang #38269)",
    INJECT_TARGETS,
)
