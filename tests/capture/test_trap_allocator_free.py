"""Free-path traps on a real SWAKVPool + SWATokenToKVPoolAllocator (sglang==0.5.23, CPU): the bad SWA page is
caught at the free, before it enters the SWA free list, and nothing else changed."""

from __future__ import annotations

import pytest
import torch

import kvtrap
from kvtrap.record.dumpfile import load_dump

pytest.importorskip("sglang")

from helpers import sglang_world as w  # noqa: E402
from helpers import trapdumps as td  # noqa: E402

pytestmark = pytest.mark.cpu_world(gpu="tests/capture/test_trap_allocator_drain.py::test_cuda_allocator_*")


def _unchanged_but_cleared(before, after, freed):
    """Free lists untouched; the mapping differs only where SGLang cleared it before the release."""
    assert torch.equal(before[1], after[1]) and torch.equal(before[2], after[2])
    expect = before[0].clone()
    expect[freed] = 0
    assert torch.equal(after[0], expect)


def _trap(tmp_path, world):
    """Arm, build the world, snapshot the allocator, make the bad call: (error, alloc, state before)."""
    with kvtrap.armed(mode="raise", dump_dir=str(tmp_path)):
        alloc, batch, call = world(tmp_path)
        before = w.allocator_state(alloc)
        with pytest.raises(kvtrap.KVTrapError) as info:
            call()
    return info.value, alloc, batch, before


def test_reserved_page0_freed_through_the_segment_path(tmp_path):
    err, alloc, _, before = _trap(tmp_path, td.swa_page0_free_world)
    v = err.violation
    assert (v.kind, v.where) == ("swa_free_reserved_page", "SWATokenToKVPoolAllocator.free_swa_segment")
    assert v.value == 0 and v.count == 2  # both evicted pages read as page 0
    # caught before the release: page 0 never entered the free list, nothing moved
    after = w.allocator_state(alloc)
    assert 0 not in after[1].tolist()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    dump = load_dump(err.dump_path)
    assert dump.tensors["released_swa_pages"].tolist() == [0, 0]
    assert dump.manifest["violation"]["details"]["owner_full_page"] == -1


def test_double_free_of_swa_pages(tmp_path):
    err, alloc, batch, before = _trap(tmp_path, td.swa_double_free_world)
    v = err.violation
    assert (v.kind, v.where) == ("swa_double_free", "SWATokenToKVPoolAllocator.free_swa")
    stale_pages = sorted({int(s) // w.PAGE_SIZE for s in before[0][batch.token_slots[0]].tolist()})
    assert v.value == stale_pages[0] and v.count == len(stale_pages) == 3
    _unchanged_but_cleared(before, w.allocator_state(alloc), batch.token_slots[0])
    dump = load_dump(err.dump_path)
    owner = dump.tensors["swa_page_owner"]
    assert all(int(owner[p]) == -1 for p in stale_pages)
    assert sorted(dump.tensors["released_swa_pages"].tolist()) == stale_pages


def test_swa_page_of_another_full_page(tmp_path):
    err, alloc, batch, before = _trap(tmp_path, td.swa_not_owned_world)
    v = err.violation
    assert (v.kind, v.where) == ("swa_free_not_owned", "SWATokenToKVPoolAllocator.free_swa")
    b_first = int(batch.token_slots[1][0])
    assert v.value == int(before[0][b_first]) // w.PAGE_SIZE
    assert v.details["owner_full_page"] == b_first // w.PAGE_SIZE
    assert b_first // w.PAGE_SIZE not in v.details["freed_full_pages"]
    a = batch.token_slots[0]
    _unchanged_but_cleared(before, w.allocator_state(alloc), torch.arange(int(a[0]), int(a[0]) + 3 * w.PAGE_SIZE))
    dump = load_dump(err.dump_path)
    assert dump.manifest["context"]["hook"] == "SWATokenToKVPoolAllocator.free_swa"
    assert set(dump.tensors) >= {"released_swa_pages", "swa_page_owner", "freed_full_pages", "free_index"}


def test_free_checks_off_lets_the_bad_free_through(tmp_path):
    with kvtrap.armed(mode="raise", dump_dir=str(tmp_path), free_checks="off"):
        alloc, _, call = td.swa_page0_free_world(tmp_path)
        call()
    assert 0 in alloc.swa_attn_allocator.get_all_free_pages().tolist()  # the real fault, unseen
    assert not list(tmp_path.iterdir())


def test_free_in_a_group_is_checked_at_the_group_end(tmp_path):
    with kvtrap.armed(mode="raise", dump_dir=str(tmp_path)):
        alloc, batch, _ = td.swa_not_owned_world(tmp_path)
        alloc.free_group_begin()
        alloc.free(batch.token_slots[0])  # queued: the pages are resolved now, released at the end
        with pytest.raises(kvtrap.KVTrapError) as info:
            alloc.free_group_end()
    assert info.value.violation.kind == "swa_free_not_owned"
    assert info.value.violation.where == "SWATokenToKVPoolAllocator.free_group_end"


def test_armed_late_seeds_the_record_from_the_live_mapping(tmp_path):
    alloc = w.make_allocator(w.make_pool())
    batch = w.allocate_requests(alloc, [40, 20])  # unarmed: kvtrap saw nothing
    with kvtrap.armed(mode="raise", dump_dir=str(tmp_path)):
        alloc.free(batch.token_slots[0])  # a legal free of pages handed out before arming
        with pytest.raises(kvtrap.KVTrapError) as info:
            alloc.free_segment(batch.token_slots[0][: w.PAGE_SIZE], start_pos=0)
    assert info.value.violation.kind == "swa_free_reserved_page"
