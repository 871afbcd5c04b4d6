"""The SWA free-path bug zoo (KVTRAP_INJECT=sglang-38269 / sglang-27779 / sglang-25805) on real sglang==0.5.23
allocators (CPU): each injection makes a real fault in the real allocator, the free trap fires at the free,
before the bad SWA page enters the free list, and the same steps without the injection are clean."""

from __future__ import annotations

import pytest
import torch

import kvtrap
from kvtrap.capture import bugs
from kvtrap.record.dumpfile import load_dump

pytest.importorskip("sglang")

from helpers import sglang_world as w  # noqa: E402
from helpers import trapdumps as td  # noqa: E402

pytestmark = pytest.mark.cpu_world(gpu="tests/capture/test_trap_allocator_drain.py::test_cuda_allocator_*")

ZOO = {
    # bug -> (world, the violation kind its trap reports, the SGLang call it is reported in)
    # 38269: a request's release in the scheduler's free group; the SWA pages go in at free_group_end
    "sglang-38269": (td.bug_38269_world, "swa_free_reserved_page", "SWATokenToKVPoolAllocator.free_group_end"),
    "sglang-27779": (td.bug_27779_world, "swa_double_free", "SWATokenToKVPoolAllocator.free_swa"),
    "sglang-25805": (td.bug_25805_world, "swa_free_not_owned", "SWATokenToKVPoolAllocator.free_swa"),
}


def _lists(alloc):
    return w.allocator_state(alloc)[1:]  # the two free lists


def _bad_page_in_use(name, alloc, batch, page):
    """Where the bad page is when the trap fired: page 0 reserved, or (27779) free, or (25805) R2's live page."""
    if name == "sglang-38269":
        assert page == 0
    elif name == "sglang-27779":
        assert page in alloc.swa_attn_allocator.get_all_free_pages().tolist()  # already free once
    else:
        r2 = batch.token_slots[1]
        assert page in (alloc.full_to_swa_index_mapping[r2] // w.PAGE_SIZE).tolist()  # R2 still uses it


@pytest.mark.parametrize("name", list(ZOO))
def test_injected_bug_is_trapped_at_the_free(tmp_path, name):
    world, kind, where = ZOO[name]
    with kvtrap.armed(mode="raise", dump_dir=str(tmp_path), inject=(name,)):
        assert bugs.enabled() == (name,)
        alloc, batch, call = world(tmp_path)
        before = _lists(alloc)
        with pytest.raises(kvtrap.KVTrapError) as info:
            call()
    assert bugs.enabled() == ()
    v = info.value.violation
    assert v.kind == kind and v.where == where
    page = v.value
    # caught before the release: both free lists exactly as before the call; the bad page not in the list
    after = _lists(alloc)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    _bad_page_in_use(name, alloc, batch, page)
    if name != "sglang-27779":
        assert page not in after[0].tolist()
    dump = load_dump(info.value.dump_path)
    assert dump.manifest["config"]["inject"] == [name]
    assert page in dump.tensors["released_swa_pages"].tolist()
    owner = int(dump.tensors["swa_page_owner"][page])
    assert owner == v.details["owner_full_page"]
    if name == "sglang-25805":
        assert owner == int(batch.token_slots[1][0]) // w.PAGE_SIZE  # R2's first full page
        assert owner not in dump.tensors["freed_full_pages"].tolist()
    else:
        assert owner == -1


@pytest.mark.parametrize("name", list(ZOO))
def test_same_steps_without_the_injection_are_clean_and_bit_identical(tmp_path, name):
    world = ZOO[name][0]
    alloc_plain, _, call = world(tmp_path)
    call()
    with kvtrap.armed(mode="raise", dump_dir=str(tmp_path)):
        alloc_armed, _, call = world(tmp_path)
        call()
    assert torch.equal(alloc_plain.full_to_swa_index_mapping, alloc_armed.full_to_swa_index_mapping)
    for a, b in zip(_lists(alloc_plain), _lists(alloc_armed), strict=True):
        assert torch.equal(a, b)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", list(ZOO))
def test_injection_makes_a_real_fault_when_nothing_checks(tmp_path, name):
    """Free checks off: the bad page goes into the real free list and is handed out again."""
    world = ZOO[name][0]
    with kvtrap.armed(mode="raise", dump_dir=str(tmp_path), inject=(name,), free_checks="off"):
        alloc, batch, call = world(tmp_path)
        call()
    free = alloc.swa_attn_allocator.get_all_free_pages().tolist()
    if name == "sglang-38269":
        assert free[0] == 0  # the padding page, next in line to be handed out
        nxt = w.allocate_requests(alloc, [w.PAGE_SIZE]).token_slots[0]
        assert int(alloc.full_to_swa_index_mapping[nxt[0]]) // w.PAGE_SIZE == 0
    elif name == "sglang-27779":
        assert len(free) == len(set(free)) + 1  # one SWA page twice in the free list
        twice = next(p for p in free if free.count(p) == 2)
        half = len(free) // 2  # hand out every page of the free list, in two requests
        x, y = (w.allocate_requests(alloc, [n * w.PAGE_SIZE]) for n in (half, len(free) - half))
        pages = [int(s) // w.PAGE_SIZE for b in (x, y) for s in alloc.full_to_swa_index_mapping[b.token_slots[0]]]
        assert pages.count(twice) == 2 * w.PAGE_SIZE  # handed to two requests
    else:
        r2 = batch.token_slots[1]
        r2_pages = set((alloc.full_to_swa_index_mapping[r2] // w.PAGE_SIZE).tolist())
        assert r2_pages & set(free)  # R2's live SWA page is back in the free list
    assert not list(tmp_path.iterdir())
