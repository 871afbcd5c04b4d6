"""triton trap on real sglang==0.5.23 objects: a real TritonAttnBackend over a real SWAKVPool + allocator.

The backend's ``forward_decode`` / ``forward_extend`` / ``_forward_extend_unified`` are SGLang's and run on CPU
up to the kernel launch (the K/V store into the real pool included). The attention launches are recorders
standing in SGLang's real kernel functions (see ``sglang_world.KernelRecorder``); the unified path's index
gather ``build_unified_kv_indices`` runs for real. "Reached the kernel" = a recorded launch.
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

pytestmark = pytest.mark.cpu_world(
    gpu="tests/capture/test_trap_ragged_gpu.py, tests/capture/test_triton_guard_gpu.py"
)

SWA_ROWS = w.SWA_PAGES * w.PAGE_SIZE + w.PAGE_SIZE
FULL_ROWS = w.FULL_PAGES * w.PAGE_SIZE + w.PAGE_SIZE
# launch -> position of its output buffer (SGLang allocates it with torch.empty: not compared)
LAUNCHES = {"decode_attention_fwd": 3, "extend_attention_fwd": 3, "extend_attention_fwd_unified": 1,
            "build_unified_kv_indices": None}


def launches(backend):
    return {n: getattr(backend, n).calls for n in LAUNCHES}


def same_launches(a, b) -> bool:
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        return type(x) is type(y) and (x == y if not isinstance(x, float) else x == y or (x != x and y != y))

    def same_call(n, c, d):
        keep = [i for i in range(len(c)) if i != LAUNCHES[n]]
        return len(c) == len(d) and all(eq(c[i], d[i]) for i in keep)

    return all(len(a[n]) == len(b[n]) and all(same_call(n, c, d) for c, d in zip(a[n], b[n], strict=True))
               for n in LAUNCHES)


def full_layer(layers):
    return next(layer for layer in layers if layer.layer_id in w.FULL_LAYERS)


# ------------------------------------------------------------------------------------ clean runs
def random_world(rng: random.Random, mode: str):
    bs = rng.randint(1, 4)
    lens = [rng.randint(1, 4 * w.PAGE_SIZE - 1) for _ in range(bs)]  # <= 4 pages each: fits the SWA pool
    if mode == "decode":
        return td.triton_world(tuple(lens))
    prefix = [rng.randint(0, n - 1) for n in lens]
    return td.triton_world(tuple(lens), prefix_lens=tuple(prefix), deterministic=mode == "unified")


@pytest.mark.parametrize("mode", ["decode", "extend", "unified"])
def test_many_random_clean_steps_are_bit_identical_armed_and_unarmed(tmp_path, mode):
    rng = random.Random(f"triton-{mode}")
    steps = 40
    for step in range(steps):
        state = rng.getstate()
        pool_a, _, layers_a, _, backend_a, fb_a = random_world(rng, mode)
        rng.setstate(state)
        pool_b, _, layers_b, _, backend_b, fb_b = random_world(rng, mode)
        for layer in layers_a:
            td.attend(backend_a, layer, fb_a, seed=step)
        with kvtrap.armed(dump_dir=str(tmp_path)):
            for layer in layers_b:
                td.attend(backend_b, layer, fb_b, seed=step)
        assert w.same_kv(w.kv_snapshot(pool_a), w.kv_snapshot(pool_b)), step
        assert w.kernel_calls(backend_b) >= len(layers_b)  # every layer reached its launch
        assert same_launches(launches(backend_a), launches(backend_b)), step
    assert not list(tmp_path.iterdir()), "a clean run wrote a dump"


def test_garbage_past_the_last_offset_is_ignored(tmp_path):
    pool, alloc, layers, batch, backend, fb = td.triton_world()
    md = backend.forward_metadata
    # a CUDA-graph-sized buffer: the ids live in the first kv_indptr[-1] entries, junk after
    md.kv_indices = torch.cat([md.kv_indices, torch.full((64,), 10**9, dtype=torch.int64)])
    md.window_kv_indices = torch.cat([md.window_kv_indices, torch.full((64,), -5, dtype=torch.int64)])
    with kvtrap.armed(dump_dir=str(tmp_path)):
        for layer in layers:
            td.attend(backend, layer, fb)
    assert len(backend.decode_attention_fwd.calls) == len(layers)


# ------------------------------------------------------------------------------ injected faults
@pytest.mark.parametrize("value", [SWA_ROWS, -1, 2**40], ids=["row-count", "minus-one", "huge"])
def test_out_of_range_window_id_trapped_before_the_kernel(tmp_path, value):
    pool, alloc, layers, batch, backend, fb = td.triton_world()
    md = backend.forward_metadata
    md.window_kv_indices[50] = value  # request 1 (window 48 from index 40): its 11th id
    before, tables = w.kv_snapshot(pool), (md.kv_indices.clone(), md.window_kv_indices.clone())
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        td.attend(backend, layers[0], fb)
    v = info.value.violation
    assert (v.kind, v.layer_id, v.layer_type, v.table, v.pool) == ("kv_indices_out_of_range", 0, "swa",
                                                                   "window_kv_indices", "swa")
    assert (v.row, v.column, v.value, v.lower, v.bound, v.count, v.fatal) == (1, 10, value, 0, SWA_ROWS, 1, True)
    assert w.kernel_calls(backend) == 0  # trapped before the launch...
    assert w.same_kv(before, w.kv_snapshot(pool))  # ...and before the K/V store: nothing else changed
    assert torch.equal(tables[0], md.kv_indices) and torch.equal(tables[1], md.window_kv_indices)
    dump = load_dump(info.value.dump_path)
    assert dump.tensors["window_kv_indices"][50] == value
    assert (dump.tensors["window_kv_indptr"] == md.window_kv_indptr.numpy()).all()
    assert (dump.tensors["kv_indices"] == md.kv_indices.numpy()).all()
    assert (dump.tensors["seq_lens"] == [40, 100, 17]).all()
    ctx = dump.manifest["context"]
    assert ctx["layer"] == {"id": 0, "type": "swa", "window": td.TRITON_WINDOW, "index_in_pool": 0}
    assert ctx["tables"]["window_kv_indices"] == {"pool": "swa", "bound": SWA_ROWS, "handed_to_layer": True,
                                                  "shape": [int(md.window_kv_indices.numel())]}
    assert ctx["tables"]["kv_indices"]["bound"] == FULL_ROWS and not ctx["tables"]["kv_indices"]["handed_to_layer"]
    assert ctx["hook"] == "TritonAttnBackend.forward_decode" and ctx["batch_size"] == 3
    assert ctx["backend"]["class"] == "TritonAttnBackend" and ctx["backend"]["use_sliding_window_kv_pool"] is True


def test_full_layer_checked_against_the_full_pool(tmp_path):
    pool, alloc, layers, batch, backend, fb = td.triton_world()
    backend.forward_metadata.kv_indices[3] = FULL_ROWS
    with kvtrap.armed(dump_dir=str(tmp_path)):
        td.attend(backend, layers[0], fb)  # the SWA layer reads the window rail: fine
        with pytest.raises(kvtrap.KVTrapError) as info:
            td.attend(backend, full_layer(layers), fb)
    v = info.value.violation
    assert (v.kind, v.table, v.pool, v.row, v.column, v.value, v.bound) == (
        "kv_indices_out_of_range", "kv_indices", "full", 0, 3, FULL_ROWS, FULL_ROWS)
    assert len(backend.decode_attention_fwd.calls) == 1  # only the SWA layer's launch


@pytest.mark.parametrize("fault, problem, at", [
    (lambda p, n: p.__setitem__(0, 2), "start", 0),
    (lambda p, n: p.__setitem__(2, 3), "decreasing", 2),
    (lambda p, n: p.__setitem__(3, n + 1), "overrun", 3),
])
def test_malformed_kv_indptr_trapped_before_the_kernel(tmp_path, fault, problem, at):
    pool, alloc, layers, batch, backend, fb = td.triton_world()
    md = backend.forward_metadata
    fault(md.kv_indptr, int(md.kv_indices.numel()))
    before = w.kv_snapshot(pool)
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        td.attend(backend, full_layer(layers), fb)
    v = info.value.violation
    assert (v.kind, v.table, v.row, v.fatal) == ("kv_indptr_malformed", "kv_indptr", at, True)
    assert v.details["indptr_problem"] == problem and v.details["indptr_value"] == int(md.kv_indptr[at])
    assert w.kernel_calls(backend) == 0 and w.same_kv(before, w.kv_snapshot(pool))
    assert (load_dump(info.value.dump_path).tensors["kv_indptr"] == md.kv_indptr.numpy()).all()


def test_swa_layer_handed_full_ids_is_an_index_space_mismatch(tmp_path):
    # a model config that gives an SWA-pool layer no sliding window: triton hands it kv_indices (full ids)
    pool, alloc, layers, batch, backend, fb = td.triton_world()
    layer = w.sglang()["RadixAttention"](num_heads=2, head_dim=8, scaling=8**-0.5, num_kv_heads=1, layer_id=0,
                                         sliding_window_size=-1)
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        td.attend(backend, layer, fb)
    v = info.value.violation
    assert (v.kind, v.layer_type, v.table) == ("index_space_mismatch", "swa", "kv_indices")
    assert v.details["expected_table"] == "window_kv_indices" and w.kernel_calls(backend) == 0


def test_stale_swa_flag_is_not_a_read_fault(tmp_path):
    # triton's cached use_sliding_window_kv_pool only decides whether SWA write locations are built (SGLang's
    # SWAKVPool asserts on a missing one); the window rail is translated by the live pool's type. A frozen-KV
    # draft built on a plain pool and reading the target's SWA pool has it False: not trapped.
    pool, alloc, layers, batch, backend, fb = td.triton_world()
    backend.use_sliding_window_kv_pool = False
    with kvtrap.armed(dump_dir=str(tmp_path)):
        for layer in layers:
            td.attend(backend, layer, fb)
    assert len(backend.decode_attention_fwd.calls) == len(layers) and not list(tmp_path.iterdir())
    # still recorded as context when something else is wrong (a new forward, a bad id)
    w.set_triton_metadata(backend, alloc, batch, fb, window=td.TRITON_WINDOW)
    backend.forward_metadata.window_kv_indices[0] = SWA_ROWS
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        td.attend(backend, layers[0], fb)
    assert info.value.violation.kind == "kv_indices_out_of_range" and "drift" not in info.value.violation.details
    assert load_dump(info.value.dump_path).manifest["context"]["backend"]["use_sliding_window_kv_pool"] is False


def test_extend_window_rail_checked(tmp_path):
    pool, alloc, layers, batch, backend, fb = td.triton_world(prefix_lens=(30, 90, 10))
    backend.forward_metadata.window_kv_indices[0] = SWA_ROWS + 7
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        td.attend(backend, layers[0], fb)
    v = info.value.violation
    assert (v.kind, v.where, v.table, v.row, v.column) == (
        "kv_indices_out_of_range", "TritonAttnBackend.forward_extend", "window_kv_indices", 0, 0)
    assert w.kernel_calls(backend) == 0


def test_unified_extend_checks_what_build_unified_kv_indices_is_handed(tmp_path):
    pool, alloc, layers, batch, backend, fb = td.triton_world(prefix_lens=(30, 90, 10), deterministic=True)
    backend.forward_metadata.window_kv_indices[4] = -3
    before = w.kv_snapshot(pool)
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        td.attend(backend, layers[0], fb)
    v = info.value.violation
    assert (v.kind, v.where, v.table, v.value) == (
        "kv_indices_out_of_range", "TritonAttnBackend._forward_extend_unified", "window_kv_indices", -3)
    assert v.details["extend_ids"] == "swa_out_cache_loc"
    assert w.kernel_calls(backend) == 0  # not even the index gather ran
    # the K/V store runs before _forward_extend_unified in SGLang's forward_extend: only layer 0's rows moved
    after = w.kv_snapshot(pool)
    assert all(torch.equal(before[k][0], after[k][0]) for k in before if k != 0)
    assert "build_unified_kv_indices" not in type(backend).__dict__ and backend.__dict__[
        "build_unified_kv_indices"] is not None  # the per-call swap was undone


def test_value_scan_runs_once_per_index_set_per_forward(tmp_path, monkeypatch):
    pool, alloc, layers, batch, backend, fb = td.triton_world()
    calls = []
    real = checks.scan_ragged
    monkeypatch.setattr(checks, "scan_ragged", lambda *a, **k: calls.append(1) or real(*a, **k))
    with kvtrap.armed(dump_dir=str(tmp_path)):
        for layer in layers:
            td.attend(backend, layer, fb)
        assert len(calls) == 2  # kv_indices once, window_kv_indices once
        w.set_triton_metadata(backend, alloc, batch, fb, window=td.TRITON_WINDOW)  # the next forward
        td.attend(backend, layers[0], fb)
        assert len(calls) == 3


# ------------------------------------------------------------------------------- SGLang #24394
def test_24394_injected_trapped_before_the_unified_gather(tmp_path):
    path, err = td.make_24394_dump(tmp_path / "high", high_fill=True)
    v = err.violation
    assert (v.kind, v.layer_type, v.table, v.fatal) == ("index_space_mismatch", "swa", "out_cache_loc", True)
    assert v.details == {"expected_table": "swa_out_cache_loc", "handed_table": "out_cache_loc",
                         "extend_ids": "out_cache_loc"}
    assert SWA_ROWS <= v.value < FULL_ROWS and v.bound == SWA_ROWS  # a full-pool id past the SWA pool
    dump = load_dump(path)
    assert dump.manifest["config"]["inject"] == ["sglang-24394"]
    # what the unified path read as the SWA layer's current ids was out_cache_loc itself (never translated)
    assert (dump.tensors["out_cache_loc"] == dump.tensors["swa_out_cache_loc"]).all()
    low_path, low = td.make_24394_dump(tmp_path / "low", high_fill=False)
    assert low.violation.kind == "index_space_mismatch" and not low.violation.fatal  # ids still fit: caught anyway


def test_24394_world_is_clean_without_the_injection_and_the_injection_reaches_the_gather(tmp_path):
    _, _, layers, _, backend, fb = td.triton_world(prefix_lens=(30, 90, 10), deterministic=True, fill_pages=32)
    with kvtrap.armed(dump_dir=str(tmp_path)):
        for layer in layers:
            td.attend(backend, layer, fb)
    gathers = backend.build_unified_kv_indices.calls
    assert len(gathers) == len(layers) and not list(tmp_path.iterdir())
    swa = backend.forward_metadata.swa_out_cache_loc
    assert torch.equal(gathers[0][4], swa)  # SWA layer 0 appended the translated ids
    # unarmed with the bug: SGLang's own code hands the gather the untranslated ids (the real fault)
    from kvtrap.capture import bugs

    bugs.sync(["sglang-24394"])
    try:
        td.attend(backend, layers[0], fb)
    finally:
        bugs.sync([])
    assert torch.equal(backend.build_unified_kv_indices.calls[-1][4], fb.out_cache_loc)
    assert int(fb.out_cache_loc.max()) >= SWA_ROWS  # an SWA-pool read past its rows on a GPU
    assert backend.forward_metadata.swa_out_cache_loc is swa  # the injection put the metadata back


def test_decode_context_parallel_stands_aside(tmp_path, monkeypatch):
    # with dcp_size > 1 each rank reads rank-local shard ids kvtrap does not bound: no judgement, no sync
    pool, alloc, layers, batch, backend, fb = td.triton_world()
    backend.dcp_size = 2
    backend.forward_metadata.kv_indices[0] = FULL_ROWS  # would be out of range for an unsharded pool
    calls = []
    real = checks.scan_ragged
    monkeypatch.setattr(checks, "scan_ragged", lambda *a, **k: calls.append(1) or real(*a, **k))
    from kvtrap.capture.hooks import triton as hook

    with kvtrap.armed(dump_dir=str(tmp_path)):
        hook.check_layer(backend, full_layer(layers), fb, "forward_decode")
    assert calls == [] and not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------- KV write path
@pytest.mark.parametrize("mode", ["decode", "extend", "unified"])
@pytest.mark.parametrize("value", [FULL_ROWS, -1], ids=["pool-rows", "minus-one"])
def test_out_cache_loc_past_the_full_pool_trapped_before_the_store(tmp_path, value, mode):
    prefix = None if mode == "decode" else (30, 90, 10)
    pool, alloc, layers, batch, backend, fb = td.triton_world(prefix_lens=prefix, deterministic=mode == "unified")
    fb.out_cache_loc[1] = value  # -1 would silently write the pool's last row
    before, locs = w.kv_snapshot(pool), fb.out_cache_loc.clone()
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        td.attend(backend, full_layer(layers), fb)
    td.check_full_write_trap(info.value, locs, value, FULL_ROWS,
                             f"TritonAttnBackend.forward_{'decode' if mode == 'decode' else 'extend'}")  # fmt: skip
    assert w.kernel_calls(backend) == 0  # neither the launch nor (unified) the index gather ran...
    assert w.same_kv(before, w.kv_snapshot(pool))  # ...nor the K/V store
    assert torch.equal(fb.out_cache_loc, locs)


def test_swa_write_location_past_the_swa_pool_trapped_on_the_swa_layer(tmp_path):
    # an untranslated full-pool slot left in swa_out_cache_loc: inside the full pool, past the SWA pool
    pool, alloc, layers, batch, backend, fb = td.triton_world()
    backend.forward_metadata.swa_out_cache_loc[2] = FULL_ROWS - 5
    before = w.kv_snapshot(pool)
    with kvtrap.armed(dump_dir=str(tmp_path)):
        td.attend(backend, full_layer(layers), fb)  # full layers write out_cache_loc: fine
        assert w.kernel_calls(backend) == 1
        with pytest.raises(kvtrap.KVTrapError) as info:
            td.attend(backend, layers[0], fb)
    v = info.value.violation
    assert (v.kind, v.table, v.pool, v.layer_id, v.layer_type, v.row, v.value, v.bound) == (
        "kv_write_out_of_range", "swa_out_cache_loc", "swa", 0, "swa", 2, FULL_ROWS - 5, SWA_ROWS)
    assert v.details["out_cache_loc"] == int(fb.out_cache_loc[2])
    assert w.kernel_calls(backend) == 1  # the SWA layer reached neither its launch...
    after = w.kv_snapshot(pool)  # ...nor its store: only the full layer's K/V changed
    assert w.same_kv(before, after, skip=(full_layer(layers).layer_id,))
    assert not w.same_kv(before, after)  # (the full layer's store really ran)
    assert int(load_dump(info.value.dump_path).tensors["swa_out_cache_loc"][2]) == FULL_ROWS - 5


def test_no_store_no_write_check(tmp_path):
    pool, alloc, layers, batch, backend, fb = td.triton_world()
    fb.out_cache_loc[0] = FULL_ROWS
    q, k, v = td.triton_qkv(fb)
    with kvtrap.armed(dump_dir=str(tmp_path)):
        backend.forward_decode(q, k, v, full_layer(layers), fb, save_kv_cache=False)
    assert w.kernel_calls(backend) == 1 and not list(tmp_path.iterdir())
