"""The ragged device guard on a GPU: compiled, captured in a CUDA graph with SGLang's Triton decode attention
(which reads ``kv_indptr`` / ``kv_indices``) as the victim, and wired into SGLang's real ``TritonAttnBackend``.

The victim is ``tests/helpers/victim.py``'s ``PagedDecode`` (``python tests/helpers/victim.py --crash`` is the
unguarded fault; ``test_guard_gpu.py`` proves it kills a process): its ``kv_indices`` are token slots, the set
SGLang's triton backend hands ``decode_attention_fwd``. Written on a CPU-only machine: not yet run on a GPU.
CPU counterparts: ``test_guard_ragged.py`` (kernel, interpreted) and ``test_triton_guard_wiring.py`` (wiring).
"""

from __future__ import annotations

import pytest
import torch

import kvtrap
from kvtrap.capture.guard import GuardRecord, check_and_raise
from kvtrap.capture.guard.ragged_kernel import guard_ragged_
from kvtrap.config import Config
from kvtrap.record.guard_entry import FLAG_OUT_OF_RANGE

pytestmark = pytest.mark.gpu


@pytest.fixture
def victim():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("sglang.kernels.ops.attention.decode_attention")
    from helpers.victim import PagedDecode

    return PagedDecode


def _record():
    rec = GuardRecord(device="cuda")
    return rec, rec.register_table("kv_indices", "full", ragged=True)


def _step(dec, rec, tid):
    dec.build_()
    dec.expand_()
    guard_ragged_(dec.kv_indptr, dec.kv_indices, dec.num_pages * dec.page_size, rec, tid)
    rec.publish_()
    dec.attend()


def test_eager_launch_never_syncs_and_clean_ids_unchanged(victim):
    dec = victim(4, 1000, page_size=16)
    dec.build_()
    dec.expand_()
    before = dec.kv_indices.clone()
    rec, tid = _record()
    torch.cuda.set_sync_debug_mode("error")
    try:
        guard_ragged_(dec.kv_indptr, dec.kv_indices, dec.num_pages * dec.page_size, rec, tid)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(dec.kv_indices, before) and rec.pending() == 0


def test_guarded_decode_completes_and_traps_with_other_rows_intact(victim, tmp_path):
    clean = victim(4, 1024, page_size=16)
    rec, tid = _record()
    _step(clean, rec, tid)
    dec = victim(4, 1024, page_size=16)
    dec.corrupt_(2, 5, dec.bad_page())
    _step(dec, rec, tid)
    torch.cuda.synchronize()  # the context survived the launch
    with pytest.raises(kvtrap.KVTrapError) as info:
        check_and_raise(rec, Config(dump_dir=str(tmp_path)))
    v = info.value.violation
    assert (v.kind, v.table, v.row, v.column) == ("kv_indices_out_of_range", "kv_indices", 2, 5 * 16)
    assert v.value == dec.bad_page() * 16 and v.count == 16  # the page's 16 token slots
    keep = [0, 1, 3]
    assert torch.equal(dec.o[keep], clean.o[keep])
    torch.ones(1, device="cuda").sum().item()  # a following CUDA op works


def test_captured_guard_traps_on_replay_and_is_clean_after_repair(victim, tmp_path):
    dec = victim(4, 1024, page_size=16)
    rec, tid = _record()
    _step(dec, rec, tid)  # warm-up (compiles) outside capture
    torch.cuda.synchronize()
    assert rec.drain().total == 0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _step(dec, rec, tid)
    graph.replay()
    torch.cuda.synchronize()
    clean_o = dec.o.clone()
    assert rec.pending(synced=True) == 0
    good = int(dec.req_to_token[3, 7 * 16])
    dec.corrupt_(2, 7, dec.bad_page())
    graph.replay()
    torch.cuda.synchronize()
    assert rec.pending(synced=True) == 16  # the pinned counter, copied inside the graph
    d = rec.drain(synced=True)
    assert {(e.row, e.column // 16, e.flags) for e in d.entries} == {(2, 7, FLAG_OUT_OF_RANGE)}
    dec.req_to_token[3, 7 * 16] = good
    graph.replay()
    torch.cuda.synchronize()
    assert rec.pending(synced=True) == 0 and torch.equal(dec.o, clean_o)


def test_wired_into_the_real_triton_backend_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("sglang")
    from helpers import sglang_world as w
    from helpers import triton_graph as tg

    w.triton_classes()  # skips where sglang.srt cannot import (no sgl_kernel)
    world = tg.graph_world(device="cuda")
    bad = w.FULL_PAGES * w.PAGE_SIZE + w.PAGE_SIZE + 7
    world.backend.req_to_token[2, 5] = bad
    from kvtrap.capture.hooks import device_guard
    from kvtrap.capture.session import current

    class Result:
        copy_done = torch.cuda.Event()

    with kvtrap.armed(dump_dir=str(tmp_path)):
        world.backend.init_forward_metadata_out_graph(world.fb)  # SGLang's per-replay build, then the guard
        Result.copy_done.record()
        with pytest.raises(kvtrap.KVTrapError) as info:
            device_guard.drain_all(current(), Result())  # the synced path: pinned counter after copy_done
    v = info.value.violation
    assert (v.table, v.row, v.column, v.value) == ("kv_indices", 1, 5, bad)
    ids = tg.ragged(world.backend.kv_indptr[:4].cpu(), world.backend.cuda_graph_kv_indices.cpu())
    assert ids[1][5] == 0
