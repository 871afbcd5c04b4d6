"""CPU tests of the device guard: the Triton kernel runs under ``TRITON_INTERPRET=1``.

Triton decides at import time whether kernels are interpreted, so the kernel tests run in a child
pytest process with the variable set (``test_guard_kernels_under_interpreter``); run directly with
``TRITON_INTERPRET=1 pytest tests/capture/test_guard.py`` they run in-process. Page tables are built by
SGLang's own Triton builders (``trtllm_mha_page_table`` and ``trtllm_mha_graph_metadata``), also
interpreted. The record/drain tests need no kernel and run in the parent process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from kvtrap import Config, KVTrapError, load_dump  # noqa: E402
from kvtrap.capture.guard import (  # noqa: E402
    GuardRecord,
    check_and_raise,
    guard_page_table_,
)
from kvtrap.record.context import Context  # noqa: E402
from kvtrap.record.dumpfile import reset_dump_count  # noqa: E402
from kvtrap.record.guard_entry import FLAG_OUT_OF_RANGE, FLAG_SEQLEN_EXCEEDS_TABLE, FLAG_SWA_MISMATCH  # noqa: E402
from kvtrap.record.kinds import Kind  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
interp_only = pytest.mark.skipif(not INTERP, reason="runs in the TRITON_INTERPRET=1 child process")

PS = 16  # page size
FULL_PAGES = 64  # full pool pages, page 0 reserved
SWA_PAGES = 16  # SWA pool pages, page 0 reserved


# ----------------------------------------------------------------------------------------- helpers
def _sglang_builders():
    pt_mod = pytest.importorskip("sglang.kernels.ops.attention.trtllm_mha_page_table")
    gm_mod = pytest.importorskip("sglang.kernels.ops.attention.trtllm_mha_graph_metadata")
    return pt_mod.build_trtllm_mha_page_table, gm_mod.update_trtllm_mha_graph_metadata


def _pool(seqlens: list[int], max_ctx: int = 512, seed: int = 0):
    """req_to_token with distinct full pages per request (never page 0) and a full->SWA mapping."""
    g = torch.Generator().manual_seed(seed)
    bs = len(seqlens)
    r2t = torch.zeros(bs + 1, max_ctx, dtype=torch.int32)
    pages = (torch.randperm(FULL_PAGES - 1, generator=g) + 1).tolist()
    for r, n in enumerate(seqlens):
        for p in range((n + PS - 1) // PS):
            page = pages.pop()
            r2t[r + 1, p * PS : (p + 1) * PS] = torch.arange(page * PS, (page + 1) * PS)
    # full->SWA slot mapping, token indexed, page aligned; SWA pages 1..SWA_PAGES-1 reused round robin
    mapping = torch.zeros((FULL_PAGES + 1) * PS, dtype=torch.int64)
    for fp in range(1, FULL_PAGES):
        sp = 1 + (fp * 7) % (SWA_PAGES - 1)
        mapping[fp * PS : (fp + 1) * PS] = torch.arange(sp * PS, (sp + 1) * PS)
    req_pool_indices = torch.arange(1, bs + 1, dtype=torch.int64)
    return r2t, req_pool_indices, mapping


def _build_eager(seqlens: list[int], width: int = 32, seed: int = 0, swa: bool = False):
    build, _ = _sglang_builders()
    r2t, rpi, mapping = _pool(seqlens, seed=seed)
    sl = torch.tensor(seqlens, dtype=torch.int32)
    # buffers from torch.empty in SGLang: fill the dead tail with garbage the guard must not read
    pt = torch.full((len(seqlens), width), 10**8, dtype=torch.int32)
    swa_pt = torch.full((len(seqlens), width), -(10**8), dtype=torch.int32) if swa else None
    build(r2t, rpi, sl, pt, PS, swa_page_table=swa_pt, full_to_swa=mapping if swa else None)
    return r2t, rpi, sl, pt, swa_pt, mapping


def _live(sl: torch.Tensor, r: int) -> int:
    return (int(sl[r]) + PS - 1) // PS


# ------------------------------------------------------------------------------- kernel (interp)
@interp_only
def test_clean_tables_record_nothing_and_stay_unchanged() -> None:
    _, _, sl, pt, swa_pt, mapping = _build_eager([40, 1, 200, 16], swa=True)
    before, swa_before = pt.clone(), swa_pt.clone()
    rec = GuardRecord(16, "cpu")
    guard_page_table_(pt, sl, PS, FULL_PAGES, rec, rec.register_table("page_table", "full"))
    guard_page_table_(
        swa_pt, sl, PS, SWA_PAGES, rec, rec.register_table("swa_page_table", "swa"),
        swa_mapping=mapping, full_table=pt,
    )
    assert int(rec.counter[0]) == 0
    assert torch.equal(pt, before) and torch.equal(swa_pt, swa_before)
    assert not rec.drain()


@interp_only
def test_out_of_range_entry_is_recorded_and_redirected() -> None:
    r2t, rpi, sl, pt, _, _ = _build_eager([40, 100, 33])
    # corrupt one page of request row 1 in req_to_token, then rebuild with SGLang's builder
    bad_page = FULL_PAGES + 5_000_000
    r2t[rpi[1], 3 * PS] = bad_page * PS
    build, _ = _sglang_builders()
    build(r2t, rpi, sl, pt, PS)
    assert int(pt[1, 3]) == bad_page
    before = pt.clone()
    rec = GuardRecord(16, "cpu")
    tid = rec.register_table("page_table", pool="full")
    guard_page_table_(pt, sl, PS, FULL_PAGES, rec, tid, layer_id=7)
    drained = rec.drain()
    assert drained.total == 1
    (e,) = drained.entries
    assert (e.table_id, e.layer_id, e.row, e.column, e.value, e.bound) == (tid, 7, 1, 3, bad_page, FULL_PAGES)
    assert e.flags == FLAG_OUT_OF_RANGE
    assert int(pt[1, 3]) == 0  # redirected to the safe page
    before[1, 3] = 0
    assert torch.equal(pt, before)  # nothing else touched
    assert int(rec.counter[0]) == 0  # drain resets
    v = rec.to_violation(drained)
    assert v.kind == Kind.PAGE_TABLE_OUT_OF_RANGE and v.where == "device_guard"
    assert (v.table, v.row, v.column, v.value, v.bound, v.layer_id) == ("page_table", 1, 3, bad_page, FULL_PAGES, 7)


@interp_only
def test_dead_tail_is_masked_by_cache_seqlens() -> None:
    _, _, sl, pt, _, _ = _build_eager([17, 64])
    assert int(pt[0, 5]) == 10**8  # garbage past the live prefix, as with torch.empty buffers
    rec = GuardRecord(16, "cpu")
    guard_page_table_(pt, sl, PS, FULL_PAGES, rec, 0)
    assert not rec.drain()
    # one token more makes the next column live, and its garbage is caught
    sl2 = sl.clone()
    sl2[1] = 65
    guard_page_table_(pt, sl2, PS, FULL_PAGES, rec, 0)
    d = rec.drain()
    assert [(e.row, e.column, e.value) for e in d.entries] == [(1, 4, 10**8)]


@interp_only
def test_negative_page_is_out_of_range() -> None:
    _, _, sl, pt, _, _ = _build_eager([40])
    pt[0, 1] = -1
    rec = GuardRecord(4, "cpu")
    guard_page_table_(pt, sl, PS, FULL_PAGES, rec, 0)
    (e,) = rec.drain().entries
    assert (e.column, e.value, e.flags) == (1, -1, FLAG_OUT_OF_RANGE)


@interp_only
def test_full_table_handed_to_swa_layer_is_caught() -> None:
    """#26957: an SWA layer gets the untranslated full table. Large ids are out of the SWA pool
    (redirected); small ones are in range but differ from the translation (recorded, not changed)."""
    _, _, sl, pt, swa_pt, mapping = _build_eager([160, 96], swa=True, seed=3)
    rec = GuardRecord(64, "cpu")
    tid = rec.register_table("swa_page_table", pool="swa")
    handed = pt.clone()  # what the buggy backend hands to the SWA layer
    guard_page_table_(handed, sl, PS, SWA_PAGES, rec, tid, layer_id=0, swa_mapping=mapping, full_table=pt)
    d = rec.drain()
    live = [(r, c) for r in range(2) for c in range(_live(sl, r))]
    expect_oor = {(r, c) for r, c in live if int(pt[r, c]) >= SWA_PAGES}
    expect_mis = {(r, c) for r, c in live if int(pt[r, c]) != int(swa_pt[r, c])}
    assert expect_oor, "the test pool must hand out full pages beyond the SWA pool"
    got_oor = {(e.row, e.column) for e in d.entries if e.flags & FLAG_OUT_OF_RANGE}
    got_mis = {(e.row, e.column) for e in d.entries if e.flags & FLAG_SWA_MISMATCH}
    assert got_oor == expect_oor
    assert got_mis == expect_mis
    for r, c in live:
        want = 0 if (r, c) in expect_oor else int(pt[r, c])
        assert int(handed[r, c]) == want
    assert rec.to_violation(d).kind == Kind.PAGE_TABLE_OUT_OF_RANGE


@interp_only
def test_swa_mismatch_alone_is_index_space_violation() -> None:
    _, _, sl, pt, swa_pt, mapping = _build_eager([48], swa=True, seed=1)
    swa_pt[0, 2] = (int(swa_pt[0, 2]) % (SWA_PAGES - 1)) + 1 if int(swa_pt[0, 2]) != 1 else 2  # in range, wrong
    rec = GuardRecord(8, "cpu")
    tid = rec.register_table("swa_page_table", pool="swa")
    before = swa_pt.clone()
    guard_page_table_(swa_pt, sl, PS, SWA_PAGES, rec, tid, swa_mapping=mapping, full_table=pt)
    d = rec.drain()
    assert [(e.row, e.column, e.flags) for e in d.entries] == [(0, 2, FLAG_SWA_MISMATCH)]
    assert torch.equal(swa_pt, before)  # in range: recorded, not rewritten
    v = rec.to_violation(d)
    assert v.kind == Kind.INDEX_SPACE_MISMATCH and not v.fatal


@interp_only
def test_graph_metadata_builder_tables_and_swa_minus_one() -> None:
    """Tables from SGLang's in-graph builder; a negative mapping yields SWA page -1, which is caught."""
    _, build_graph = _sglang_builders()
    seqlens = [50, 20, 130]
    r2t, rpi, mapping = _pool(seqlens, seed=5)
    bs, width = len(seqlens), 16
    seq_lens = torch.tensor(seqlens, dtype=torch.int64)
    cache_seqlens = torch.zeros(bs, dtype=torch.int32)
    cu_k = torch.zeros(bs + 1, dtype=torch.int32)
    pt = torch.full((bs, width), 10**8, dtype=torch.int32)
    swa_pt = torch.full((bs, width), 10**8, dtype=torch.int32)
    first_full = int(r2t[rpi[2], 0]) // PS
    mapping[first_full * PS] = -1  # the SWA slot of this page was freed / never mapped
    build_graph(
        req_pool_indices=rpi, seq_lens=seq_lens, req_to_token=r2t, cache_seqlens=cache_seqlens,
        cu_seqlens_k=cu_k, page_table=pt, bs=bs, seqlen_offset=0, max_seq_pages=width, page_size=PS,
        swa_mapping=mapping, swa_page_table=swa_pt,
    )
    assert int(swa_pt[2, 0]) == -1
    rec = GuardRecord(8, "cpu")
    guard_page_table_(pt, cache_seqlens, PS, FULL_PAGES, rec, rec.register_table("page_table"))
    assert not rec.drain()
    guard_page_table_(
        swa_pt, cache_seqlens, PS, SWA_PAGES, rec, rec.register_table("swa_page_table"),
        swa_mapping=mapping, full_table=pt,
    )
    (e,) = rec.drain().entries
    assert (e.row, e.column, e.value, e.flags) == (2, 0, -1, FLAG_OUT_OF_RANGE)  # matches mapping, but < 0
    assert int(swa_pt[2, 0]) == 0


@interp_only
def test_capacity_overflow_counts_dropped_entries() -> None:
    _, _, sl, pt, _, _ = _build_eager([256, 256])
    pt[:, :16] = FULL_PAGES + 1
    rec = GuardRecord(5, "cpu")
    guard_page_table_(pt, sl, PS, FULL_PAGES, rec, 0)
    d = rec.drain()
    assert d.total == 32 and len(d.entries) == 5 and d.dropped == 27
    assert torch.all(pt[:, :16] == 0)  # every bad entry is redirected, recorded or not
    assert rec.to_violation(d).count == 32


@interp_only
def test_seqlen_wider_than_table_is_recorded() -> None:
    _, _, sl, pt, _, _ = _build_eager([64], width=8)
    sl[0] = 8 * PS + 1  # needs 9 pages, the table has 8 columns
    rec = GuardRecord(16, "cpu")
    guard_page_table_(pt, sl, PS, FULL_PAGES, rec, 0)
    d = rec.drain()
    e = [x for x in d.entries if x.flags & FLAG_SEQLEN_EXCEEDS_TABLE]
    assert [(x.row, x.value, x.bound) for x in e] == [(0, 9, 8)]
    assert rec.to_violation(d).kind in (Kind.SEQLENS_EXCEED_TABLE, Kind.PAGE_TABLE_OUT_OF_RANGE)


@interp_only
def test_int64_table_and_strided_rows() -> None:
    _, _, sl, pt, _, _ = _build_eager([40, 40])
    big = torch.full((2, 64), 7, dtype=torch.int64)
    big[:, :32] = pt.to(torch.int64)
    view = big[:, :32]  # row stride 64
    view[0, 2] = 2**40
    rec = GuardRecord(4, "cpu")
    guard_page_table_(view, sl, PS, FULL_PAGES, rec, 0)
    (e,) = rec.drain().entries
    assert (e.row, e.column, e.value) == (0, 2, 2**40)
    assert int(big[0, 2]) == 0 and int(big[0, 40]) == 7


@interp_only
def test_check_and_raise_end_to_end(tmp_path: Path) -> None:
    reset_dump_count()
    _, _, sl, pt, _, _ = _build_eager([40, 100])
    pt[1, 5] = 123_456_789
    rec = GuardRecord(8, "cpu")
    tid = rec.register_table("page_table", pool="full", layer_id=3, layer_type="full")
    guard_page_table_(pt, sl, PS, FULL_PAGES, rec, tid, layer_id=3)
    cfg = Config(mode="raise", dump_dir=tmp_path)
    with pytest.raises(KVTrapError) as ei:
        check_and_raise(rec, cfg, Context(batch_size=2, page_size=PS), {"page_table": pt, "cache_seqlens": sl})
    v = ei.value.violation
    assert (v.row, v.column, v.value, v.bound) == (1, 5, 123_456_789, FULL_PAGES)
    assert "row 1, column 5 holds 123456789" in str(ei.value)
    dump = load_dump(ei.value.dump_path)
    assert dump.violation.where == "device_guard"
    assert dump.manifest["context"]["guard"]["redirected_to"] == 0
    assert dump.tensors["guard_entries"].tolist() == [[tid, 3, 1, 5, 123_456_789, FULL_PAGES, FLAG_OUT_OF_RANGE]]
    assert int(dump.tensors["page_table"][1, 5]) == 0  # the table as the kernel read it
    assert check_and_raise(rec, cfg) is None  # drained


# ------------------------------------------------------------------------- parent process (no kernel)
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU stand-in for the compiled kernels; on a GPU the gpu-marked tests run them compiled")
def test_guard_kernels_under_interpreter() -> None:
    if INTERP:
        pytest.skip("already interpreting")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=600,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert " passed" in out and "failed" not in out, out[-2000:]


def _fake_record(rows: list[list[int]], total: int | None = None, capacity: int = 4) -> GuardRecord:
    rec = GuardRecord(capacity, "cpu", safe_page=0)
    for i, r in enumerate(rows[:capacity]):
        rec.entries[i] = torch.tensor(r)
    rec.counter[0] = len(rows) if total is None else total
    return rec


def test_to_violation_prefers_out_of_range_and_sorts() -> None:
    rec = _fake_record(
        [[1, 4, 3, 0, 9, 16, FLAG_SWA_MISMATCH], [1, 4, 2, 7, 99, 16, FLAG_OUT_OF_RANGE], [1, 4, 0, 1, 40, 16, 1]]
    )
    rec.register_table("page_table", "full")
    rec.register_table("swa_page_table", "swa", layer_type="swa")
    d = rec.drain()
    assert [e.row for e in d.entries] == [0, 2, 3]
    v = rec.to_violation(d)
    assert (v.kind, v.table, v.pool, v.row, v.column, v.value, v.layer_id) == (
        Kind.PAGE_TABLE_OUT_OF_RANGE, "swa_page_table", "swa", 0, 1, 40, 4,
    )
    assert v.rows == (0, 2) and v.count == 3
    assert v.details["entries_by_flag"] == {"out_of_range": 2, "swa_mismatch": 1, "seqlen_exceeds_table": 0,
                                            "indptr_malformed": 0}


def test_drain_reports_dropped_entries() -> None:
    rec = _fake_record([[0, -1, 0, c, 500, 64, 1] for c in range(4)], total=10, capacity=4)
    d = rec.drain()
    assert d.total == 10 and d.dropped == 6
    v = rec.to_violation(d)
    assert v.layer_id is None and v.details["dropped"] == 6 and v.count == 10


def test_log_mode_logs_dumps_and_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reset_dump_count()
    rec = _fake_record([[0, 2, 1, 3, 70, 64, FLAG_OUT_OF_RANGE]])
    cfg = Config(mode="log", dump_dir=tmp_path)
    with caplog.at_level("WARNING", logger="kvtrap"):
        v = check_and_raise(rec, cfg, Context(capturing=False))
    assert v is not None and v.value == 70
    assert "row 1, column 3 holds 70" in caplog.text
    assert len(list(tmp_path.iterdir())) == 1
    assert rec.pending() == 0


def test_dump_failure_still_raises(tmp_path: Path) -> None:
    reset_dump_count()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rec = _fake_record([[0, 2, 1, 3, 70, 64, FLAG_OUT_OF_RANGE]])
    with pytest.raises(KVTrapError) as ei:
        check_and_raise(rec, Config(mode="raise", dump_dir=blocker / "sub"))
    assert ei.value.dump_path is None and ei.value.dump_error


def test_launcher_rejects_bad_arguments() -> None:
    rec = GuardRecord(4, "cpu")
    sl = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError):
        guard_page_table_(torch.zeros(2, 4, dtype=torch.float32), sl, 16, 8, rec, 0)
    with pytest.raises(ValueError):
        guard_page_table_(torch.zeros(2, 4, dtype=torch.int32), sl, 16, 8, rec, 0, safe_page=8)
    with pytest.raises(ValueError):
        guard_page_table_(torch.zeros(3, 4, dtype=torch.int32), sl, 16, 8, rec, 0)
    with pytest.raises(ValueError):
        guard_page_table_(torch.zeros(2, 4, dtype=torch.int32), sl, 16, 8, rec, 0, swa_mapping=sl)
