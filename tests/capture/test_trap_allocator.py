"""Allocator trap on a real SWAKVPool + SWATokenToKVPoolAllocator (sglang==0.5.23, CPU)."""

from __future__ import annotations

import random

import pytest
import torch

import kvtrap
from kvtrap.record.dumpfile import load_dump

pytest.importorskip("sglang")

from helpers import sglang_world as w  # noqa: E402
from helpers import trapdumps as td  # noqa: E402

pytestmark = pytest.mark.cpu_world(gpu="tests/capture/test_trap_allocator_drain.py::test_cuda_allocator_*")


def test_corrupt_free_list_trapped_on_extend_with_dump(tmp_path):
    path, err = td.make_swa_slot_dump(tmp_path, bad_page=500)
    v = err.violation
    assert (v.kind, v.where) == ("swa_slot_out_of_range", "SWATokenToKVPoolAllocator.alloc_extend")
    assert (v.value, v.lower, v.bound) == (500 * w.PAGE_SIZE, w.PAGE_SIZE, (w.SWA_PAGES + 1) * w.PAGE_SIZE)
    assert v.count == w.PAGE_SIZE  # the whole bad page
    dump = load_dump(path)
    assert dump.tensors["out_swa_indices"][0] == 500 * w.PAGE_SIZE
    assert len(dump.tensors["out_full_indices"]) == 40
    ctx = dump.manifest["context"]
    assert ctx["size_swa"] == w.SWA_PAGES * w.PAGE_SIZE and ctx["page_size"] == w.PAGE_SIZE
    assert ctx["pools"]["swa"]["pages"] == w.SWA_PAGES + 1
    assert ctx["free_pages"]["swa"] == w.SWA_PAGES - 3


def test_corrupt_free_list_trapped_on_decode(tmp_path):
    pool = w.make_pool()
    alloc = w.make_allocator(pool)
    batch = w.allocate_requests(alloc, [w.PAGE_SIZE])  # exactly one full page: the next token needs a page
    alloc.swa_attn_allocator.free_pages[0] = w.SWA_PAGES + 1  # the first page id past the pool
    seq = torch.tensor([w.PAGE_SIZE + 1])
    last = batch.token_slots[0][-1:].clone()
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        alloc.alloc_decode(seq, seq.clone(), last)
    v = info.value.violation
    assert v.where.endswith("alloc_decode") and v.value == (w.SWA_PAGES + 1) * w.PAGE_SIZE
    assert v.value == v.bound  # exactly one past the end is caught


def _release(alloc, slots: torch.Tensor, evicted: int, rng: random.Random) -> None:
    """Free a whole request the ways SGLang does: ``free``, or by segments (the SWA-evicted head by
    ``free_full_segment``, since its SWA side is gone)."""
    if rng.random() < 0.5 or evicted == 0 and rng.random() < 0.5:
        alloc.free(slots)
        return
    if evicted:
        alloc.free_full_segment(slots[:evicted], start_pos=0)
    if evicted < slots.numel():
        alloc.free_segment(slots[evicted:], start_pos=evicted)


def _random_steps(alloc, rng: random.Random, steps: int):
    """Extend / decode / window eviction / free (plain, by segments, inside free groups) at random;
    returns everything the allocator handed out."""
    live: list[torch.Tensor] = []
    lens: list[int] = []
    evicted: list[int] = []  # tokens of each request whose SWA pages are freed (page-aligned)
    outs = []
    for _ in range(steps):
        op = rng.random()
        if op < 0.3 or not live:
            n = rng.randint(1, 3 * w.PAGE_SIZE)
            batch = w.allocate_requests_or_none(alloc, [n])
            outs.append(None if batch is None else batch.token_slots[0])
            if batch is not None:
                live.append(batch.token_slots[0])
                lens.append(n)
                evicted.append(0)
        elif op < 0.7:
            i = rng.randrange(len(live))
            seq = torch.tensor([lens[i] + 1])
            out = alloc.alloc_decode(seq, seq.clone(), live[i][-1:].clone())
            outs.append(out)
            if out is not None:
                live[i] = torch.cat([live[i], out])
                lens[i] += 1
        elif op < 0.8:
            # sliding-window eviction: the oldest whole pages leave the window, SWA side only
            i = rng.randrange(len(live))
            upto = (lens[i] - 1) // w.PAGE_SIZE * w.PAGE_SIZE
            if upto > evicted[i]:
                if rng.random() < 0.5:
                    alloc.free_swa(live[i][evicted[i] : upto])
                else:
                    alloc.free_swa_segment(live[i][evicted[i] : upto], start_pos=evicted[i])
                evicted[i] = upto
            outs.append(("evict", upto))
        elif op < 0.9:
            i = rng.randrange(len(live))
            _release(alloc, live.pop(i), evicted.pop(i), rng)
            lens.pop(i)
            outs.append("free")
        else:
            alloc.free_group_begin()
            for _ in range(min(len(live), rng.randint(1, 3))):
                i = rng.randrange(len(live))
                _release(alloc, live.pop(i), evicted.pop(i), rng)
                lens.pop(i)
            alloc.free_group_end()
            outs.append("group")
    return outs


def test_thousands_of_random_steps_armed_are_bit_identical_to_unarmed(tmp_path):
    plain_alloc = w.make_allocator(w.make_pool())
    armed_alloc = w.make_allocator(w.make_pool())
    plain = _random_steps(plain_alloc, random.Random(7), 2000)
    with kvtrap.armed(dump_dir=str(tmp_path)):
        armed = _random_steps(armed_alloc, random.Random(7), 2000)
    assert len(plain) == len(armed)
    for a, b in zip(plain, armed, strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a == b
    assert any(o is None for o in plain), "the run never hit out-of-pages (None results are part of the test)"
    assert torch.equal(plain_alloc.full_to_swa_index_mapping, armed_alloc.full_to_swa_index_mapping)
    assert torch.equal(plain_alloc.swa_attn_allocator.free_pages, armed_alloc.swa_attn_allocator.free_pages)
    assert torch.equal(plain_alloc.full_attn_allocator.free_pages, armed_alloc.full_attn_allocator.free_pages)
    assert {"free", "group"} <= {o for o in plain if isinstance(o, str)}
    assert not list(tmp_path.iterdir())
