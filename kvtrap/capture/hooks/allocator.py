"""Allocator traps on ``SWATokenToKVPoolAllocator``: the SWA slots it hands out, and the SWA pages it frees.

**Alloc.** ``alloc_extend`` / ``alloc_decode`` return full-pool token indices and write each one's SWA slot into
``full_to_swa_index_mapping``. Valid SWA slots are ``[page_size, (swa_pages + 1) * page_size)``: page 0
is the reserved padding page and is never handed out. A slot outside that range means the SWA free
list is corrupt (double free, bad page id), and the next KV write for an SWA layer would land outside
the SWA buffers. Not checked: ``None`` results (out of pages), per-request SWA ring mode
(``_swa_req_ring``: the mapping is not written), ``alloc_extend_swa_tail`` (zeros are intended), and
subclasses that override these methods (``UnifiedSWAAllocatorBase`` uses virtual ids).

**Free** (``KVTRAP_FREE_CHECKS=on``, the default when armed; page_size > 1). Every SWA page is checked at
the one place where it re-enters a free list, ``PagedTokenToKVPoolAllocator._release_page_ids`` of the SWA
sub-allocator, *before* it goes in: it must not be the reserved page 0 (SGLang #38269 / PR #38519), it
must be handed out and not yet freed (double free, #27779), and it must have been handed out with one
of the full pages the free call releases (stale full-to-SWA mapping, #25805). The ownership record is
kvtrap's own (:mod:`kvtrap.capture.page_owners`), filled here by the alloc hooks (``alloc_extend``,
``alloc_decode``, and ``set_full_to_swa_mapping``, which ``alloc_extend_swa_tail`` and the radix cache's
mapping rebuild write through) and emptied page by page as frees pass the check.

Free paths of 0.5.23 and how they are covered:
- ``free`` -> ``free_swa`` (page expansion, mapping read and cleared, ``_release_swa`` -> sub ``free``)
  and ``free_segment`` -> ``free_swa_segment`` -> ``_free_swa_pages`` -> sub ``free_page_ids``: wrapped
  so the release knows the full pages being freed; all three checks.
- ``free_group_begin`` / ``free_group_end``: frees inside a group resolve their SWA pages at the call
  and release them at ``free_group_end``; the full pages of the queued frees are kept until then, so
  the release at the group end gets all three checks too.
- radix-cache eviction (``SWARadixCache`` node frees, window eviction ``free_swa_out_of_window_slots``)
  and the unified cache's component frees (``apply_component_action`` -> ``free_swa_segment``) all end
  in ``free_swa`` / ``free_swa_segment``: covered.
- ``free_full`` / ``free_full_segment`` release full pages only: no SWA page moves, nothing to check
  (full-pool double frees are not checked).
- ``alloc_extend_swa_tail``'s ``clear_full_to_swa_mapping`` and ``clear()`` reset the mapping without
  freeing: not a free; ``clear()`` drops kvtrap's record (both free lists start over). A stale mapping
  entry is not judged where it is left (e.g. a head ``alloc_extend_swa_tail`` did not clear) but where
  it is used: at the free that reads it.
- A release with no enclosing SWA free call (code that calls ``swa_attn_allocator.free`` itself): page 0
  and double frees are checked, ownership is not (no full side is known).
Not covered: page_size 1 (``TokenToKVPoolAllocator`` sub-allocators), per-request SWA ring mode
(no paged SWA pages), ``PureSWATokenToKVPoolAllocator`` and the unified allocators (they override the
free methods and address virtual ids), and frees while a CUDA graph is captured (SGLang never frees
there).

**Where the checks trap** (``KVTRAP_ALLOCATOR_TRAP``). ``call``: at the SGLang call, before its result is
used, at one host sync per checked call. ``drain`` (``auto``'s choice for allocators on a CUDA device): the
same checks, as device work only, recorded by :mod:`kvtrap.capture.deferred` and raised where SGLang waits for
a step's results (:mod:`kvtrap.capture.hooks.step_drain`), a step or more after the call. SGLang 0.5.23 runs
the allocator on its schedule stream, which waits on the running forward: a sync there stalls the CPU until
that forward ends and costs the overlap scheduler its lead (measured: benchmarks/results/server-overhead-*).
``KVTRAP_FREE_CHECKS=off`` removes the free checks altogether; ``benchmarks/free_path_bench.py`` measures them.
"""


from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from kvtrap.capture import allocator_kernels, checks, page_owners
from kvtrap.capture.deferred import Finding, Findings
from kvtrap.capture.patching import MethodTarget
from kvtrap.capture.session import Session, current
from kvtrap.capture.sglang_view import allocation_snapshot, free_snapshot, full_page_bound, swa_slot_bound
from kvtrap.capture.verdict import Verdict, judge_allocation, judge_free
from kvtrap.record.violation import KVTrapError

# SGLang moved the SWA allocator in 0.5.13; older builds keep it beside the pool.
MODULES = ("sglang.srt.mem_cache.allocator.swa", "sglang.srt.mem_cache.swa_memory_pool")
CLASS = "SWATokenToKVPoolAllocator"
PAGED_MODULE = "sglang.srt.mem_cache.allocator.paged"
PAGED_CLASS = "PagedTokenToKVPoolAllocator"


def at_drain(session: Session, t: Any) -> bool:
    """Whether this session's allocator checks on ``t``'s device trap at the drain (no host sync): ``drain``, or
    ``auto`` on a CUDA device, where the check kernels can run (elsewhere they run as ``call``)."""
    mode = session.config.allocator_trap
    if mode == "call" or not allocator_kernels.usable(t) or _KERNELS_FAILED in session.warned:
        return False
    return mode == "drain" or bool(getattr(t, "is_cuda", False))


_KERNELS_FAILED = "allocator-kernels-failed"


def _kernels_failed(session: Session, exc: BaseException) -> None:
    """A Triton that cannot build or launch the check kernels (first launch, mid-serving): the session's
    allocator checks go on in call mode, said once, instead of failing an allocation SGLang already made."""
    session.warn_once(_KERNELS_FAILED, f"drain-mode allocator checks unavailable ({type(exc).__name__}: {exc}); "
                                       "checking at each call from now on (KVTRAP_ALLOCATOR_TRAP=call)")  # fmt: skip


_findings: weakref.WeakKeyDictionary[Any, Findings] = weakref.WeakKeyDictionary()
# _findings' items, read by every drain: iterating a WeakKeyDictionary costs microseconds a step. An allocator that
# is gone is skipped (and dropped), as _findings drops it.
_drain_order: list[tuple[weakref.ref[Any], Findings]] = []


def _findings_for(alloc: Any, session: Session, device: Any) -> Findings:
    """The allocator's record in this session (a finding belongs to the session whose checks made it)."""
    found = _findings.get(alloc)
    if found is None or found.session is not session or found.device != device:
        found = _findings[alloc] = Findings(device, session)
        kept = [(ref, f) for ref, f in _drain_order if ref() is not None and ref() is not alloc]
        _drain_order[:] = [*kept, (weakref.ref(alloc), found)]
    return found


def _slot_bad(f: dict[str, int]) -> checks.BadEntries:
    return checks.BadEntries(count=f["count"], rows=(f["position"],), row=f["position"], column=0, value=f["value"])


def _free_bad(f: dict[str, int]) -> checks.BadFree:
    return checks.BadFree(checks.RELEASE_REASONS[f["code"] - 1], f["position"], f["value"], f["owner"], f["count"])


def _flat(t: Any) -> Any:
    """``t`` as the flat contiguous id array the check kernels index; no dispatch when it already is one."""
    return t if t.dim() == 1 and t.is_contiguous() else t.reshape(-1).contiguous()


def check_allocation(alloc: Any, out: Any, where: str, args: dict[str, Any], pairs: tuple[Any, ...] = ()) -> None:
    """Check the SWA slots of an allocation's result ``out``. ``pairs``: the ``set_full_to_swa_mapping`` calls made
    inside the allocation whose ownership notes were held back (:func:`_wrap`): in drain mode the check kernel
    notes ``out``'s pairs itself, so a pair whose full side is ``out`` is noted once, by the kernel; any other
    (or in call mode, every one) is noted here, before the check, where SGLang's call would have noted it."""
    session = current()
    if session is None:
        return
    if out is None or getattr(alloc, "_swa_req_ring", False) or checks.is_capturing(out):
        _note_pairs(session, alloc, pairs)
        return
    lower, bound = int(alloc.page_size), swa_slot_bound(alloc)
    mapping = alloc.full_to_swa_index_mapping
    if at_drain(session, out):
        found = _findings_for(alloc, session, out.device)
        flat = _flat(out)
        swa_slots = torch.empty(flat.shape, dtype=mapping.dtype, device=mapping.device)

        # the judge gets the allocator at the drain: holding it here would keep it alive (the record is weak)
        def judge(a: Any, f: dict[str, int]) -> Verdict:
            return judge_allocation(allocation_snapshot(a, out, swa_slots, where, args), _slot_bad(f))

        rec = page_owners.record_for(alloc, session) if _free_checks(session, alloc) else None
        try:
            allocator_kernels.slot_check_(flat, mapping, swa_slots, lower, bound, None if rec is None else rec.owner,
                                          int(alloc.page_size), found.buf, found.begin(judge))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - any failure to build or launch: call mode, said once
            _kernels_failed(session, exc)
            return check_allocation(alloc, out, where, args, pairs)
        found.snapshot(current=True)
        # the kernel noted out's pairs (rec given); the rest are noted as SGLang's call would have
        _note_pairs(session, alloc, tuple(p for p in pairs if rec is None or p[0] is not out))
        return
    _note_pairs(session, alloc, pairs)
    swa_slots = mapping[out]
    bad = checks.scan_slots(swa_slots, lower=lower, bound=bound)
    if bad is not None:
        verdict = judge_allocation(allocation_snapshot(alloc, out, swa_slots, where, args), bad)
        session.report(verdict.violation, verdict.context, verdict.tensors)
    note_allocation(session, alloc, out, swa_slots)


def drain_findings(session: Session, *, wait: bool = False) -> None:
    """Report the first finding any allocator's drain-mode checks recorded, once its device work is done.

    Called where SGLang waits for a step's results, after that step's ``copy_done``
    (:mod:`kvtrap.capture.hooks.step_drain`): never waits there. ``wait``: when the scheduler is idle (nothing
    else to wait for; the frees of the last finished requests are checked after the last step's drain)."""
    for ref, found in tuple(_drain_order):
        if found.session is session:
            alloc = ref()
            if alloc is not None:
                _report(session, alloc, found.take(wait=wait))


def _report(session: Session, alloc: Any, finding: Finding | None) -> None:
    if finding is not None:
        verdict = _drained_verdict(alloc, finding)
        session.report(verdict.violation, verdict.context, verdict.tensors)


def _report_pending_instead(session: Session, alloc: Any, exc: BaseException) -> None:
    """SGLang failed inside a checked call (e.g. its free-list size assert after a double free): if kvtrap's
    drain-mode checks found the cause, wait for them and raise that instead, chained to SGLang's error."""
    found = _findings.get(alloc)
    if found is None or found.session is not session:
        return
    try:
        _report(session, alloc, found.take(wait=True))
    except KVTrapError as err:
        raise err from exc


def _drained_verdict(alloc: Any, finding: Finding) -> Verdict:
    f = finding.fields
    if finding.judge is not None:
        verdict = finding.judge(alloc, f)
    elif f["code"] == checks.OUT_OF_RANGE:  # the call is older than the remembered ones: the record alone
        verdict = judge_allocation(allocation_snapshot(alloc, None, None, CLASS, {}), _slot_bad(f))
    else:
        verdict = judge_free(free_snapshot(alloc, torch.empty(0), None, None, CLASS, None), _free_bad(f))
    details = dict(verdict.violation.details or {})
    details["trapped_at"] = (
        "drain: found by a device-side check (KVTRAP_ALLOCATOR_TRAP=drain) and read where SGLang waited for a"
        f" later step; checked call #{f['call']} of this allocator"
    )
    return dataclasses.replace(verdict, violation=dataclasses.replace(verdict.violation, details=details))


# ------------------------------------------------------------------------------------------ free path
def _free_checks(session: Session | None, alloc: Any) -> bool:
    return (
        session is not None
        and session.config.free_checks == "on"
        and int(alloc.page_size) > 1
        and not getattr(alloc, "_swa_req_ring", False)
    )


def note_allocation(session: Session, alloc: Any, out: Any, swa_slots: Any) -> None:
    """Record the SWA pages an allocation handed out, with their full pages (no host sync)."""
    if _free_checks(session, alloc):
        page_owners.record_for(alloc, session).note_pairs(out, swa_slots)


def _note_pairs(session: Session, alloc: Any, pairs: tuple[Any, ...]) -> None:
    for full_indices, swa_indices in pairs:
        note_allocation(session, alloc, full_indices, swa_indices)


@dataclass
class _Freeing:
    alloc: Any
    where: str
    free_index: Any  # the call's token indices (None at free_group_end)
    freeing: Any  # what the call releases: ``freeing // div`` are its full pages (None: unknown)
    div: int

    def full_pages(self) -> Any:
        return None if self.freeing is None else self.freeing.to(torch.int64) // self.div


@dataclass
class _Allocating:
    """An ``alloc_extend`` / ``alloc_decode`` in progress: the ``set_full_to_swa_mapping`` pairs SGLang wrote
    inside it, whose ownership notes wait for the call's check (which notes them in its kernel in drain mode)."""

    alloc: Any
    pairs: list[tuple[Any, Any]] = dataclasses.field(default_factory=list)


_Call = TypeVar("_Call", _Freeing, _Allocating)
_local = threading.local()


def _stack() -> list[Any]:
    """This thread's SWA free calls (:class:`_Freeing`) and allocations (:class:`_Allocating`) in progress."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _innermost(alloc: Any, kind: type[_Call]) -> _Call | None:
    """This thread's innermost call in progress, if it is a ``kind`` call on ``alloc``."""
    stack = getattr(_local, "stack", None)
    if stack and stack[-1].alloc is alloc and isinstance(stack[-1], kind):
        return stack[-1]
    return None


def _wrap_swa_free(method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    where = f"{CLASS}.{method}"

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Any, free_index: Any, *args: Any, **kwargs: Any) -> Any:
            session = current()
            if not _free_checks(session, self) or free_index.numel() == 0 or checks.is_capturing(free_index):
                return original(self, free_index, *args, **kwargs)
            rec = page_owners.record_for(self, session)
            if self.free_group is not None:  # released at free_group_end; SGLang may reuse free_index by then
                rec.pending_full_pages.append(free_index.to(torch.int64) // rec.page_size)
            # not unique'd (a host sync): the checks test membership, dumps unique them when judged
            stack = _stack()
            stack.append(_Freeing(self, where, free_index, free_index, rec.page_size))
            try:
                return _call_checked(session, self, free_index, original, self, free_index, *args, **kwargs)
            finally:
                stack.pop()

        return wrapper

    return make


def _call_checked(session: Session, alloc: Any, t: Any, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``original(*args, **kwargs)``; in drain mode an exception from SGLang inside it (its own assert after a
    double free) is replaced by kvtrap's finding for the call, when the checks found one."""
    try:
        return original(*args, **kwargs)
    except KVTrapError:
        raise
    except Exception as exc:
        if t is not None and at_drain(session, t):
            _report_pending_instead(session, alloc, exc)
        raise


def _wrap_group_end(original: Callable[..., Any]) -> Callable[..., Any]:
    where = f"{CLASS}.free_group_end"

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        session = current()
        rec = page_owners.existing(self, session) if _free_checks(session, self) else None
        if rec is None:
            return original(self, *args, **kwargs)
        pending, rec.pending_full_pages = rec.pending_full_pages, []
        # each entry is kvtrap's own fresh tensor (the division at the free): one needs no copy
        full_pages = (pending[0] if len(pending) == 1 else torch.cat(pending)) if pending else None
        stack = _stack()
        stack.append(_Freeing(self, where, None, full_pages, 1))
        try:
            return _call_checked(session, self, full_pages, original, self, *args, **kwargs)
        finally:
            stack.pop()

    return wrapper


def _wrap_clear(original: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        page_owners.drop(self)  # both free lists and the mapping start over
        return out

    return wrapper


def _wrap_release(original: Callable[..., Any]) -> Callable[..., Any]:
    """``PagedTokenToKVPoolAllocator._release_page_ids``: where freed pages enter the free list."""

    def wrapper(self: Any, *page_ids: Any) -> Any:
        alloc = page_owners.parent_of(self)
        session = current()
        if alloc is None or not _free_checks(session, alloc) or not page_ids or checks.is_capturing(page_ids[0]):
            return original(self, *page_ids)
        rec = page_owners.record_for(alloc, session)
        # SGLang's released page ids are fresh tensors it never writes again (unique, ``// page_size``, cat
        # results): one is used as it is, which the kernel and a judged dump read, not copied
        pages = _flat(page_ids[0]) if len(page_ids) == 1 else torch.cat([p.reshape(-1) for p in page_ids])
        ctx = _innermost(alloc, _Freeing)
        where = ctx.where if ctx is not None else f"{PAGED_CLASS}._release_page_ids"
        drain = at_drain(session, pages)
        free_index = None if ctx is None else ctx.free_index
        freeing = None if ctx is None else ctx.freeing
        div = 1 if ctx is None else ctx.div
        if drain and free_index is not None:  # judged a step later: SGLang passes views of rows it reuses
            kept = free_index.clone()
            freeing = kept if freeing is free_index else freeing
            free_index = kept

        def judge(a: Any, bad: checks.BadFree) -> Verdict:
            full = None if freeing is None else torch.unique(freeing.to(torch.int64) // div)
            return judge_free(free_snapshot(a, pages, full, free_index, where, rec.owner[:-1]), bad)

        if drain:
            found = _findings_for(alloc, session, pages.device)
            seq = found.begin(lambda a, f: judge(a, _free_bad(f)))
            try:
                # also marks the pages freed in kvtrap's record (no rec.note_freed below)
                allocator_kernels.release_check_(pages, rec.owner, freeing, div, rec.stamps(full_page_bound(alloc)),
                                                 found.buf, seq)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - any failure to build or launch: call mode, said once
                _kernels_failed(session, exc)
            else:
                found.snapshot(current=True)
                return original(self, *page_ids)
        full_pages = None if ctx is None else ctx.full_pages()
        bad = checks.scan_swa_release(pages, rec.owner, full_pages, full_page_bound(alloc))
        if bad is not None:
            verdict = judge(alloc, bad)
            session.report(verdict.violation, verdict.context, verdict.tensors)  # raises before the release
        out = original(self, *page_ids)
        rec.note_freed(pages)
        return out

    return wrapper


def _wrap_set_mapping(original: Callable[..., Any]) -> Callable[..., Any]:
    """``set_full_to_swa_mapping``: every pairing of full slots with fresh SWA slots outside alloc_decode."""

    def wrapper(self: Any, full_indices: Any, swa_indices: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, full_indices, swa_indices, *args, **kwargs)
        session = current()
        if session is not None and full_indices.numel() and not checks.is_capturing(full_indices):
            allocating = _innermost(self, _Allocating)
            if allocating is not None:  # inside alloc_extend: noted by its check (check_allocation)
                allocating.pairs.append((full_indices, swa_indices))
            else:
                note_allocation(session, self, full_indices, swa_indices)
        return out

    return wrapper


def _note_pairs_now(alloc: Any, allocating: _Allocating) -> None:
    session = current()
    if session is not None:
        _note_pairs(session, alloc, tuple(allocating.pairs))


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
            if current() is None:
                return original(self, *args, **kwargs)
            allocating = _Allocating(self)
            stack = _stack()
            stack.append(allocating)
            try:
                out = original(self, *args, **kwargs)
            except BaseException:
                _note_pairs_now(self, allocating)  # the mapping SGLang wrote before raising stays noted
                raise
            finally:
                stack.pop()
            try:
                check_allocation(self, out, where, _bind(names, args, kwargs), tuple(allocating.pairs))
            except BaseException:
                _note_pairs_now(self, allocating)  # a check that failed before its notes must not lose them
                raise  # (notes are idempotent: one already made is made again, the same)
            return out

        return wrapper

    return make


TARGETS = [
    MethodTarget(module, CLASS, method, _wrap(method, names))
    for module in MODULES
    for method, names in (("alloc_extend", _EXTEND_ARGS), ("alloc_decode", _DECODE_ARGS))
] + [
    target
    for module in MODULES
    for target in (
        MethodTarget(module, CLASS, "set_full_to_swa_mapping", _wrap_set_mapping),
        MethodTarget(module, CLASS, "free_swa", _wrap_swa_free("free_swa")),
        MethodTarget(module, CLASS, "free_swa_segment", _wrap_swa_free("free_swa_segment")),
        MethodTarget(module, CLASS, "free_group_end", _wrap_group_end),
        MethodTarget(module, CLASS, "clear", _wrap_clear),
    )
] + [MethodTarget(PAGED_MODULE, PAGED_CLASS, "_release_page_ids", _wrap_release)]
