"""flashinfer trap on real sglang==0.5.23 objects: a real FlashInferAttnBackend (and its real indices updaters)
built from a real ModelRunner over a real SWAKVPool + allocator.

The backend's ``forward_decode`` / ``forward_extend`` are SGLang's and run on CPU up to the wrapper's ``run``
(the K/V store into the real pool included). FlashInfer's wrappers cannot be constructed or planned without
a GPU, so each is a real wrapper object in the state ``plan`` leaves (its planned index buffers) with
``forward`` a recorder (``sglang_world._planned_wrapper``). "Reached the kernel" = a recorded ``forward``.
"""

from __future__ import annotations

import random

import pytest
import torch

import kvtrap
from kvtrap.capture import checks
from kvtrap.record.dumpfile import load_dump

sglang = pytest.importorskip("sglang")

from helpers import sglang_world as w  # noqa: E402
from helpers import trapdumps as td  # noqa: E402

pytestmark = pytest.mark.cpu_world(gpu="tests/capture/test_trap_ragged_gpu.py")

SWA_ROWS = w.SWA_PAGES * w.PAGE_SIZE + w.PAGE_SIZE
FULL_ROWS = w.FULL_PAGES * w.PAGE_SIZE + w.PAGE_SIZE


def wrappers(backend):
    md = backend.forward_metadata
    return md.decode_wrappers if hasattr(md, "decode_wrappers") else md.prefill_wrappers


def runs(backend) -> list[list[tuple]]:
    return [wr.forward.calls for wr in wrappers(backend)]


def same_runs(a, b) -> bool:
    # each run's (q, kv_cache) arguments, bit for bit
    return all(len(x) == len(y) and all(torch.equal(c[0], d[0]) and all(torch.equal(p, r) for p, r in zip(c[1], d[1], strict=True))
                                        for c, d in zip(x, y, strict=True)) for x, y in zip(a, b, strict=True))


def full_layer(layers):
    return next(layer for layer in layers if layer.layer_id in w.FULL_LAYERS)


def random_world(rng: random.Random, extend: bool):
    lens = [rng.randint(1, 4 * w.PAGE_SIZE - 1) for _ in range(rng.randint(1, 4))]  # fits the SWA pool
    prefix = tuple(rng.randint(0, n - 1) for n in lens) if extend else None
    return td.flashinfer_world(tuple(lens), prefix_lens=prefix)


@pytest.mark.parametrize("extend", [False, True], ids=["decode", "extend"])
def test_many_random_clean_steps_are_bit_identical_armed_and_unarmed(tmp_path, extend):
    rng = random.Random(f"flashinfer-{extend}")
    for step in range(40):
        state = rng.getstate()
        pool_a, _, layers_a, _, backend_a, fb_a = random_world(rng, extend)
        rng.setstate(state)
        pool_b, _, layers_b, _, backend_b, fb_b = random_world(rng, extend)
        outs_a = [td.attend(backend_a, layer, fb_a, seed=step) for layer in layers_a]
        with kvtrap.armed(dump_dir=str(tmp_path)):
            outs_b = [td.attend(backend_b, layer, fb_b, seed=step) for layer in layers_b]
        assert w.same_kv(w.kv_snapshot(pool_a), w.kv_snapshot(pool_b)), step
        assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b, strict=True))
        assert sum(len(c) for c in runs(backend_b)) == len(layers_b)  # every layer reached its run
        assert same_runs(runs(backend_a), runs(backend_b)), step
    assert not list(tmp_path.iterdir()), "a clean run wrote a dump"


@pytest.mark.parametrize("value", [SWA_ROWS, -1, 2**31 - 1], ids=["row-count", "minus-one", "huge"])
def test_out_of_range_window_id_trapped_before_run(tmp_path, value):
    path, err = td.make_flashinfer_out_of_range_dump(tmp_path, value)
    v = err.violation
    assert (v.kind, v.layer_id, v.layer_type, v.table, v.pool) == ("kv_indices_out_of_range", 0, "swa",
                                                                   "window_kv_indices", "swa")
    assert (v.row, v.column, v.value, v.bound, v.fatal) == (0, 5, value, SWA_ROWS, True)
    dump = load_dump(path)
    assert dump.tensors["window_kv_indices"][5] == value
    ctx = dump.manifest["context"]
    assert ctx["hook"] == "FlashInferAttnBackend.forward_decode" and ctx["backend"]["class"] == "FlashInferAttnBackend"
    assert ctx["tables"]["window_kv_indices"]["handed_to_layer"] and ctx["tables"]["kv_indices"]["bound"] == FULL_ROWS


def test_trapped_before_the_kv_store_and_the_run(tmp_path):
    pool, alloc, layers, batch, backend, fb = td.flashinfer_world()
    wrappers(backend)[1]._paged_kv_indices_buf[7] = FULL_ROWS + 3
    before = w.kv_snapshot(pool)
    with kvtrap.armed(dump_dir=str(tmp_path)):
        td.attend(backend, layers[0], fb)  # an SWA layer runs wrapper 0: fine
        with pytest.raises(kvtrap.KVTrapError) as info:
            td.attend(backend, full_layer(layers), fb)
    v = info.value.violation
    assert (v.kind, v.table, v.pool, v.value, v.bound) == ("kv_indices_out_of_range", "kv_indices", "full",
                                                           FULL_ROWS + 3, FULL_ROWS)
    assert [len(c) for c in runs(backend)] == [1, 0]
    after = w.kv_snapshot(pool)  # only the SWA layer stored K/V
    assert all(torch.equal(before[k][0], after[k][0]) for k in before if k != layers[0].layer_id)


def test_malformed_indptr(tmp_path):
    pool, alloc, layers, batch, backend, fb = td.flashinfer_world()
    wrappers(backend)[0]._paged_kv_indptr_buf[-1] = 10**4
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        td.attend(backend, layers[0], fb)
    v = info.value.violation
    assert (v.kind, v.table, v.details["indptr_problem"]) == ("kv_indptr_malformed", "window_kv_indptr", "overrun")
    assert runs(backend) == [[], []]


def test_extend_checks_the_prefill_wrappers(tmp_path):
    pool, alloc, layers, batch, backend, fb = td.flashinfer_world(prefix_lens=(30, 90, 10))
    wrappers(backend)[0]._paged_kv_indices_buf[0] = -2
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        td.attend(backend, layers[0], fb)
    assert info.value.violation.where == "FlashInferAttnBackend.forward_extend"
    assert runs(backend) == [[], []]


def test_stale_updater_pool_is_drift(tmp_path):
    # the updaters copy the backend's _swa_kv_pool at init: a fix that refreshes only the backend's leaves them
    pool, alloc, layers, batch, backend, fb = td.flashinfer_world()
    backend.indices_updater_decode._swa_kv_pool = w.make_pool()
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        td.attend(backend, full_layer(layers), fb)
    v = info.value.violation
    assert v.kind == "swa_state_drift" and set(v.details["drift"]) == {"indices_updater_decode._swa_kv_pool"}


def test_value_scan_runs_once_per_wrapper_per_forward(tmp_path, monkeypatch):
    pool, alloc, layers, batch, backend, fb = td.flashinfer_world()
    calls = []
    real = checks.scan_ragged
    monkeypatch.setattr(checks, "scan_ragged", lambda *a, **k: calls.append(1) or real(*a, **k))
    with kvtrap.armed(dump_dir=str(tmp_path)):
        for layer in layers:
            td.attend(backend, layer, fb)
    assert len(calls) == 2


# ------------------------------------------------------------------------------- SGLang #27737
def test_27737_injected_trapped_on_the_first_swa_layer_before_run(tmp_path):
    path, err = td.make_27737_dump(tmp_path)
    v = err.violation
    assert (v.kind, v.layer_type, v.table) == ("index_space_mismatch", "swa", "window_kv_indices")
    assert set(v.details["drift"]) == {"_swa_kv_pool", "indices_updater_decode._swa_kv_pool",
                                       "indices_updater_prefill._swa_kv_pool", "use_sliding_window_kv_pool"}
    dump = load_dump(path)
    assert dump.manifest["config"]["inject"] == ["sglang-27737"]
    assert dump.manifest["context"]["backend"]["swa_kv_pool"] is None
    assert dump.manifest["context"]["tables"]["window_kv_indices"]["pool"] == "full"  # planned untranslated


def test_27737_world_is_clean_without_the_injection(tmp_path):
    pool, alloc, layers, batch, backend, fb = td.flashinfer_world(dflash_draft=True)
    assert backend._swa_kv_pool is pool  # SGLang 0.5.23's resolver: the active pool
    with kvtrap.armed(dump_dir=str(tmp_path)):
        for layer in layers:
            td.attend(backend, layer, fb)
    assert not list(tmp_path.iterdir())
    # with the bug, unarmed: the window wrapper holds full-pool slots, and SGLang's own write path has no SWA
    # locations (its SWAKVPool asserts on the first SWA layer's store: where a server would stop)
    from kvtrap.capture import bugs

    bugs.sync(["sglang-27737"])
    try:
        _, _, layers2, batch2, buggy, fb2 = td.flashinfer_world(dflash_draft=True)
    finally:
        bugs.sync([])
    assert buggy._swa_kv_pool is None and buggy.forward_metadata.swa_out_cache_loc is None
    first = batch2.token_slots[0][-(td.TRITON_WINDOW + 1):]
    assert torch.equal(wrappers(buggy)[0]._paged_kv_indices_buf[: first.numel()].to(torch.int64), first)


# ----------------------------------------------------------------------------------- KV write path
@pytest.mark.parametrize("extend", [False, True], ids=["decode", "extend"])
@pytest.mark.parametrize("value", [FULL_ROWS, -1], ids=["pool-rows", "minus-one"])
def test_out_cache_loc_past_the_full_pool_trapped_before_the_store(tmp_path, value, extend):
    pool, alloc, layers, batch, backend, fb = td.flashinfer_world(prefix_lens=(30, 90, 10) if extend else None)
    fb.out_cache_loc[1] = value  # -1 would silently write the pool's last row
    before, locs = w.kv_snapshot(pool), fb.out_cache_loc.clone()
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        td.attend(backend, full_layer(layers), fb)
    td.check_full_write_trap(info.value, locs, value, FULL_ROWS,
                             f"FlashInferAttnBackend.forward_{'extend' if extend else 'decode'}")  # fmt: skip
    assert runs(backend) == [[], []]  # no wrapper ran...
    assert w.same_kv(before, w.kv_snapshot(pool))  # ...and nothing was stored
    assert torch.equal(fb.out_cache_loc, locs)


def test_swa_write_location_past_the_swa_pool_trapped_on_the_swa_layer(tmp_path):
    # an untranslated full-pool slot left in swa_out_cache_loc: inside the full pool, past the SWA pool
    pool, alloc, layers, batch, backend, fb = td.flashinfer_world()
    backend.forward_metadata.swa_out_cache_loc[2] = FULL_ROWS - 5
    before = w.kv_snapshot(pool)
    with kvtrap.armed(dump_dir=str(tmp_path)):
        td.attend(backend, full_layer(layers), fb)  # full layers write out_cache_loc: fine
        with pytest.raises(kvtrap.KVTrapError) as info:
            td.attend(backend, layers[0], fb)
    v = info.value.violation
    assert (v.kind, v.table, v.pool, v.layer_id, v.layer_type, v.row, v.value, v.bound) == (
        "kv_write_out_of_range", "swa_out_cache_loc", "swa", 0, "swa", 2, FULL_ROWS - 5, SWA_ROWS)
    assert v.details["out_cache_loc"] == int(fb.out_cache_loc[2])
    assert [len(c) for c in runs(backend)] == [0, 1]  # the SWA layer's wrapper (0) never ran...
    after = w.kv_snapshot(pool)  # ...nor its store: only the full layer's K/V changed
    assert w.same_kv(before, after, skip=(full_layer(layers).layer_id,))
    assert not w.same_kv(before, after)  # (the full layer's store really ran)
    assert int(load_dump(info.value.dump_path).tensors["swa_out_cache_loc"][2]) == FULL_ROWS - 5
