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


def _random_steps(alloc, rng: random.Random, steps: int):
    """Extend / decode / free at random; returns everything the allocator handed out."""
    live: list[torch.Tensor] = []
    lens: list[int] = []
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
        elif op < 0.8:
            i = rng.randrange(len(live))
            seq = torch.tensor([lens[i] + 1])
            out = alloc.alloc_decode(seq, seq.clone(), live[i][-1:].clone())
            outs.append(out)
            if out is not None:
                live[i] = torch.cat([live[i], out])
                lens[i] += 1
        else:
            i = rng.randrange(len(live))
            alloc.free(live.pop(i))
            lens.pop(i)
            outs.append("free")
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
    assert not list(tmp_path.iterdir())
