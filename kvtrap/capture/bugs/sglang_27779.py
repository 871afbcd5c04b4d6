"""SGLang #27779 re-introduced on purpose (``KVTRAP_INJECT=sglang-27779``): the same SWA page freed twice.

The bug (fixed by PR #27779): with ``page_size > 1``, ``SWATokenToKVPoolAllocator.free_swa`` cleared
``full_to_swa_index_mapping`` only for the token indices it was given, while the paged sub-allocator
frees whole pages. The other tokens of a partly freed page kept their mapping to an SWA page that was
already back in the free list; a later free of those tokens freed the same SWA page again (or, if it
had been handed out meanwhile, another request's page).

The injection makes ``_expand_to_full_pages`` (which the fix introduced for exactly this) return the
indices unchanged, so 0.5.23's ``free_swa`` reads and clears the mapping of the given tokens only, as
before the fix.
"""

from __future__ import annotations

from typing import Any

from kvtrap.capture.bugs import patching_bug
from kvtrap.capture.patching import MethodTarget

MODULE = "sglang.srt.mem_cache.allocator.swa"
CLASS = "SWATokenToKVPoolAllocator"


def _no_expansion(original: Any) -> Any:
    def _expand_to_full_pages(self: Any, indices: Any) -> Any:
        return indices  # pre-#27779: the freed tokens only, not their whole pages

    return _expand_to_full_pages


INJECT_TARGETS = [MethodTarget(MODULE, CLASS, "_expand_to_full_pages", _no_expansion)]

BUG = patching_bug(
    "sglang-27779",
    "paged SWA free clears the mapping of the freed tokens only: the same SWA page freed twice (SGLang #27779)",
    INJECT_TARGETS,
)
