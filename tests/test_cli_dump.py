"""``kvtrap dump ...`` through click's runner (plus one real subprocess), on dumps from real traps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvtrap.cli.dump_cmd import dump
from kvtrap.record.dumpfile import MANIFEST, TENSORS, find_dumps, load_dump

trapdumps = pytest.importorskip("trapdumps", reason="tests/trapdumps.py (real trap scenarios) is missing")


@pytest.fixture(scope="module")
def dumps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-dumps")
    # two processes' worth of events under one root: the allocator fault happens first
    return {
        "swa_slot": Path(trapdumps.make_swa_slot_dump(root / "rank0")[0]),
        "26957": Path(trapdumps.make_26957_dump(root / "rank1", high_fill=True)[0]),
        "stale": Path(trapdumps.make_stale_row_dump(root / "rank1")[0]),
        "root": root,
    }


def run(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(dump, list(args), catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


# ------------------------------------------------------------------------------------------------ ls
def test_ls_orders_first_failure_first(dumps: dict[str, Path]) -> None:
    code, out, _ = run("ls", str(dumps["root"]))
    assert code == 0
    assert "3 dump(s)" in out
    lines = out.splitlines()
    first_table_row = next(ln for ln in lines if ln.lstrip().startswith("1 "))
    assert "swa_slot_out_of_range" in first_table_row
    assert dumps["swa_slot"].name in out and dumps["26957"].name in out
    assert "next: kvtrap dump explain" in out


def test_ls_json(dumps: dict[str, Path]) -> None:
    code, out, _ = run("ls", "--json", str(dumps["root"] / "rank1"), str(dumps["root"] / "rank0"))
    assert code == 0
    rows = json.loads(out)
    assert [r["index"] for r in rows] == [1, 2, 3]
    assert rows[0]["first"] is True and not any(r["first"] for r in rows[1:])
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
    assert rows[0]["kind"] == "swa_slot_out_of_range"
    assert {"kind", "layer_id", "layer_type", "table", "value", "bound", "rank", "pid", "path"} <= rows[0].keys()


def test_ls_skips_unreadable_but_lists_the_rest(dumps: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(dumps["26957"], tmp_path / dumps["26957"].name)
    broken = tmp_path / "broken-dump"
    shutil.copytree(dumps["stale"], broken)
    (broken / MANIFEST).write_bytes((broken / MANIFEST).read_bytes()[:100])
    code, out, err = run("ls", str(tmp_path))
    assert code == 0
    assert "1 dump(s)" in out
    assert "skipped unreadable dump" in err and "broken-dump" in err


# ---------------------------------------------------------------------------------------------- show
def test_show_summarises_rows(dumps: dict[str, Path]) -> None:
    code, out, _ = run("show", str(dumps["26957"]))
    assert code == 0
    for section in ("Versions and machine", "Violation", "Context", "Table page_table", "Config"):
        assert section in out
    d = load_dump(dumps["26957"])
    assert f"sglang {d.manifest['versions']['sglang']}" in out
    assert "first bad columns" in out or "without bad entries" in out


def test_show_rows_in_full(dumps: dict[str, Path]) -> None:
    d = load_dump(dumps["stale"])
    row = d.manifest["violation"]["row"]
    code, out, _ = run("show", str(dumps["stale"]), "--rows", str(row))
    assert code == 0
    assert f"page_table row {row}:" in out
    assert "*" in out  # bad entries are starred
    code, _, err = run("show", str(dumps["stale"]), "--rows", "9999")
    assert code == 2 and "out of range" in err


# ------------------------------------------------------------------------------------------- explain
def test_explain_names_the_cause(dumps: dict[str, Path]) -> None:
    code, out, _ = run("explain", str(dumps["26957"]))
    assert code == 0
    assert "Likely cause:" in out and "#26957" in out
    assert "evidence:" in out and "next steps:" in out
    code, out, _ = run("explain", "--json", str(dumps["swa_slot"]))
    assert code == 0
    data = json.loads(out)
    assert data["matched"] and data["findings"][0]["rule"] == "swa-slot-out-of-range"


def test_explain_says_plainly_when_no_rule_matches(dumps: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kvtrap.explain.RULES", [])
    code, out, _ = run("explain", str(dumps["stale"]))
    assert code == 1
    assert "No rule matched this dump" in out


# ---------------------------------------------------------------------------------------------- plot
def test_plot_writes_png(dumps: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "heat.png"
    code, stdout, _ = run("plot", str(dumps["26957"]), "-o", str(out))
    assert code == 0, stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run("plot", str(dumps["26957"]), "-o", str(tmp_path / "x.png"), "--table", "nope")
    assert code == 2 and "no page table named nope" in err


def test_plot_allocator_dump(dumps: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "slots.png"
    code, _, _ = run("plot", str(dumps["swa_slot"]), "-o", str(out))
    assert code == 0 and out.stat().st_size > 1000


def test_plot_grid_downsampling_keeps_bad_cells() -> None:
    import numpy as np

    from kvtrap.plot import table_grid

    t = np.ones((256, 1024), dtype=np.int32)
    t[200, 777] = 10**6  # one bad cell
    g = table_grid(t, np.full(256, 1024 * 64, dtype=np.int32), 64, 0, 1000, max_rows=64, max_cols=128)
    assert g["frac"].shape == (64, 128) and g["fr"] == 4 and g["fc"] == 8
    assert g["bad"].sum() == 1 and g["bad"][200 // 4, 777 // 8]


# ---------------------------------------------------------------------------------------------- diff
def test_diff(dumps: dict[str, Path]) -> None:
    code, out, _ = run("diff", str(dumps["26957"]), str(dumps["stale"]))
    assert code == 1
    assert "violation" in out and "difference(s)" in out
    code, out, _ = run("diff", str(dumps["26957"]), str(dumps["26957"]))
    assert code == 0 and "no differences" in out
    code, out, _ = run("diff", "--json", str(dumps["swa_slot"]), str(dumps["26957"]))
    assert code == 1
    sections = {c["section"] for c in json.loads(out)}
    assert {"event", "violation", "context", "tensors"} <= sections


# ----------------------------------------------------------------------------------------- bad input
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _one_error(code: int, out: str, err: str) -> str:
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvtrap: error: "), err
    assert "Traceback" not in err + out
    return lines[0]


@pytest.mark.parametrize("verb", ["show", "explain", "diff", "plot"])
def test_not_a_dump(verb: str, tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    args = {"diff": [str(f), str(f)], "plot": [str(f), "-o", str(tmp_path / "a.png")]}.get(verb, [str(f)])
    msg = _one_error(*run(verb, *args))
    assert "not a kvtrap dump" in msg


def test_truncated_manifest(dumps: dict[str, Path], tmp_path: Path) -> None:
    d = _copy(dumps["26957"], tmp_path / "d")
    (d / MANIFEST).write_bytes((d / MANIFEST).read_bytes()[:200])
    assert "truncated" in _one_error(*run("show", str(d)))


def test_missing_tensors_file(dumps: dict[str, Path], tmp_path: Path) -> None:
    d = _copy(dumps["26957"], tmp_path / "d")
    (d / TENSORS).unlink()
    assert "missing" in _one_error(*run("explain", str(d)))


def test_newer_schema(dumps: dict[str, Path], tmp_path: Path) -> None:
    d = _copy(dumps["26957"], tmp_path / "d")
    m = json.loads((d / MANIFEST).read_text())
    m["schema_version"] = 99
    (d / MANIFEST).write_text(json.dumps(m))
    assert "upgrade kvtrap" in _one_error(*run("show", str(d)))


def test_empty_and_missing_directories(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "no kvtrap dumps" in _one_error(*run("ls", str(tmp_path / "empty")))
    assert "no such file" in _one_error(*run("ls", str(tmp_path / "nope")))
    assert "no such file" in _one_error(*run("show", str(tmp_path / "nope")))


def test_never_unpickles(dumps: dict[str, Path], tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # would create the marker file if anything unpickled the tensors file
            return (open, (str(marker), "w"))

    d = _copy(dumps["26957"], tmp_path / "d")
    (d / TENSORS).write_bytes(pickle.dumps(Evil()))
    msg = _one_error(*run("show", str(d)))
    assert "cannot be read" in msg
    assert not marker.exists()


# ------------------------------------------------------------------------------------ real subprocess
def test_subprocess_explain(dumps: dict[str, Path]) -> None:
    env = dict(os.environ, COLUMNS="80")
    proc = subprocess.run(
        [sys.executable, "-m", "kvtrap.cli.dump_cmd", "explain", str(dumps["26957"])],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Likely cause:" in proc.stdout
    # not a TTY: no ANSI colour codes, fixed width
    assert "\x1b[" not in proc.stdout
    assert max(len(ln) for ln in proc.stdout.splitlines()) <= 120
    proc = subprocess.run(
        [sys.executable, "-m", "kvtrap.cli.dump_cmd", "ls", str(dumps["root"] / "nothing-here")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("kvtrap: error:")


def test_find_dumps_sees_every_event(dumps: dict[str, Path]) -> None:
    assert len(find_dumps([dumps["root"]])) == 3
