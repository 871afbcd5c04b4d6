"""trtllm_mha trap on real sglang==0.5.23 objects: faults injected into real pools/tables/backends."""

from __future__ import annotations

import pytest
import torch

import kvtrap
from kvtrap.capture import checks
from kvtrap.record.dumpfile import load_dump

sglang = pytest.importorskip("sglang")

from helpers import sglang_world as w  # noqa: E402
from helpers import trapdumps as td  # noqa: E402

pytestmark = pytest.mark.cpu_world(
    gpu="tests/capture/test_guard_gpu.py, the gpu tests of tests/capture/test_guard_fused.py"
)

KERNEL_REACHED = "name 'flashinfer' is not defined"  # on CPU the FlashInfer launch is where SGLang stops


def kv_state(pool):
    return {lid: pool.get_key_buffer(lid).clone() for lid in w.SWA_LAYERS + w.FULL_LAYERS}


def run_decode(backend, layer, fb, bs):
    q, k, v = w.qkv(bs)
    try:
        backend.forward_decode(q, k, v, layer, fb)
    except NameError as exc:
        assert KERNEL_REACHED in str(exc)
        return "kernel"
    raise AssertionError("forward_decode returned without reaching the kernel")


def world():
    pool, alloc, layers, batch, backend, fb = td.decode_world()
    w.set_write_locs(backend, alloc, fb)
    return pool, alloc, layers, batch, backend, fb


def test_clean_decode_is_bit_identical_armed_and_unarmed(tmp_path):
    # Same world twice: once unarmed, once armed. Every layer reaches the kernel with the same KV state,
    # and the garbage written past each row's live prefix (987654 / -777) is ignored.
    pool_a, _, layers_a, batch_a, backend_a, fb_a = world()
    pool_b, _, layers_b, batch_b, backend_b, fb_b = world()
    for layer in layers_a:
        assert run_decode(backend_a, layer, fb_a, 3) == "kernel"
    with kvtrap.armed(dump_dir=str(tmp_path)):
        for layer in layers_b:
            assert run_decode(backend_b, layer, fb_b, 3) == "kernel"
    a, b = kv_state(pool_a), kv_state(pool_b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(backend_a.forward_metadata.page_table, backend_b.forward_metadata.page_table)
    assert not list(tmp_path.iterdir()), "a clean run wrote a dump"


@pytest.mark.parametrize("value", [w.SWA_PAGES + 1, -1, 2**31 - 1], ids=["page-count", "minus-one", "huge"])
def test_out_of_range_swa_id_trapped_before_kernel(tmp_path, value):
    pool, alloc, layers, batch, backend, fb = world()
    md = backend.forward_metadata
    md.swa_page_table[1, 3] = value
    before = kv_state(pool)
    swa_layer = layers[0]
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        run_decode(backend, swa_layer, fb, 3)
    v = info.value.violation
    assert (v.kind, v.layer_id, v.layer_type, v.table) == ("page_table_out_of_range", 0, "swa", "swa_page_table")
    assert (v.row, v.column, v.value, v.lower, v.bound) == (1, 3, value, 0, w.SWA_PAGES + 1)
    assert "row 1, column 3" in str(info.value) and str(value) in str(info.value)
    # nothing was written to the KV cache: the trap ran before set_kv_buffer and the kernel
    after = kv_state(pool)
    assert all(torch.equal(before[k], after[k]) for k in before)
    dump = load_dump(info.value.dump_path)
    assert dump.kind == "page_table_out_of_range"
    assert dump.tensors["swa_page_table"][1, 3] == value
    assert (dump.tensors["page_table"] == md.page_table.numpy()).all()
    assert (dump.tensors["cache_seqlens"] == [40, 100, 17]).all()
    ctx = dump.manifest["context"]
    assert ctx["layer"] == {"id": 0, "type": "swa", "window": w.WINDOW, "index_in_pool": 0}
    assert ctx["pools"]["swa"]["pages"] == w.SWA_PAGES + 1 and ctx["pools"]["full"]["pages"] == w.FULL_PAGES + 1
    assert ctx["tables"]["swa_page_table"]["handed_to_layer"] is True
    assert ctx["forward_mode"] == "DECODE" and ctx["batch_size"] == 3 and ctx["page_size"] == w.PAGE_SIZE
    assert ctx["backend"]["use_sliding_window_kv_pool"] is True


def test_full_layer_checked_against_full_pool(tmp_path):
    pool, alloc, layers, batch, backend, fb = world()
    backend.forward_metadata.page_table[2, 1] = w.FULL_PAGES + 1
    full_layer = next(layer for layer in layers if layer.layer_id in w.FULL_LAYERS)
    swa_layer = layers[0]
    with kvtrap.armed(dump_dir=str(tmp_path)):
        assert run_decode(backend, swa_layer, fb, 3) == "kernel"  # SWA layers read the SWA table: fine
        with pytest.raises(kvtrap.KVTrapError) as info:
            run_decode(backend, full_layer, fb, 3)
    v = info.value.violation
    assert (v.table, v.pool, v.row, v.column, v.value, v.bound) == ("page_table", "full", 2, 1, 65, 65)


def test_garbage_beyond_cache_seqlens_is_ignored(tmp_path):
    pool, alloc, layers, batch, backend, fb = world()
    md = backend.forward_metadata
    live = checks.live_pages(md.cache_seqlens_int32, w.PAGE_SIZE)
    assert (md.page_table[0, int(live[0]):] == 987654).all()  # junk really is there
    with kvtrap.armed(dump_dir=str(tmp_path)):
        for layer in layers:
            assert run_decode(backend, layer, fb, 3) == "kernel"


def test_26957_stale_state_trapped_on_first_swa_layer_while_ids_are_small(tmp_path):
    pool, alloc, layers, batch, backend, fb = td.decode_world(stale=True)
    md = backend.forward_metadata
    assert int(md.page_table.max()) > 0 and md.swa_page_table is None
    live_max = max(int(md.page_table[r, : (n + 15) // 16].max()) for r, n in enumerate(batch.seq_lens))
    assert live_max < w.SWA_PAGES + 1  # ids still fit the SWA pool: nothing would fault yet
    calls = []
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        for layer in layers:  # model order: layer 0 is the first SWA layer
            calls.append(layer.layer_id)
            run_decode(backend, layer, fb, 3)
    assert calls == [0]
    v = info.value.violation
    assert (v.kind, v.layer_id, v.layer_type, v.table, v.fatal) == ("index_space_mismatch", 0, "swa", "page_table", False)
    assert set(v.details["drift"]) == {"_swa_kv_pool", "use_sliding_window_kv_pool", "_swa_full_to_swa_mapping"}
    dump = load_dump(info.value.dump_path)
    assert dump.manifest["context"]["backend"]["swa_kv_pool"] is None
    assert dump.manifest["context"]["tables"]["page_table"]["handed_to_layer"] is True


def test_26957_at_high_fill_is_fatal_with_full_pool_ids(tmp_path):
    path, err = td.make_26957_dump(tmp_path, high_fill=True)
    v = err.violation
    assert v.kind == "index_space_mismatch" and v.fatal
    assert w.SWA_PAGES + 1 <= v.value < w.FULL_PAGES + 1  # the #26957 signature: SWA bound < id < full bound


def test_identity_mismatch_full_layer_handed_swa_table(tmp_path):
    pool, alloc, layers, batch, backend, fb = world()
    md = backend.forward_metadata
    md.page_table = md.swa_page_table  # metadata built wrong: both names point at the SWA table
    full_layer = next(layer for layer in layers if layer.layer_id in w.FULL_LAYERS)
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        run_decode(backend, full_layer, fb, 3)
    v = info.value.violation
    assert (v.kind, v.layer_type, v.table) == ("index_space_mismatch", "full", "swa_page_table")


def test_drift_raises_in_raise_mode_and_continues_once_in_log_mode(tmp_path):
    pool, alloc, layers, batch, backend, fb = world()
    backend._swa_full_to_swa_mapping = backend._swa_full_to_swa_mapping.clone()
    with kvtrap.armed(dump_dir=str(tmp_path / "r")), pytest.raises(kvtrap.KVTrapError) as info:
        run_decode(backend, layers[0], fb, 3)
    assert info.value.violation.kind == "swa_state_drift"
    with kvtrap.armed(mode="log", dump_dir=str(tmp_path / "l")) as session:
        for _ in range(3):
            for layer in layers:
                assert run_decode(backend, layer, fb, 3) == "kernel"  # log mode: safe, so it goes on
    assert len(list((tmp_path / "l").iterdir())) == len(layers)  # one dump per layer signature, not per step
    assert sum(session.counts.values()) == 3 * len(layers)


def test_log_mode_still_raises_when_the_launch_would_fault(tmp_path):
    pool, alloc, layers, batch, backend, fb = world()
    backend.forward_metadata.swa_page_table[0, 0] = 10_000
    with kvtrap.armed(mode="log", dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError):
        run_decode(backend, layers[0], fb, 3)


def test_seqlens_wider_than_table(tmp_path):
    path, err = td.make_seqlens_exceed_dump(tmp_path)
    v = err.violation
    assert v.kind == "seqlens_exceed_table" and v.row == 0 and v.details["overflow"]["width"] == 2


def test_spec_verify_at_the_context_limit_traps_before_the_kernel(tmp_path):
    """The last speculative step of a request at SGLang 0.5.23's length limit (see trapdumps): its verify rows
    need one page more than trtllm_mha's ceil(context_len / page_size)-wide table has. Trapped in
    forward_extend (TARGET_VERIFY), with the backend's context length and draft size in the dump."""
    path, err = td.make_spec_context_limit_dump(tmp_path)
    v = err.violation
    assert v.kind == "seqlens_exceed_table" and v.where.endswith("forward_extend")
    assert v.details["overflow"] == {"row": 0, "needed_pages": w.MAX_PAGES + 1, "width": w.MAX_PAGES, "rows": 1}
    dump = load_dump(path)
    assert dump.manifest["context"]["forward_mode"] == "TARGET_VERIFY" and dump.manifest["context"]["speculative"] is True
    assert dump.manifest["context"]["backend"]["max_context_len"] == w.MAX_PAGES * w.PAGE_SIZE
    assert int(dump.tensors["cache_seqlens"][0]) == w.MAX_PAGES * w.PAGE_SIZE + 3


def test_spec_draft_decode_at_the_context_limit_traps_too(tmp_path):
    # the draft's decode steps come first in each iteration and run as DECODE with spec_info set
    path, err = td.make_spec_context_limit_dump(tmp_path, draft_decode=True)
    assert err.violation.kind == "seqlens_exceed_table" and err.violation.where.endswith("forward_decode")
    dump = load_dump(path)
    assert dump.manifest["context"]["forward_mode"] == "DECODE" and dump.manifest["context"]["speculative"] is True
    assert int(dump.tensors["cache_seqlens"][0]) == w.MAX_PAGES * w.PAGE_SIZE + 2


def test_plain_decode_records_not_speculative(tmp_path):
    _, err = td.make_seqlens_exceed_dump(tmp_path)
    assert load_dump(err.dump_path).manifest["context"]["speculative"] is False


def test_value_scan_runs_once_per_table_per_forward(tmp_path, monkeypatch):
    pool, alloc, layers, batch, backend, fb = world()
    calls = []
    real = checks.scan_page_table
    monkeypatch.setattr(checks, "scan_page_table", lambda *a, **k: calls.append(1) or real(*a, **k))
    with kvtrap.armed(dump_dir=str(tmp_path)):
        for layer in layers:
            run_decode(backend, layer, fb, 3)
        assert len(calls) == 2  # page_table once, swa_page_table once
        w.set_metadata(backend, backend.forward_metadata.page_table, backend.forward_metadata.swa_page_table,
                       backend.forward_metadata.cache_seqlens_int32)
        w.set_write_locs(backend, alloc, fb)
        run_decode(backend, layers[0], fb, 3)
        assert len(calls) == 3  # a new forward's metadata is scanned again


def test_failed_dump_never_hides_the_trap(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the dump directory should go")
    pool, alloc, layers, batch, backend, fb = world()
    backend.forward_metadata.swa_page_table[0, 0] = 99
    with kvtrap.armed(dump_dir=str(blocker)), pytest.raises(kvtrap.KVTrapError) as info:
        run_decode(backend, layers[0], fb, 3)
    assert info.value.dump_path is None and "could not be written" in str(info.value)
    assert blocker.read_text().startswith("a file")


# ------------------------------------------------------------------ page 0 read for a real request
def tables_of(backend):
    md = backend.forward_metadata
    return md.page_table.clone(), md.swa_page_table.clone(), md.cache_seqlens_int32.clone()


def test_padding_page_for_real_request_trapped_before_kernel(tmp_path):
    pool, alloc, layers, batch, backend, fb = world()
    md = backend.forward_metadata
    md.page_table[1, 2] = 0  # request slot 2, 7 live pages: column 2 is live
    before, tables = kv_state(pool), tables_of(backend)
    full_layer = next(layer for layer in layers if layer.layer_id in w.FULL_LAYERS)
    with kvtrap.armed(dump_dir=str(tmp_path)):
        assert run_decode(backend, layers[0], fb, 3) == "kernel"  # SWA layers do not read page_table
        with pytest.raises(kvtrap.KVTrapError) as info:
            run_decode(backend, full_layer, fb, 3)
    v = info.value.violation
    assert (v.kind, v.table, v.pool, v.layer_id) == ("padding_page_for_real_request", "page_table", "full", 3)
    assert (v.row, v.column, v.value, v.count, v.lower, v.bound, v.fatal) == (1, 2, 0, 1, 1, w.FULL_PAGES + 1, False)
    assert v.details["req_pool_index"] == 2 and v.details["live_pages"] == 7
    # the trap ran before this layer's KV store and kernel: the pool holds only the SWA layer's write
    after = kv_state(pool)
    assert all(torch.equal(before[k], after[k]) for k in before if k != layers[0].layer_id)
    assert all(torch.equal(a, b) for a, b in zip(tables, tables_of(backend), strict=True))  # nothing repaired or moved
    dump = load_dump(info.value.dump_path)
    assert dump.kind == "padding_page_for_real_request"
    assert int(dump.tensors["page_table"][1, 2]) == 0
    assert dump.tensors["req_pool_indices"].tolist() == [1, 2, 3]
    assert dump.tensors["cache_seqlens"].tolist() == [40, 100, 17]
    assert dump.manifest["context"]["layer"]["type"] == "full"


def with_padding_rows(backend, alloc, fb, slots):
    """Append CUDA-graph padding rows as SGLang's graph runner pads a batch: length 1, page 0, write slot 0.
    ``slots``: the request slot of each appended row (0 for a real padding row)."""
    md = backend.forward_metadata
    n = len(slots)
    pad = torch.zeros((n, md.page_table.shape[1]), dtype=md.page_table.dtype)
    md.page_table = torch.cat([md.page_table, pad])
    md.swa_page_table = torch.cat([md.swa_page_table, pad.clone()])
    md.cache_seqlens_int32 = torch.cat([md.cache_seqlens_int32, torch.ones(n, dtype=torch.int32)])
    fb.req_pool_indices = torch.cat([fb.req_pool_indices, torch.tensor(slots, dtype=torch.int64)])
    fb.out_cache_loc = torch.cat([fb.out_cache_loc, torch.zeros(n, dtype=fb.out_cache_loc.dtype)])
    fb.seq_lens = torch.cat([fb.seq_lens, torch.ones(n, dtype=fb.seq_lens.dtype)])
    fb.batch_size = int(fb.seq_lens.shape[0])
    w.set_write_locs(backend, alloc, fb)


def test_cuda_graph_padding_rows_may_read_page_0(tmp_path):
    pool, alloc, layers, batch, backend, fb = world()
    with_padding_rows(backend, alloc, fb, [0, 0])
    with kvtrap.armed(dump_dir=str(tmp_path)):
        for layer in layers:
            assert run_decode(backend, layer, fb, 5) == "kernel"
    assert not list(tmp_path.iterdir())


def test_page_0_in_a_row_of_length_1_with_a_real_slot_is_trapped(tmp_path):
    # the same padding-shaped row, but its request slot is real: a real request reading page 0
    pool, alloc, layers, batch, backend, fb = world()
    with_padding_rows(backend, alloc, fb, [0, 9])
    full_layer = next(layer for layer in layers if layer.layer_id in w.FULL_LAYERS)
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        run_decode(backend, full_layer, fb, 5)
    v = info.value.violation
    assert (v.kind, v.row, v.column, v.count) == ("padding_page_for_real_request", 4, 0, 1)
    assert v.details["req_pool_index"] == 9


def test_padding_page_continues_in_log_mode(tmp_path):
    # in range (no fault, a wrong answer): log mode dumps once and lets the kernel run
    pool, alloc, layers, batch, backend, fb = world()
    backend.forward_metadata.page_table[0, 0] = 0
    with kvtrap.armed(mode="log", dump_dir=str(tmp_path)):
        for layer in layers:
            assert run_decode(backend, layer, fb, 3) == "kernel"
    dumps = list(tmp_path.iterdir())
    assert len(dumps) == len(w.FULL_LAYERS)
    assert {load_dump(d).kind for d in dumps} == {"padding_page_for_real_request"}


def test_padding_page_not_scanned_while_capturing(tmp_path, monkeypatch):
    # no host sync inside a CUDA-graph capture: the value scan (and this check with it) is skipped
    monkeypatch.setattr(checks, "is_capturing", lambda t: True)
    calls = []
    real = checks.scan_page_table
    monkeypatch.setattr(checks, "scan_page_table", lambda *a, **k: calls.append(1) or real(*a, **k))
    pool, alloc, layers, batch, backend, fb = world()
    backend.forward_metadata.page_table[1, 2] = 0
    with kvtrap.armed(dump_dir=str(tmp_path), guard="off"):
        for layer in layers:
            assert run_decode(backend, layer, fb, 3) == "kernel"
    assert calls == [] and not list(tmp_path.iterdir())


def _random_decode_steps(rng, steps):
    """Random clean decode steps on real objects: fresh requests of random lengths in random real request
    slots, sometimes padded with CUDA-graph padding rows, every layer stored and launched. Returns the pool."""
    pool = w.make_pool()
    alloc = w.make_allocator(pool)
    backend = w.make_backend(pool, alloc)
    layers = w.make_layers()
    for step in range(steps):
        lens = [rng.randint(1, 64) for _ in range(rng.randint(1, 4))]  # 4 pages at most: fits the SWA pool
        batch = w.allocate_requests(alloc, lens)
        full, swa, seqlens = w.page_tables(alloc, batch)
        w.set_metadata(backend, full, swa, seqlens)
        fb = w.make_forward_batch(batch)
        fb.req_pool_indices = torch.tensor(rng.sample(range(1, 64), len(lens)), dtype=torch.int64)
        w.set_write_locs(backend, alloc, fb)
        pads = rng.choice([0, 0, 1, 3])
        if pads:
            with_padding_rows(backend, alloc, fb, [0] * pads)
        bs = len(lens) + pads
        for layer in layers:
            q, k, v = w.qkv(bs, seed=step)
            with pytest.raises(NameError, match="flashinfer"):
                backend.forward_decode(q, k, v, layer, fb)
        for slots in batch.token_slots:
            alloc.free(slots)
    return pool


def test_random_clean_decode_steps_armed_are_bit_identical_to_unarmed(tmp_path):
    import random

    plain = kv_state(_random_decode_steps(random.Random(11), 250))
    with kvtrap.armed(dump_dir=str(tmp_path)) as session:
        armed = kv_state(_random_decode_steps(random.Random(11), 250))
    assert not sum(session.counts.values()) and not list(tmp_path.iterdir())
    assert all(torch.equal(plain[k], armed[k]) for k in plain)
    assert any(bool(t.abs().sum()) for t in armed.values())  # the steps really wrote KV


# ----------------------------------------------------------------------------------- KV write path
def full_rows():
    return (w.FULL_PAGES + 1) * w.PAGE_SIZE


def swa_rows():
    return (w.SWA_PAGES + 1) * w.PAGE_SIZE


@pytest.mark.parametrize("value", [full_rows(), -1], ids=["pool-rows", "minus-one"])
def test_out_cache_loc_past_the_full_pool_trapped_before_the_write(tmp_path, value):
    pool, alloc, layers, batch, backend, fb = world()  # SWA write locs translated from the clean locations
    fb.out_cache_loc[1] = value  # -1 would silently write the pool's last row
    before, locs = kv_state(pool), fb.out_cache_loc.clone()
    full_layer = next(layer for layer in layers if layer.layer_id in w.FULL_LAYERS)
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        run_decode(backend, full_layer, fb, 3)
    v = info.value.violation
    assert (v.kind, v.table, v.pool, v.layer_id, v.layer_type) == ("kv_write_out_of_range", "out_cache_loc", "full", 3, "full")
    assert (v.row, v.column, v.value, v.lower, v.bound, v.count, v.fatal) == (1, None, value, 0, full_rows(), 1, True)
    after = kv_state(pool)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing stored, for any layer
    assert torch.equal(fb.out_cache_loc, locs)
    dump = load_dump(info.value.dump_path)
    assert dump.kind == "kv_write_out_of_range"
    assert dump.tensors["out_cache_loc"].tolist() == locs.tolist()
    assert dump.tensors["req_pool_indices"].tolist() == [1, 2, 3]
    ctx = dump.manifest["context"]
    assert ctx["layer"]["type"] == "full" and ctx["num_tokens"] == 3 and ctx["pools"]["full"]["rows"] == full_rows()


def test_untranslated_swa_write_location_trapped_on_the_swa_layer(tmp_path):
    # a full-pool slot left in swa_out_cache_loc (not translated): past the SWA pool, inside the full one
    pool, alloc, layers, batch, backend, fb = world()
    md = backend.forward_metadata
    md.swa_out_cache_loc[2] = full_rows() - 5
    before = kv_state(pool)
    with kvtrap.armed(dump_dir=str(tmp_path)):
        full_layer = next(layer for layer in layers if layer.layer_id in w.FULL_LAYERS)
        assert run_decode(backend, full_layer, fb, 3) == "kernel"  # full layers write out_cache_loc: fine
        with pytest.raises(kvtrap.KVTrapError) as info:
            run_decode(backend, layers[0], fb, 3)
    v = info.value.violation
    assert (v.kind, v.table, v.pool, v.layer_type, v.row, v.value, v.bound) == (
        "kv_write_out_of_range", "swa_out_cache_loc", "swa", "swa", 2, full_rows() - 5, swa_rows())
    assert v.details["out_cache_loc"] == int(fb.out_cache_loc[2])
    after = kv_state(pool)
    assert all(torch.equal(before[k], after[k]) for k in before if k != full_layer.layer_id)
    dump = load_dump(info.value.dump_path)
    assert int(dump.tensors["swa_out_cache_loc"][2]) == full_rows() - 5


def test_padding_writes_to_slot_0_are_legal(tmp_path):
    pool, alloc, layers, batch, backend, fb = world()
    with_padding_rows(backend, alloc, fb, [0, 0, 0])
    assert int(fb.out_cache_loc[-1]) == 0 and int(backend.forward_metadata.swa_out_cache_loc[-1]) == 0
    with kvtrap.armed(dump_dir=str(tmp_path)):
        for layer in layers:
            assert run_decode(backend, layer, fb, 6) == "kernel"
    assert not list(tmp_path.iterdir())


def test_write_locations_not_scanned_while_capturing_or_without_a_store(tmp_path, monkeypatch):
    pool, alloc, layers, batch, backend, fb = world()
    fb.out_cache_loc[0] = full_rows() + 7
    full_layer = next(layer for layer in layers if layer.layer_id in w.FULL_LAYERS)
    q, k, v = w.qkv(3)
    with kvtrap.armed(dump_dir=str(tmp_path)):
        # save_kv_cache=False: nothing is stored, nothing to check (the kernel still runs)
        with pytest.raises(NameError, match="flashinfer"):
            backend.forward_decode(q, k, v, full_layer, fb, save_kv_cache=False)
    monkeypatch.setattr(checks, "is_capturing", lambda t: True)
    calls = []
    monkeypatch.setattr(checks, "scan_slots", lambda *a, **kw: calls.append(1))
    with kvtrap.armed(dump_dir=str(tmp_path), guard="off"):
        # not checked while capturing: the bad location reaches SGLang's own store (on CPU an IndexError)
        with pytest.raises(IndexError, match=str(full_rows() + 7)):
            backend.forward_decode(q, k, v, full_layer, fb)
    assert calls == [] and not list(tmp_path.iterdir())


def test_write_scan_runs_once_per_pool_per_forward(tmp_path, monkeypatch):
    pool, alloc, layers, batch, backend, fb = world()
    calls = []
    real = checks.scan_slots
    monkeypatch.setattr(checks, "scan_slots", lambda *a, **k: calls.append(1) or real(*a, **k))
    with kvtrap.armed(dump_dir=str(tmp_path)):
        for layer in layers:
            run_decode(backend, layer, fb, 3)
    assert len(calls) == 2  # out_cache_loc once (full layers), swa_out_cache_loc once (SWA layers)
