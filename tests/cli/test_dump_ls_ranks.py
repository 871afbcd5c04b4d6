"""`kvtrap dump ls` over dumps of several tensor-parallel ranks: each dump records its ranks (SGLang's own
parallel context), one fault seen by every rank is one event, and its first failing rank comes first.

Each rank is a real process that hits the same real trap (#26957 at high fill, built from SGLang's real
objects) with SGLang's ParallelContext saying which TP rank it is, as a TP=2 server's schedulers do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvtrap.cli.dump_cmd import dump
from kvtrap.record.dumpfile import find_dumps, load_dump

pytest.importorskip("sglang")

pytestmark = pytest.mark.cpu_world()

TESTS = Path(__file__).resolve().parents[1]
RANK_PROCESS = """
import sys
sys.path.insert(0, {tests!r})
from helpers.srt import import_srt
rc = import_srt("sglang.srt.runtime_context")
from helpers import trapdumps
with rc.get_parallel().override(tp_rank={rank}, tp_size=2, dp_rank=0, pp_rank=0, pp_size=1,
                                launch_world_rank={rank}, launch_world_size=2):
    getattr(trapdumps, {maker!r})(sys.argv[1], **{kwargs!r})
"""


def _rank(dump_dir: Path, rank: int, maker: str = "make_26957_dump", **kwargs: object) -> None:
    code = RANK_PROCESS.format(tests=str(TESTS), rank=rank, maker=maker, kwargs=kwargs)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVTRAP_", "SGLANG_TRTLLM"))}
    proc = subprocess.run([sys.executable, "-c", code, str(dump_dir)], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip
    if proc.returncode != 0 and "needs sgl_kernel" in proc.stdout + proc.stderr:
        pytest.skip("sglang.srt needs sgl_kernel, which is not installed here")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def tp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tp2")
    _rank(root / "tp0", 0, high_fill=True)  # rank 0 fails first
    _rank(root / "tp1", 1, high_fill=True)
    _rank(root / "tp1", 1, maker="make_swa_slot_dump")  # a later, different fault on rank 1 only
    return root


def test_each_dump_records_its_ranks(tp2: Path) -> None:
    recs = [load_dump(p, tensors=False).record for p in find_dumps([tp2])]
    assert sorted((r.parallel.tp_rank, r.parallel.tp_size, r.parallel.world_rank) for r in recs) == [
        (0, 2, 0), (1, 2, 1), (1, 2, 1)]  # fmt: skip
    assert all(r.parallel.dp_rank == 0 and r.parallel.pp_size == 1 for r in recs)


def test_ls_groups_the_ranks_of_one_event_first_failing_rank_first(tp2: Path) -> None:
    res = CliRunner().invoke(dump, ["ls", str(tp2)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "event 1: rows 1, 2 are one fault seen by 2 processes (ranks tp0, tp1); row 1 failed first" in res.stdout
    assert "event 2" not in res.stdout  # the allocator fault on rank 1 alone is not grouped with anything
    rows = json.loads(CliRunner().invoke(dump, ["ls", "--json", str(tp2)], catch_exceptions=False).stdout)
    assert [(r["event"], r["tp_rank"], r["kind"]) for r in rows] == [
        (1, 0, "index_space_mismatch"), (1, 1, "index_space_mismatch"), (2, 1, "swa_slot_out_of_range")]  # fmt: skip
    assert rows[0]["event_ranks"] == ["tp0", "tp1"] and rows[2]["event_ranks"] == ["tp1"]


def test_a_dump_outside_sglang_has_no_parallel_record(tmp_path: Path) -> None:
    from helpers import trapdumps

    path, _ = trapdumps.make_swa_slot_dump(tmp_path)
    rec = load_dump(path, tensors=False).record
    assert rec.parallel is None and "parallel" in json.loads((Path(path) / "manifest.json").read_text())


def test_explain_says_whether_every_rank_saw_the_same_fault(tp2: Path) -> None:
    first, second, alone = sorted(find_dumps([tp2]), key=lambda p: load_dump(p, tensors=False).record.time)
    cli = CliRunner()
    res = cli.invoke(dump, ["explain", str(second), "--ranks", str(tp2)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "ranks: the same fault was dumped by 2 processes (tp0, tp1)" in res.stdout and "every rank saw it" in res.stdout
    assert "tp0 failed first" in res.stdout
    res = cli.invoke(dump, ["explain", str(first), "--ranks", str(tp2)], catch_exceptions=False)
    assert "this dump is the first." in res.stdout
    res = cli.invoke(dump, ["explain", str(alone), "--ranks", str(tp2)], catch_exceptions=False)
    assert "ranks: no other process dumped this fault" in res.stdout
    out = json.loads(cli.invoke(dump, ["explain", "--json", str(second), "--ranks", str(tp2)]).stdout)
    assert out["ranks"]["processes"] == 2 and out["ranks"]["event_ranks"] == ["tp0", "tp1"]
    assert Path(out["ranks"]["first"]).resolve() == first.resolve()
    res = cli.invoke(dump, ["explain", str(first), "--ranks", str(tp2 / "nope")])
    assert res.exit_code == 2 and "not a directory" in res.output
