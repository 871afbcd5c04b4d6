"""Allocator checks in drain mode (``KVTRAP_ALLOCATOR_TRAP=drain``) on a real SWAKVPool + SWATokenToKVPoolAllocator
(sglang==0.5.23, CPU): the check reads no device value at the SGLang call, the call goes through exactly as
unarmed, and the finding is raised by SGLang's own ``process_batch_result_decode`` / ``_prefill`` (wrapped by
kvtrap's drain point) with the same violation call mode raises at the call."""

from __future__ import annotations

import os
import random
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kvtrap
from kvtrap.capture.hooks import allocator
from kvtrap.record.dumpfile import load_dump

pytest.importorskip("sglang")

from helpers import sglang_world as w  # noqa: E402
from helpers import trapdumps as td  # noqa: E402

KVTRAP = str(Path(kvtrap.__file__).parent)
# the tests that build their world on CPU tensors (skipped where Triton compiles)
cpu_world = pytest.mark.cpu_world(gpu="this file's test_cuda_allocator_defaults_to_drain_*")


def _processor():
    from sglang.srt.managers.scheduler_components.batch_result_processor import SchedulerBatchResultProcessor

    return object.__new__(SchedulerBatchResultProcessor)  # the drain runs before SGLang's body needs any state


def _outcome(call) -> str | None:
    try:
        call()
    except kvtrap.KVTrapError:
        raise
    except Exception as exc:  # noqa: BLE001 - SGLang's own reaction is part of what must not change
        return type(exc).__name__
    return None


#: aten ops that read a device value on the host (a sync on CUDA): scalar reads (item, int(), bool(), indexing
#: with a 0-dim tensor), and ops whose output size depends on the data.
SYNCING = {"_local_scalar_dense", "is_nonzero", "nonzero", "nonzero_static", "_unique", "_unique2", "unique_dim",
           "unique_consecutive", "masked_select", "isin", "equal", "repeat_interleave"}  # fmt: skip


class _SyncSpy(TorchDispatchMode):
    """Every host-reading aten op issued by kvtrap's own code (the innermost frame outside torch; SGLang's own
    reads inside a wrapped call are not kvtrap's); boolean-mask indexing counts too (nonzero inside the kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        syncing = name in SYNCING
        if name in ("index", "index_put", "index_put_") and len(args) > 1:
            syncing = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
        if syncing:
            # the innermost frame outside torch and this spy: kvtrap's own code, or SGLang's (not counted)
            caller = next((f for f in reversed(traceback.extract_stack())
                           if f.filename != __file__ and f"{os.sep}torch{os.sep}" not in f.filename), None)  # fmt: skip
            if caller is not None and caller.filename.startswith(KVTRAP):
                self.hits.append(f"{name} at {caller.filename}:{caller.lineno}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_host_reads_from_kvtrap():
    """Records kvtrap's host reads of tensor values during the test (enter ``spy`` around the calls)."""
    return _SyncSpy()


@cpu_world
def test_the_spy_sees_kvtraps_host_reads(tmp_path):
    """The control: call mode reads on the host at every checked free, and the spy says so."""
    spy = _SyncSpy()
    with kvtrap.armed(dump_dir=str(tmp_path), allocator_trap="call"):
        alloc = w.make_allocator(w.make_pool())
        batch = w.allocate_requests(alloc, [40, 20])
        with spy:
            alloc.free(batch.token_slots[0])
    assert any(h.startswith(("_local_scalar_dense", "is_nonzero")) for h in spy.hits), spy.hits


@cpu_world
@pytest.mark.parametrize(
    "world,kind",
    [
        (td.swa_double_free_world, "swa_double_free"),
        (td.swa_not_owned_world, "swa_free_not_owned"),
        (td.swa_page0_free_world, "swa_free_reserved_page"),
    ],
)
def test_bad_free_goes_through_and_is_raised_at_the_decode_drain(tmp_path, world, kind, no_host_reads_from_kvtrap):
    from sglang.srt.managers.utils import GenerationBatchResult

    # call mode: the reference violation, at the call
    call_path, call_err = td.fire_world(tmp_path / "call", world)
    # unarmed: what the bad call does without kvtrap (SGLang's own free-list size assert catches a double free)
    plain_alloc, _, plain_call = world(tmp_path)
    plain_raised = _outcome(plain_call)
    plain_after = w.allocator_state(plain_alloc)
    with kvtrap.armed(mode="raise", dump_dir=str(tmp_path / "drain"), allocator_trap="drain"):
        alloc, _, call = world(tmp_path)
        try:
            with no_host_reads_from_kvtrap:
                outcome = _outcome(call)
            err = None
        except kvtrap.KVTrapError as exc:
            # SGLang failed inside the call: kvtrap waited for its finding and raised it, chained to SGLang's
            err, outcome = exc, type(exc.__cause__).__name__
        assert outcome == plain_raised  # SGLang did what it does unarmed
        if err is None:
            assert no_host_reads_from_kvtrap.hits == []  # no host read by kvtrap at the call
            with pytest.raises(kvtrap.KVTrapError) as info:
                _processor().process_batch_result_decode(None, GenerationBatchResult())
            err = info.value
        after = w.allocator_state(alloc)
        # the record is reset once read: the next drain is quiet
        allocator.drain_findings(kvtrap.capture.session.current())
    assert all(torch.equal(a, b) for a, b in zip(plain_after, after, strict=True))  # exactly as unarmed
    v, ref = err.violation, call_err.violation
    assert v.kind == ref.kind == kind
    assert (v.where, v.value, v.row) == (ref.where, ref.value, ref.row)
    assert v.details["owner_full_page"] == ref.details["owner_full_page"]
    assert v.details["trapped_at"].startswith("drain: found by a device-side check")
    dump = load_dump(err.dump_path)
    assert dump.manifest["config"]["allocator_trap"] == "drain"
    assert torch.equal(torch.as_tensor(dump.tensors["released_swa_pages"]),
                       torch.as_tensor(load_dump(call_path).tensors["released_swa_pages"]))  # fmt: skip


@cpu_world
def test_out_of_range_alloc_is_raised_at_the_prefill_drain(tmp_path, no_host_reads_from_kvtrap):
    pool = w.make_pool()
    alloc = w.make_allocator(pool)
    batch = w.allocate_requests(alloc, [w.PAGE_SIZE])
    alloc.swa_attn_allocator.free_pages[0] = w.SWA_PAGES + 1  # the first page id past the pool
    seq = torch.tensor([w.PAGE_SIZE + 1])
    last = batch.token_slots[0][-1:].clone()
    with kvtrap.armed(dump_dir=str(tmp_path), allocator_trap="drain"):
        with no_host_reads_from_kvtrap:
            out = alloc.alloc_decode(seq, seq.clone(), last)
        assert no_host_reads_from_kvtrap.hits == []
        assert out is not None
        with pytest.raises(kvtrap.KVTrapError) as info:
            _processor().process_batch_result_prefill(None, None)
    v = info.value.violation
    assert v.kind == "swa_slot_out_of_range" and v.where.endswith("alloc_decode")
    assert v.value == v.bound == (w.SWA_PAGES + 1) * w.PAGE_SIZE
    assert int(load_dump(info.value.dump_path).tensors["out_full_indices"][0]) == int(out[0])


@cpu_world
def test_first_finding_wins_and_later_checks_do_not_overwrite_it(tmp_path):
    with kvtrap.armed(mode="raise", dump_dir=str(tmp_path), allocator_trap="drain"):
        alloc, _, call = td.swa_not_owned_world(tmp_path)
        call()
        found = allocator._findings[alloc]
        first_seq = int(found.buf[5])
        assert first_seq > 0
        w.allocate_requests(alloc, [30])  # more checked calls, all clean
        with pytest.raises(kvtrap.KVTrapError) as info:
            allocator.drain_findings(kvtrap.capture.session.current())
    assert info.value.violation.kind == "swa_free_not_owned"
    assert f"checked call #{first_seq} " in info.value.violation.details["trapped_at"]


def _random_steps(alloc, rng: random.Random, steps: int):
    outs = []
    live: list[torch.Tensor] = []
    for _ in range(steps):
        if live and rng.random() < 0.1:  # window eviction of a request's first page, then the rest
            slots = live.pop(rng.randrange(len(live)))
            if len(slots) > w.PAGE_SIZE:
                alloc.free_swa_segment(slots[: w.PAGE_SIZE], start_pos=0)
                alloc.free_full_segment(slots[: w.PAGE_SIZE], start_pos=0)
                alloc.free_segment(slots[w.PAGE_SIZE :], start_pos=w.PAGE_SIZE)
            else:
                alloc.free(slots)
            outs.append("segment")
            continue
        if len(live) > 1 and rng.random() < 0.15:
            alloc.free_group_begin()
            for _ in range(2):
                alloc.free(live.pop(rng.randrange(len(live))))
            alloc.free_group_end()
            outs.append("group")
            continue
        if live and rng.random() < 0.35:
            alloc.free(live.pop(rng.randrange(len(live))))
            outs.append("free")
            continue
        n = rng.randint(1, 3 * w.PAGE_SIZE)
        try:
            live.append(w.allocate_requests(alloc, [n]).token_slots[0])
            outs.append(live[-1].clone())
        except AssertionError:  # out of pages: free everything
            while live:
                alloc.free(live.pop())
            outs.append(None)
    return outs


@cpu_world
def test_clean_random_steps_find_nothing_and_match_unarmed(tmp_path, no_host_reads_from_kvtrap):
    plain_alloc = w.make_allocator(w.make_pool())
    plain = _random_steps(plain_alloc, random.Random(3), 400)
    armed_alloc = w.make_allocator(w.make_pool())
    with kvtrap.armed(dump_dir=str(tmp_path), allocator_trap="drain") as session:
        with no_host_reads_from_kvtrap:
            armed = _random_steps(armed_alloc, random.Random(3), 400)
        assert no_host_reads_from_kvtrap.hits == []  # allocs, frees, segment frees, free groups: no host read
        assert {"free", "segment", "group"} <= {o for o in armed if isinstance(o, str)}
        allocator.drain_findings(session)  # nothing recorded: returns quietly
        assert allocator._findings[armed_alloc].seq > 100  # the checks really ran
    assert len(plain) == len(armed)
    for a, b in zip(plain, armed, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    assert all(torch.equal(a, b) for a, b in zip(w.allocator_state(plain_alloc), w.allocator_state(armed_alloc), strict=True))
    assert not list(tmp_path.iterdir())


def test_drain_needs_a_device_the_kernels_run_on_and_auto_means_cuda(tmp_path, monkeypatch):
    """Drain mode's checks are Triton kernels: they run on CUDA tensors, and on CPU tensors only under Triton's
    interpreter. Where they cannot run, ``drain`` checks as ``call`` (still trapped, at the call); ``auto`` is drain
    on CUDA only. Both interpreter states are pinned, so this holds alike on the CPU suite (interpreting) and on a
    CUDA machine (compiling, where a CPU tensor cannot take the kernels)."""
    cpu, cuda = torch.zeros(1), SimpleNamespace(is_cuda=True)  # at_drain reads only the tensor's device
    with kvtrap.armed(dump_dir=str(tmp_path)) as session:
        assert session.config.allocator_trap == "auto"
        for interpreting in (True, False):
            monkeypatch.setenv("TRITON_INTERPRET", "1" if interpreting else "0")
            assert not allocator.at_drain(session, cpu)  # auto on CPU: call mode, kernels or not
            assert allocator.at_drain(session, cuda)
    with kvtrap.armed(dump_dir=str(tmp_path), allocator_trap="drain") as session:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert allocator.at_drain(session, cpu)  # the interpreter runs the kernels on CPU tensors
        monkeypatch.delenv("TRITON_INTERPRET")
        assert not allocator.at_drain(session, cpu)  # compiled Triton refuses CPU tensors: call mode
        assert allocator.at_drain(session, cuda)
    with kvtrap.armed(dump_dir=str(tmp_path), allocator_trap="call") as session:
        assert not allocator.at_drain(session, cuda)


def test_bad_setting_is_a_config_error():
    with pytest.raises(kvtrap.ConfigError, match="allocator_trap must be one of auto, call, drain"):
        kvtrap.Config.from_env({"KVTRAP_ALLOCATOR_TRAP": "sometimes"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_allocator_defaults_to_drain_and_reads_a_snapshot_only_after_its_event(tmp_path):
    """On CUDA, ``auto`` is drain mode: the free check is device work only, a drain before that work has run
    stays quiet (it never waits), and once it has run the drain raises call mode's violation.

    The GPU sleep that holds the check's device work back is queued where the freed SWA pages enter the free
    list (the sub-allocator's ``_release_page_ids``, checked there by kvtrap's class-level wrapper), just
    before kvtrap's check: SGLang syncs earlier on the free path (its boolean mask and ``torch.unique`` in
    ``_release_swa`` / ``free``), which would wait the sleep out first. ``free_swa`` (what radix-cache eviction
    calls) is the free path with no sync after the release (``free`` goes on to ``free_full``, whose
    ``torch.unique`` would wait for the check). If kvtrap's free check moves elsewhere, move the sleep with it."""
    from sglang.srt.managers.utils import GenerationBatchResult

    alloc = w.make_allocator(w.make_pool(device="cuda"), device="cuda")
    sub = alloc.swa_attn_allocator

    def sleep_then_release(*page_ids):
        torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU cycles queued ahead of the check's device work
        return type(sub)._release_page_ids(sub, *page_ids)  # the class's method: kvtrap's wrapper when armed

    with kvtrap.armed(mode="raise", dump_dir=str(tmp_path)) as session:
        batch = w.allocate_requests(alloc, [40, 20])
        assert allocator.at_drain(session, alloc.full_to_swa_index_mapping)
        a, b = batch.token_slots
        first = slice(0, w.PAGE_SIZE)
        alloc.full_to_swa_index_mapping[a[first]] = alloc.full_to_swa_index_mapping[b[first]]
        torch.cuda.synchronize()
        sub._release_page_ids = sleep_then_release  # this instance only, for this free
        alloc.free_swa(a)  # request A's first page maps to B's live SWA page
        del sub._release_page_ids
        found = allocator._findings[alloc]
        assert found.host[0].is_pinned() and found.events[0] is not None
        allocator.drain_findings(session)  # the check has not run yet: nothing to read, no wait
        torch.cuda.synchronize()
        with pytest.raises(kvtrap.KVTrapError) as info:
            _processor().process_batch_result_decode(None, GenerationBatchResult())
    assert info.value.violation.kind == "swa_free_not_owned"
    assert info.value.violation.details["trapped_at"].startswith("drain")


@cpu_world
def test_a_finding_whose_call_is_forgotten_is_still_reported_from_the_record(tmp_path):
    pool = w.make_pool()
    alloc = w.make_allocator(pool)
    batch = w.allocate_requests(alloc, [w.PAGE_SIZE])
    alloc.swa_attn_allocator.free_pages[0] = w.SWA_PAGES + 1
    seq = torch.tensor([w.PAGE_SIZE + 1])
    with kvtrap.armed(dump_dir=str(tmp_path), allocator_trap="drain") as session:
        alloc.alloc_decode(seq, seq.clone(), batch.token_slots[0][-1:].clone())
        allocator._findings[alloc].calls.clear()  # as if hundreds of checked calls had come since
        with pytest.raises(kvtrap.KVTrapError) as info:
            allocator.drain_findings(session)
    v = info.value.violation
    assert v.kind == "swa_slot_out_of_range" and v.value == (w.SWA_PAGES + 1) * w.PAGE_SIZE
    assert v.details["full_index"] is None and "out_full_indices" not in load_dump(info.value.dump_path).tensors


@cpu_world
def test_the_record_holds_no_allocator_alive(tmp_path):
    import gc
    import weakref

    with kvtrap.armed(dump_dir=str(tmp_path), allocator_trap="drain"):
        alloc = w.make_allocator(w.make_pool())
        w.allocate_requests(alloc, [40])
        assert alloc in allocator._findings
        ref = weakref.ref(alloc)
        del alloc
        gc.collect()
        assert ref() is None


@cpu_world
def test_a_bad_free_after_the_last_drain_is_raised_when_the_scheduler_goes_idle(tmp_path):
    """The frees of a step's finished requests run after that step's drain: with no next step, SGLang's idle
    housekeeping (``Scheduler.on_idle``, wrapped by kvtrap) is where they are read, waiting for their checks."""
    from sglang.srt.managers.scheduler import Scheduler

    with kvtrap.armed(mode="raise", dump_dir=str(tmp_path), allocator_trap="drain"):
        alloc, _, call = td.swa_not_owned_world(tmp_path)
        _outcome(call)
        with pytest.raises(kvtrap.KVTrapError) as info:
            Scheduler.on_idle(object.__new__(Scheduler))  # kvtrap's read comes before SGLang's body needs any state
    assert info.value.violation.kind == "swa_free_not_owned"
    assert info.value.violation.details["trapped_at"].startswith("drain")


def test_the_idle_read_is_kvtraps_only_wrapper_on_the_scheduler(tmp_path):
    from sglang.srt.managers.scheduler import Scheduler

    original = Scheduler.on_idle
    with kvtrap.armed(mode="raise", dump_dir=str(tmp_path)):
        assert Scheduler.on_idle is not original
    assert Scheduler.on_idle is original  # disarmed: SGLang's own method, nothing left behind


@cpu_world
def test_check_kernels_that_cannot_launch_fall_back_to_call_mode_once(tmp_path, monkeypatch, caplog):
    """A Triton that cannot build the kernels (e.g. a broken toolchain on the serving machine): the bad free is
    still trapped, at the call as call mode does, and the fallback is said once, not a crash inside SGLang."""
    from kvtrap.capture import allocator_kernels

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(allocator_kernels, "release_check_", broken)
    monkeypatch.setattr(allocator_kernels, "slot_check_", broken)
    _, call_err = td.fire_world(tmp_path / "call", td.swa_not_owned_world)
    with caplog.at_level("WARNING", logger="kvtrap"):
        with kvtrap.armed(mode="raise", dump_dir=str(tmp_path / "drain"), allocator_trap="drain") as session:
            alloc, _, call = td.swa_not_owned_world(tmp_path)
            with pytest.raises(kvtrap.KVTrapError) as info:
                call()
            assert not allocator.at_drain(session, alloc.full_to_swa_index_mapping)
    assert info.value.violation.kind == call_err.violation.kind == "swa_free_not_owned"
    assert "trapped_at" not in (info.value.violation.details or {})  # at the call, not at a drain
    assert sum("drain-mode allocator checks unavailable" in r.getMessage() for r in caplog.records) == 1


@cpu_world
@pytest.mark.parametrize("mode", ["call", "drain"])
def test_an_allocation_that_raises_after_its_mapping_write_leaves_nothing_deferred(tmp_path, monkeypatch, mode):
    """The ownership notes of a mapping written inside ``alloc_extend`` wait for the call's check; if the call
    raises after the write, they are noted on the way out and the in-call state is gone (a leftover would swallow
    later notes and make later frees look like double frees)."""
    from kvtrap.capture import page_owners

    alloc = w.make_allocator(w.make_pool())
    with kvtrap.armed(dump_dir=str(tmp_path), allocator_trap=mode) as session:
        w.allocate_requests(alloc, [w.PAGE_SIZE])  # the record exists before the failing call
        owners = page_owners.record_for(alloc, session).owner
        held = int((owners != page_owners.FREE).sum())
        real = alloc.set_full_to_swa_mapping  # kvtrap's wrapper, bound

        def write_then_fail(full, swa, *args, **kwargs):
            real(full, swa, *args, **kwargs)
            raise RuntimeError("after the mapping write")

        monkeypatch.setattr(alloc, "set_full_to_swa_mapping", write_then_fail, raising=False)
        with pytest.raises(RuntimeError, match="after the mapping write"):
            w.allocate_requests(alloc, [w.PAGE_SIZE + 3])  # two SWA pages written, then the raise
        monkeypatch.undo()
        assert allocator._stack() == []
        assert int((owners != page_owners.FREE).sum()) == held + 2  # noted on the way out
        _random_steps(alloc, random.Random(5), 150)  # later allocations and frees: nothing misjudged
        allocator.drain_findings(session)
    assert not list(tmp_path.iterdir())


@cpu_world
def test_a_check_that_fails_before_its_launch_still_notes_the_allocations_pages(tmp_path, monkeypatch):
    from kvtrap.capture import page_owners

    alloc = w.make_allocator(w.make_pool())
    with kvtrap.armed(dump_dir=str(tmp_path), allocator_trap="drain") as session:
        w.allocate_requests(alloc, [w.PAGE_SIZE])
        owners = page_owners.record_for(alloc, session).owner
        held = int((owners != page_owners.FREE).sum())

        def broken(a):
            raise MemoryError("no room for the check")

        monkeypatch.setattr(allocator, "swa_slot_bound", broken)
        with pytest.raises(MemoryError):
            w.allocate_requests(alloc, [w.PAGE_SIZE + 3])
        monkeypatch.undo()
        assert allocator._stack() == [] and int((owners != page_owners.FREE).sum()) == held + 2
