"""What the attention hooks check once per forward and reuse for every layer of it (the paged checks of
:mod:`kvtrap.capture.layer_checks` and the ragged checks of :mod:`kvtrap.capture.ragged` alike).

A forward is one metadata object (``backend.forward_metadata``, rebuilt by ``init_forward_metadata`` each
forward) against one live pool (``backend.token_to_kv_pool``, swapped by speculative views). The drift of
the backend's cached SWA state, the bounds of each pool type and the value scans of each index set are the
same for every layer of that forward: computed at the first layer (one host sync per scan), then a clean
layer costs a few attribute reads.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from kvtrap.capture.sglang_view import find_drift


@dataclass
class ForwardCache:
    """Checked once per forward. Holding ``md`` keeps its id from being reused, so a new forward never hits it."""

    md: Any
    live: Any
    drift: dict[str, str]
    pages: dict[str, int | None] = field(default_factory=dict)  # layer type -> pages (or rows) of its pool
    scans: dict[tuple[Any, ...], Any] = field(default_factory=dict)  # (index set, bound) -> its scan
    writes: dict[str, tuple[Any, int]] = field(default_factory=dict)  # pool type -> (locations, n) scanned clean
    rails: dict[str, Any] = field(default_factory=dict)  # layer type -> the ragged index sets a layer may read


_forwards: weakref.WeakKeyDictionary[Any, ForwardCache] = weakref.WeakKeyDictionary()


def forward_cache(backend: Any, md: Any, live: Any) -> ForwardCache:
    entry = _forwards.get(backend)
    if entry is None or entry.md is not md or entry.live is not live:
        entry = ForwardCache(md, live, find_drift(backend, live))
        _forwards[backend] = entry
    return entry
