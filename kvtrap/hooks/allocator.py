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

from kvtrap import checks
from kvtrap.arming import current
from kvtrap.patching import MethodTarget
from kvtrap.record.context import Context, PoolPages
from kvtrap.record.kinds import Kind
from kvtrap.record.violation import Violation

# SGLang moved the SWA allocator in 0.5.13; older builds keep it beside the pool.
MODULES = ("sglang.srt.mem_cache.allocator.swa", "sglang.srt.mem_cache.swa_memory_pool")
CLASS = "SWATokenToKVPoolAllocator"


def swa_slot_bound(alloc: Any) -> int:
    """Exclusive upper bound of valid SWA slots: pages handed out are 1..num_pages."""
    page_size = int(alloc.page_size)
    sub = getattr(alloc, "swa_attn_allocator", None)
    num_pages = getattr(sub, "num_pages", None)
    if num_pages is None:
        num_pages = int(alloc.size_swa) // page_size
    return (int(num_pages) + 1) * page_size


def _free_pages(sub: Any, page_size: int) -> int | None:
    try:
        return int(sub.available_size()) // page_size
    except Exception:  # a broken free list is what we are reporting; don't die describing it
        return None


def check_allocation(alloc: Any, out: Any, where: str, args: dict[str, Any]) -> None:
    session = current()
    if session is None or out is None or getattr(alloc, "_swa_req_ring", False):
        return
    if checks.is_capturing(out):
        return
    page_size = int(alloc.page_size)
    bound = swa_slot_bound(alloc)
    swa_slots = alloc.full_to_swa_index_mapping[out]
    bad = checks.scan_slots(swa_slots, lower=page_size, bound=bound)
    if bad is None:
        return
    swa_pages = bound // page_size - 1
    full_sub = getattr(alloc, "full_attn_allocator", None)
    full_pages = getattr(full_sub, "num_pages", None)
    violation = Violation(
        kind=Kind.SWA_SLOT_OUT_OF_RANGE,
        summary=(
            f"{where} handed out full slot {int(out.reshape(-1)[bad.row])} whose SWA slot {bad.value} lies "
            f"outside the SWA pool ({swa_pages} pages of {page_size}; page 0 is reserved)"
        ),
        where=where,
        table="out_swa_indices",
        pool="swa",
        row=bad.row,
        column=None,
        value=bad.value,
        lower=page_size,
        bound=bound,
        count=bad.count,
        rows=bad.rows,
        fatal=True,
        details={"full_index": int(out.reshape(-1)[bad.row]), "swa_page": bad.value // page_size},
    )
    context = Context(
        hook=where,
        page_size=page_size,
        size_full=int(alloc.size_full),
        size_swa=int(alloc.size_swa),
        pools={
            "full": PoolPages(pages=None if full_pages is None else int(full_pages) + 1),
            "swa": PoolPages(pages=swa_pages + 1),
        },
        free_pages={
            "full": _free_pages(full_sub, page_size),
            "swa": _free_pages(getattr(alloc, "swa_attn_allocator", None), page_size),
        },
        num_tokens=int(out.numel()),
        args={k: v for k, v in args.items() if isinstance(v, (int, float, str, bool))},
    )
    tensors = {"out_full_indices": out, "out_swa_indices": swa_slots}
    for name in ("seq_lens", "prefix_lens", "last_loc"):
        value = args.get(name)
        if value is not None and hasattr(value, "detach"):
            tensors[name] = value
    session.report(violation, context, tensors)


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
