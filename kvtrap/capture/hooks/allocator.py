"""Allocator trap: every SWA slot handed out by ``SWATokenToKVPoolAllocator`` must lie in the SWA pool.

``alloc_extend`` / ``alloc_decode`` return full-pool token indices and write each one's SWA slot into
``full_to_swa_index_mapping``. Valid SWA slots are ``[page_size, (swa_pages + 1) * page_size)``: page 0
is the reserved padding page and is never handed out. A slot outside that range means the SWA free
list is corrupt (double free, bad page id), and the next KV write for an SWA layer would land outside
the SWA buffers.

Not checked (SGLang semantics, see the notes): ``None`` results (out of pages), per-request SWA ring
mode (``_swa_req_ring``: the mapping is not written), ``alloc_extend_swa_tail`` (zeros are intended),
and subclasses that override these methods (``UnifiedSWAAllocatorBase`` uses virtual ids).
"""


from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvtrap.capture import checks
from kvtrap.capture.patching import MethodTarget
from kvtrap.capture.session import current
from kvtrap.capture.sglang_view import allocation_snapshot, swa_slot_bound
from kvtrap.capture.verdict import judge_allocation

# SGLang moved the SWA allocator in 0.5.13; older builds keep it beside the pool.
MODULES = ("sglang.srt.mem_cache.allocator.swa", "sglang.srt.mem_cache.swa_memory_pool")
CLASS = "SWATokenToKVPoolAllocator"


def check_allocation(alloc: Any, out: Any, where: str, args: dict[str, Any]) -> None:
    session = current()
    if session is None or out is None or getattr(alloc, "_swa_req_ring", False):
        return
    if checks.is_capturing(out):
        return
    swa_slots = alloc.full_to_swa_index_mapping[out]
    bad = checks.scan_slots(swa_slots, lower=int(alloc.page_size), bound=swa_slot_bound(alloc))
    if bad is None:
        return
    verdict = judge_allocation(allocation_snapshot(alloc, out, swa_slots, where, args), bad)
    session.report(verdict.violation, verdict.context, verdict.tensors)


def _bind(names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


_EXTEND_ARGS = ("prefix_lens", "prefix_lens_cpu", "seq_lens", "seq_lens_cpu", "last_loc", "extend_num_tokens")
_DECODE_ARGS = ("seq_lens", "seq_lens_cpu", "last_loc")


def _wrap(method: str, names: tuple[str, ...]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    where = f"{CLASS}.{method}"

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(self, *args, **kwargs)
            check_allocation(self, out, where, _bind(names, args, kwargs))
            return out

        return wrapper

    return make


TARGETS = [
    MethodTarget(module, CLASS, method, _wrap(method, names))
    for module in MODULES
    for method, names in (("alloc_extend", _EXTEND_ARGS), ("alloc_decode", _DECODE_ARGS))
]
