"""KVTRAP_INJECT=sglang-38269 on the path a 0.5.23 server takes (sglang==0.5.23, CPU): SGLang's own window
eviction (``evict_sliding_windows``) and request release (``release_kv_cache`` -> ``free_kv_row`` ->
``free_kv_row_segments``) through a real disabled ``UnifiedRadixCache``, real ``Req`` rows, the real SWA
allocator. Injected, the release sends the window-evicted (unmapped) slots down the SWA segment free and page 0
really enters the SWA free list; armed, kvtrap stops it first (call mode at the SGLang call, drain mode at the
step's drain), and the dump explains as #38269; clean, armed changes nothing."""

from __future__ import annotations

import pytest
import torch

import kvtrap
from kvtrap.capture import bugs
from kvtrap.record.dumpfile import load_dump
from kvtrap.report.explain import explain

pytest.importorskip("sglang")

from helpers import sglang_world as w  # noqa: E402
from helpers import trapdumps as td  # noqa: E402

# real SGLang allocators on CPU tensors; no CUDA twin yet (the GPU check is a server run: server_matrix.sh)
pytestmark = pytest.mark.cpu_world

NAME = "sglang-38269"
EVICTED_PAGES = 4  # request A's first 64 tokens left its 32-token window (page 16)


def _run(tmp_path, *, inject: bool, group: bool = True):
    """The world unarmed, with the bug in as ``KVTRAP_INJECT`` without arming puts it (kvtrap.plugin)."""
    bugs.sync([NAME] if inject else [])
    try:
        alloc, batch, call = td.bug_38269_world(tmp_path, group=group)
        call()
    finally:
        bugs.sync([])
    return alloc, batch


@pytest.mark.parametrize("group", [True, False], ids=["free-group", "no-group"])
def test_unarmed_injection_puts_page0_into_the_swa_free_list(tmp_path, group):
    alloc_clean, _ = _run(tmp_path, inject=False, group=group)
    alloc, _ = _run(tmp_path, inject=True, group=group)
    clean, bad = w.allocator_state(alloc_clean), w.allocator_state(alloc)
    # the only difference: one page 0 per window-evicted page, at the head of the SWA free list
    assert bad[1].tolist() == [0] * EVICTED_PAGES + clean[1].tolist()
    assert 0 not in clean[1].tolist()
    # the full side frees the same pages (outside a group, in one call instead of the clean path's two)
    assert torch.equal(bad[0], clean[0]) and torch.equal(bad[2].sort().values, clean[2].sort().values)
    # and handed out: the next request's SWA slots are the padding page's, twice over
    nxt = w.allocate_requests(alloc, [2 * w.PAGE_SIZE]).token_slots[0]
    assert (alloc.full_to_swa_index_mapping[nxt] // w.PAGE_SIZE).tolist() == [0] * (2 * w.PAGE_SIZE)


@pytest.mark.parametrize(
    "group, where",
    [(True, "SWATokenToKVPoolAllocator.free_group_end"), (False, "SWATokenToKVPoolAllocator.free_swa_segment")],
    ids=["free-group", "no-group"],
)
def test_call_mode_traps_the_release_before_page0_enters(tmp_path, group, where):
    with kvtrap.armed(mode="raise", dump_dir=str(tmp_path), inject=(NAME,), allocator_trap="call"):
        alloc, batch, call = td.bug_38269_world(tmp_path, group=group)
        before = w.allocator_state(alloc)
        with pytest.raises(kvtrap.KVTrapError) as info:
            call()
    v = info.value.violation
    assert (v.kind, v.where, v.value, v.count) == ("swa_free_reserved_page", where, 0, EVICTED_PAGES)
    assert v.details["owner_full_page"] == -1
    after = w.allocator_state(alloc)
    assert torch.equal(before[1], after[1]) and torch.equal(before[2], after[2])  # nothing released yet
    assert 0 not in after[1].tolist()
    # A's mapping was read and cleared by SGLang before the release; B's is untouched
    a, b = batch.token_slots
    assert int(after[0][a].abs().sum()) == 0 and torch.equal(after[0][b], before[0][b])
    dump = load_dump(info.value.dump_path)
    assert dump.manifest["config"]["inject"] == [NAME]
    assert dump.tensors["released_swa_pages"].tolist()[:EVICTED_PAGES] == [0] * EVICTED_PAGES
    assert sorted(dump.manifest["violation"]["details"]["freed_full_pages"]) == sorted(
        set((a // w.PAGE_SIZE).tolist())
    )
    top = explain(dump)[0]
    assert top.rule == NAME and top.confidence == "high"
    assert any(f"injects {NAME}" in e for e in top.evidence)


def test_drain_mode_lets_the_release_through_and_raises_at_the_drain(tmp_path):
    from sglang.srt.managers.scheduler_components.batch_result_processor import SchedulerBatchResultProcessor
    from sglang.srt.managers.utils import GenerationBatchResult

    _, ref = td.make_38269_dump(tmp_path / "call")
    plain, _ = _run(tmp_path, inject=True)
    with kvtrap.armed(mode="raise", dump_dir=str(tmp_path / "drain"), inject=(NAME,), allocator_trap="drain"):
        alloc, _, call = td.bug_38269_world(tmp_path)
        call()  # no trap at the call: SGLang releases page 0 exactly as unarmed
        assert all(torch.equal(x, y) for x, y in zip(w.allocator_state(plain), w.allocator_state(alloc), strict=True))
        with pytest.raises(kvtrap.KVTrapError) as info:
            object.__new__(SchedulerBatchResultProcessor).process_batch_result_decode(None, GenerationBatchResult())
    v, r = info.value.violation, ref.violation
    assert (v.kind, v.where, v.value) == (r.kind, r.where, r.value) == (
        "swa_free_reserved_page", "SWATokenToKVPoolAllocator.free_group_end", 0)  # fmt: skip
    dump = load_dump(info.value.dump_path)
    assert dump.manifest["config"]["inject"] == [NAME]
    assert dump.manifest["config"]["allocator_trap"] == "drain"
    assert explain(dump)[0].rule == NAME


@pytest.mark.parametrize("trap", ["call", "drain"])
def test_clean_release_armed_is_quiet_and_identical(tmp_path, trap):
    from sglang.srt.managers.scheduler_components.batch_result_processor import SchedulerBatchResultProcessor
    from sglang.srt.managers.utils import GenerationBatchResult

    plain, _ = _run(tmp_path / "plain", inject=False)
    with kvtrap.armed(mode="raise", dump_dir=str(tmp_path / "armed"), allocator_trap=trap):
        alloc, _, call = td.bug_38269_world(tmp_path)
        call()
        with pytest.raises(AttributeError):  # nothing found: the drain passes on to SGLang's body (no batch here)
            object.__new__(SchedulerBatchResultProcessor).process_batch_result_decode(None, GenerationBatchResult())
    assert all(torch.equal(x, y) for x, y in zip(w.allocator_state(plain), w.allocator_state(alloc), strict=True))
    assert 0 not in w.allocator_state(alloc)[1].tolist()
    assert not (tmp_path / "armed").exists() or not list((tmp_path / "armed").iterdir())
