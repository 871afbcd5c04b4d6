"""fa3 trap on real sglang==0.5.23 objects (CPU): SGLang's ``FlashAttentionBackend`` and its metadata,
built by its own ``init_forward_metadata`` from real pools, faults injected into them.

The fa3 module imports on CPU through the ``common_ops`` stand-in (``helpers/standins/sgl_kernel_ops.py``);
the FlashAttention launch is replaced by a recorder (``helpers/fa3_world.KernelRecorder``), so "before the
kernel" means the recorder was never called. GPU counterparts: ``tests/capture/test_fa3_gpu.py``.
"""

from __future__ import annotations

import random

import pytest
import torch

import kvtrap
from kvtrap.record.dumpfile import load_dump

pytest.importorskip("sglang")

from helpers import fa3_world as fw  # noqa: E402
from helpers import sglang_world as w  # noqa: E402
from helpers import trapdumps as td  # noqa: E402

pytestmark = pytest.mark.cpu_world(gpu="tests/capture/test_fa3_gpu.py")
fw.fa3_module()  # skips this file on a GPU machine without sgl_kernel; fails loudly on a broken CPU install


def kv_state(pool):
    return {lid: pool.get_key_buffer(lid).clone() for lid in w.SWA_LAYERS + w.FULL_LAYERS}


def decode_all(world, monkeypatch, recorder):
    for layer in world.layers:
        fw.run_layer(world, layer, recorder, monkeypatch)


def test_clean_random_steps_bit_identical_armed_and_unarmed(tmp_path, monkeypatch):
    # the same random worlds twice, unarmed then armed: same kernel inputs, same KV, no dump
    rng = random.Random(11)
    for step in range(40):
        bs = rng.randint(1, 3)
        lens = tuple(rng.randint(1, 60) for _ in range(bs))
        fill = rng.choice([0, 0, 8, 16])
        runs = []
        for armed in (False, True):
            world = fw.decode_world(lens, fill_pages=fill, seed=step)
            rec = fw.KernelRecorder()
            if armed:
                with kvtrap.armed(dump_dir=str(tmp_path)):
                    decode_all(world, monkeypatch, rec)
            else:
                decode_all(world, monkeypatch, rec)
            runs.append((rec.calls, kv_state(world.pool)))
        (calls_a, kv_a), (calls_b, kv_b) = runs
        assert len(calls_a) == len(calls_b) == len(w.SWA_LAYERS + w.FULL_LAYERS)
        for a, b in zip(calls_a, calls_b, strict=True):
            assert torch.equal(a["page_table"], b["page_table"]) and torch.equal(a["cache_seqlens"], b["cache_seqlens"])
        assert all(torch.equal(kv_a[k], kv_b[k]) for k in kv_a)
    assert not list(tmp_path.iterdir()), "a clean run wrote a dump"


@pytest.mark.parametrize("history", ["fresh", "wrapped", "diverged"])
def test_clean_speculative_verify_is_quiet(tmp_path, monkeypatch, history):
    # fa3's own speculative SWA table (translated, as 0.5.23 builds it) passes every check
    world = fw.verify_world(history=history)
    spec = world.backend.forward_metadata.swa_spec_metadata
    assert spec is not None and spec.page_table.shape[0] == 12
    rec = fw.KernelRecorder()
    monkeypatch.setattr(fw.fa3_module(), "flash_attn_with_kvcache", rec)
    q, k, v = w.qkv(12)
    with kvtrap.armed(dump_dir=str(tmp_path)):
        for layer in world.layers:
            if layer.layer_id in w.SWA_LAYERS:  # full layers run the topk>1 cascade merge (an sgl_kernel op)
                world.backend.forward_extend(q, k, v, layer, world.fb)
    assert len(rec.calls) == len(w.SWA_LAYERS) and rec.calls[0]["page_table"].shape == spec.page_table.shape
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value", [w.SWA_PAGES + 1, -1, 2**31 - 1], ids=["page-count", "minus-one", "huge"])
def test_out_of_range_swa_id_trapped_before_kernel(tmp_path, monkeypatch, value):
    world = fw.decode_world()
    md = world.backend.forward_metadata
    md.swa_page_table[1, 3] = value
    before = kv_state(world.pool)
    rec = fw.KernelRecorder()
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        fw.run_layer(world, world.layers[0], rec, monkeypatch)
    assert rec.calls == []  # the FlashAttention launch never happened
    after = kv_state(world.pool)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nor the K/V store
    v = info.value.violation
    assert (v.kind, v.layer_id, v.layer_type, v.table) == ("page_table_out_of_range", 0, "swa", "swa_page_table")
    assert (v.row, v.column, v.value, v.lower, v.bound) == (1, 3, value, 0, w.SWA_PAGES + 1)
    assert v.where == "FlashAttentionBackend.forward_decode"
    dump = load_dump(info.value.dump_path)
    assert dump.tensors["swa_page_table"][1, 3] == value
    assert (dump.tensors["cache_seqlens"] == [41, 101, 18]).all()
    ctx = dump.manifest["context"]
    assert ctx["tables"]["swa_page_table"]["handed_to_layer"] is True
    assert ctx["backend"]["class"] == "FlashAttentionBackend" and ctx["backend"]["use_sliding_window_kv_pool"] is True
    assert ctx["backend"].get("swa_kv_pool_is_live") is None  # trtllm_mha's cached fields: fa3 has none


def test_full_layer_checked_against_full_pool(tmp_path, monkeypatch):
    world = fw.decode_world()
    world.backend.forward_metadata.page_table[2, 1] = w.FULL_PAGES + 1
    full_layer = next(layer for layer in world.layers if layer.layer_id in w.FULL_LAYERS)
    rec = fw.KernelRecorder()
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        fw.run_layer(world, full_layer, rec, monkeypatch)
    v = info.value.violation
    assert (v.table, v.pool, v.row, v.column, v.value, v.bound) == ("page_table", "full", 2, 1, 65, 65)
    # the SWA layers' table is still in range, but no longer the translation of the full table there
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        fw.run_layer(world, world.layers[0], rec, monkeypatch)
    v = info.value.violation
    assert (v.kind, v.table, v.row, v.column) == ("index_space_mismatch", "swa_page_table", 2, 1)
    assert rec.calls == []


def test_untranslated_swa_entry_in_range_caught(tmp_path, monkeypatch):
    # an in-range SWA id that is not mapping[full * page_size] // page_size: no fault, wrong KV
    world = fw.decode_world(fill_pages=8)  # full ids and SWA ids differ
    md = world.backend.forward_metadata
    full_id = int(md.page_table[1, 2])
    assert full_id < w.SWA_PAGES + 1 and full_id != int(md.swa_page_table[1, 2])
    md.swa_page_table[1, 2] = full_id
    rec = fw.KernelRecorder()
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        fw.run_layer(world, world.layers[0], rec, monkeypatch)
    assert rec.calls == []
    v = info.value.violation
    assert (v.kind, v.table, v.row, v.column, v.value, v.count) == ("index_space_mismatch", "swa_page_table", 1, 2,
                                                                     full_id, 1)
    assert v.details["swa_translation"] and v.bound is None


def _swa_layer_handed_page_table_is_trapped(world, tmp_path, monkeypatch) -> None:
    """fa3 hands the first SWA layer ``page_table`` (stale ``use_sliding_window_kv_pool``): trapped before
    the kernel, as an index-space mismatch with that drift."""
    rec = fw.KernelRecorder()
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        fw.run_layer(world, world.layers[0], rec, monkeypatch)
    assert rec.calls == []
    v = info.value.violation
    assert (v.kind, v.table, v.layer_type) == ("index_space_mismatch", "page_table", "swa")
    assert "use_sliding_window_kv_pool" in v.details["drift"]


def test_26957_state_on_fa3_trapped_on_first_swa_layer(tmp_path, monkeypatch):
    # the backend cached "no SWA pool" at init while the live pool is an SWA pool: fa3 hands SWA layers
    # the full table (its own forward_decode chooses by use_sliding_window_kv_pool)
    world = fw.decode_world(swa=False)
    assert world.backend.forward_metadata.swa_page_table is None
    _swa_layer_handed_page_table_is_trapped(world, tmp_path, monkeypatch)


def test_frozen_kv_draft_on_fa3_hands_swa_layers_full_ids(tmp_path, monkeypatch):
    # SGLang 0.5.23's frozen-KV MTP draft on fa3 (topk 1): the backend's use_sliding_window_kv_pool comes from
    # the draft's own plain pool at init, SGLang's frozen_kv_target_view swaps the target's SWA pool in, and
    # fa3 (no resolver like trtllm_mha's _resolve_swa_kv_pool) hands SWA layers page_table: #26957's state,
    # in the release, where the draft's own pool is a plain one (read from the code; not seen on a GPU yet)
    world = fw.decode_world(frozen_kv_draft=True)
    assert world.backend.use_sliding_window_kv_pool is False and world.backend.forward_metadata.swa_page_table is None
    _swa_layer_handed_page_table_is_trapped(world, tmp_path, monkeypatch)


def test_stale_host_lengths_make_the_table_too_narrow(tmp_path, monkeypatch):
    # fa3 sizes its eager table from seq_lens_cpu; a mirror one page behind leaves the longest row short
    world = fw.decode_world((40, 100, 17), stale_cpu_lens=w.PAGE_SIZE)
    md = world.backend.forward_metadata
    assert md.page_table.shape[1] * w.PAGE_SIZE < 101
    rec = fw.KernelRecorder()
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        fw.run_layer(world, world.layers[0], rec, monkeypatch)
    assert rec.calls == []
    v = info.value.violation
    assert (v.kind, v.row, v.bound) == ("seqlens_exceed_table", 1, md.page_table.shape[1])


def test_speculative_rows_past_the_context_need_more_pages_than_the_table_has(tmp_path, monkeypatch):
    # a request at the length limit: its draft decode step 2 reads seq_lens + 3 tokens, fa3 cuts the table at
    # the req_to_token width (the context length here), so the last row needs one page more than it has
    seq = fw.MAX_CONTEXT - 2  # 510 tokens after this step's token: the step reads 513 = 33 pages of 16
    world = fw.decode_world((seq - 1,), draft_step=2)
    md = world.backend.forward_metadata
    assert int(md.cache_seqlens_int32[0]) == seq + 3 and md.page_table.shape[1] == fw.MAX_CONTEXT // w.PAGE_SIZE
    rec = fw.KernelRecorder()
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        fw.run_layer(world, world.layers[0], rec, monkeypatch)
    assert rec.calls == []
    v = info.value.violation
    assert (v.kind, v.row, v.bound) == ("seqlens_exceed_table", 0, 32)
    assert v.details["overflow"]["needed_pages"] == 33 and info.value.dump_path is not None


def test_kv_write_outside_swa_pool_trapped_before_store(tmp_path, monkeypatch):
    world = fw.decode_world()
    md = world.backend.forward_metadata
    md.swa_out_cache_loc[2] = (w.SWA_PAGES + 1) * w.PAGE_SIZE
    before = kv_state(world.pool)
    rec = fw.KernelRecorder()
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        fw.run_layer(world, world.layers[0], rec, monkeypatch)
    assert rec.calls == [] and all(torch.equal(before[k], kv_state(world.pool)[k]) for k in before)
    v = info.value.violation
    assert (v.kind, v.table, v.row, v.value) == ("kv_write_out_of_range", "swa_out_cache_loc", 2,
                                                  (w.SWA_PAGES + 1) * w.PAGE_SIZE)


# ------------------------------------------------------------------------------------ SGLang #24402
@pytest.mark.parametrize("wrapped", [False, True], ids=["ids-in-range", "ids-past-swa-pool"])
def test_24402_injected_trapped_before_kernel(tmp_path, wrapped):
    path, err = td.make_24402_dump(tmp_path, wrapped=wrapped)
    v = err.violation
    assert v.table == "swa_spec_page_table" and v.layer_type == "swa" and v.where.endswith("forward_extend")
    if wrapped:  # full-pool ids past the SWA pool: what faulted upstream
        assert v.kind == "page_table_out_of_range" and v.value >= v.bound == 257
    else:  # every id still in range: caught by the translation check, long before a fault
        assert v.kind == "index_space_mismatch" and v.details["swa_translation"]
    dump = load_dump(path)
    spec, full = dump.tensors["swa_spec_page_table"], dump.tensors["swa_spec_page_table_full_ids"]
    live = fw.checks_live(dump.tensors["cache_seqlens"], spec.shape[1])
    assert (spec[live] == full[live]).all()  # the table holds the untranslated full-pool ids
    assert dump.manifest["config"]["inject"] == ["sglang-24402"]


def test_24402_injection_is_the_only_difference(tmp_path, monkeypatch):
    # injected vs not, same history: only the SWA spec table differs, and it equals the full-pool rows
    tables = {}
    for inject in ((), ("sglang-24402",)):
        with kvtrap.armed(mode="log", dump_dir=str(tmp_path / str(len(inject))), inject=inject):
            world = fw.verify_world(history="diverged")
        md = world.backend.forward_metadata
        tables[inject] = (md.page_table.clone(), md.swa_page_table.clone(), md.swa_spec_metadata.page_table.clone())
    clean, bad = tables[()], tables[("sglang-24402",)]
    assert torch.equal(clean[0], bad[0]) and torch.equal(clean[1], bad[1])
    assert not torch.equal(clean[2], bad[2])
    # and the injection is gone once disarmed: SGLang's method is its own again
    world = fw.verify_world(history="diverged")
    assert torch.equal(world.backend.forward_metadata.swa_spec_metadata.page_table, clean[2])
