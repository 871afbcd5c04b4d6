"""GPU proofs for the device guard, with SGLang's Triton decode attention as the victim.

1. Without kvtrap an out-of-range page id kills the process with an illegal-address error (child).
2. With the guard the same launch completes, ``KVTrapError`` names row, column, value and bound, and
   CUDA keeps working in the same process.
3. The same inside a captured CUDA graph (SGLang's in-graph page-table builder, then the guard),
   trapped on replay; capture itself proves the guard does no host sync.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from kvtrap import Config, KVTrapError  # noqa: E402
from kvtrap.record.context import Context  # noqa: E402
from kvtrap.record.dumpfile import reset_dump_count  # noqa: E402

pytestmark = pytest.mark.gpu

ROW, COL = 2, 5


def _victim(**kw):
    pytest.importorskip("sglang.kernels.ops.attention.decode_attention")
    from helpers.victim import PagedDecode

    return PagedDecode(4, 1024, **kw)


def test_unguarded_out_of_range_page_kills_the_process() -> None:
    pytest.importorskip("sglang.kernels.ops.attention.decode_attention")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "helpers" / "victim.py"), "--crash"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert "clean step ok" in out
    assert "UNEXPECTED" not in out
    assert proc.returncode != 0
    assert "illegal memory access" in out or "illegal address" in out


def test_guard_traps_eager_launch_and_cuda_survives(tmp_path: Path) -> None:
    from kvtrap.capture.guard import GuardRecord, check_and_raise

    reset_dump_count()
    dec = _victim()
    rec = GuardRecord(16)
    tid = rec.register_table("page_table", pool="full")
    dec.step(rec)
    torch.cuda.synchronize()
    clean = dec.o.clone()
    assert check_and_raise(rec, Config(dump_dir=tmp_path)) is None

    bad = dec.bad_page()
    dec.corrupt_(ROW, COL, bad)
    dec.build_()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call in the guard launch would raise
    try:
        dec.guard_(rec, tid, layer_id=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    dec.expand_()
    dec.attend()
    torch.cuda.synchronize()  # the launch completed: no illegal address
    with pytest.raises(KVTrapError) as ei:
        check_and_raise(rec, Config(mode="raise", dump_dir=tmp_path), Context(batch_size=dec.bs),
                        {"page_table": dec.page_table, "cache_seqlens": dec.cache_seqlens})
    v = ei.value.violation
    print(str(ei.value))
    assert (v.row, v.column, v.value, v.bound, v.table) == (ROW, COL, bad, dec.num_pages, "page_table")
    assert ei.value.dump_path is not None
    # the CUDA context is alive: a following CUDA operation works and other rows are unaffected
    x = torch.arange(10, device="cuda", dtype=torch.float32)
    assert float((x * 2).sum().item()) == 90.0
    others = [r for r in range(dec.bs) if r != ROW]
    torch.testing.assert_close(dec.o[others], clean[others])


def test_guard_inside_cuda_graph_traps_on_replay(tmp_path: Path) -> None:
    from kvtrap.capture.guard import GuardRecord, check_and_raise

    reset_dump_count()
    dec = _victim()
    rec = GuardRecord(16)
    tid = rec.register_table("page_table", pool="full")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (compile) outside capture
        dec.step(rec)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    rec.drain()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):  # raises if anything in step() synchronises
        dec.build_()
        dec.guard_(rec, tid, layer_id=0)
        rec.publish_()
        dec.expand_()
        dec.attend()
    g.replay()
    torch.cuda.synchronize()
    assert rec.pending(synced=True) == 0
    assert check_and_raise(rec, Config(dump_dir=tmp_path), synced=True) is None
    clean = dec.o.clone()

    bad = dec.bad_page()
    dec.corrupt_(ROW, COL, bad)  # the in-graph builder will hand it to the kernel on replay
    g.replay()
    torch.cuda.synchronize()  # stands in for SGLang's copy_done.synchronize()
    assert rec.pending(synced=True) == 1
    with pytest.raises(KVTrapError) as ei:
        check_and_raise(rec, Config(mode="raise", dump_dir=tmp_path), Context(capturing=False),
                        {"page_table": dec.page_table}, synced=True)
    v = ei.value.violation
    print(str(ei.value))
    assert (v.row, v.column, v.value, v.bound) == (ROW, COL, bad, dec.num_pages)
    assert float(torch.ones(4, device="cuda").sum().item()) == 4.0
    # repair the pool: the next replay is clean again and gives the clean output
    dec.corrupt_(ROW, COL, int(dec.req_to_token[int(dec.req_pool_indices[ROW]), COL * dec.page_size + 1]) // dec.page_size)
    g.replay()
    torch.cuda.synchronize()
    assert check_and_raise(rec, Config(dump_dir=tmp_path), synced=True) is None
    torch.testing.assert_close(dec.o, clean)
