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

trapdumps = pytest.importorskip("helpers.trapdumps", reason="tests/helpers/trapdumps.py (real trap scenarios) is missing")

pytestmark = pytest.mark.cpu_world()


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
    monkeypatch.setattr("kvtrap.report.explain.RULES", [])
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

    from kvtrap.report.plot import table_grid

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


# --------------------------------------------------------------------------------- bad input, new user
def _retype(dump_dir: Path, dest: Path, edit) -> Path:
    shutil.copytree(dump_dir, dest)
    m = json.loads((dest / MANIFEST).read_text())
    edit(m)
    (dest / MANIFEST).write_text(json.dumps(m))
    return dest


#: wrong JSON types in every part of the manifest a reader uses
RETYPED = {
    "context": lambda m: m.update(context=[1]),
    "context.tables": lambda m: m["context"].update(tables=["page_table"]),
    "context.pools.swa": lambda m: m["context"]["pools"].update(swa=17),
    "context.layer": lambda m: m["context"].update(layer="0 swa"),
    "context.backend.use_sliding_window_kv_pool": lambda m: m["context"]["backend"].update(
        use_sliding_window_kv_pool="no"),
    "violation": lambda m: m["violation"].update(rows="0,1,2"),
    "violation.bound": lambda m: m["violation"].update(bound="17"),
    "violation.details.drift": lambda m: m["violation"]["details"].update(drift=["_swa_kv_pool"]),
    "config": lambda m: m.update(config="raise"),
    "config.max_dumps": lambda m: m["config"].update(max_dumps="16"),
    "versions": lambda m: m.update(versions="0.5.23"),
    "tensors": lambda m: m.update(tensors=[["page_table", [3, 32]]]),
    "tensors.page_table": lambda m: m["tensors"].update(page_table=[3, 32]),
}


@pytest.mark.parametrize("verb", ["ls", "show", "explain", "plot", "diff"])
@pytest.mark.parametrize("field", sorted(RETYPED))
def test_every_verb_refuses_a_wrong_typed_manifest_in_one_line(
    dumps: dict[str, Path], tmp_path: Path, verb: str, field: str
) -> None:
    bad = _retype(dumps["26957"], tmp_path / "bad", RETYPED[field])
    args = {
        "ls": [str(bad)], "show": [str(bad)], "explain": [str(bad)],
        "plot": [str(bad), "-o", str(tmp_path / "x.png")], "diff": [str(dumps["26957"]), str(bad)],
    }[verb]
    code, out, err = run(verb, *args)
    assert code == 2, (out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvtrap: error: ") and str(bad / MANIFEST) in lines[0]
    assert f"manifest.{field.split('.')[0]}" in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_ls_lists_the_good_and_names_each_bad_with_its_reason(
    dumps: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "mixed"
    shutil.copytree(dumps["26957"], root / "good-1")
    shutil.copytree(dumps["swa_slot"], root / "good-2")
    _retype(dumps["stale"], root / "typed-wrong", RETYPED["context.tables"])
    shutil.copytree(dumps["stale"], root / "truncated")
    (root / "truncated" / MANIFEST).write_bytes((root / "truncated" / MANIFEST).read_bytes()[:80])
    shutil.copytree(dumps["stale"], root / "unreadable")
    real = Path.read_bytes

    def denied(self: Path) -> bytes:  # the OS refusing one file, as for a dump another user wrote
        if self.parent.name == "unreadable":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    code, out, err = run("ls", str(root))
    assert code == 0
    assert "2 dump(s)" in out and "good-1" in out and "good-2" in out
    for name in ("typed-wrong", "truncated", "unreadable"):
        assert name not in out
    lines = err.strip().splitlines()
    assert len(lines) == 3 and all(ln.startswith("kvtrap: skipped unreadable dump: ") for ln in lines)
    reasons = {name: next(ln for ln in lines if f"{os.sep}{name}{os.sep}" in ln)
               for name in ("typed-wrong", "truncated", "unreadable")}
    assert "manifest.context.tables: expected an object, got a list" in reasons["typed-wrong"]
    assert "not valid JSON" in reasons["truncated"]
    assert "cannot be read (Permission denied)" in reasons["unreadable"] and "truncated" not in reasons["unreadable"]


@pytest.mark.parametrize("spec, message", [("0,x", "bad row spec 'x'"), ("7", "row 7 out of range")])
def test_show_rows_is_validated_before_anything_is_printed(dumps: dict[str, Path], spec: str, message: str) -> None:
    code, out, err = run("show", str(dumps["26957"]), "--rows", spec)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"kvtrap: error: Invalid value for --rows: {err.split('--rows: ', 1)[1].strip()}"]
    assert message in err


def test_a_bug_in_a_command_is_not_reported_as_bad_input(dumps: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The boundary maps input errors only: a ValueError from kvtrap's own code keeps its traceback."""
    from kvtrap.report import explain

    def broken(_dump):
        raise ValueError("a bug in a rule")

    monkeypatch.setattr(explain, "explain", broken)
    with pytest.raises(ValueError, match="a bug in a rule"):
        CliRunner().invoke(dump, ["explain", str(dumps["26957"])], catch_exceptions=False)


def test_piping_into_head_ends_quietly(dumps: dict[str, Path]) -> None:
    for verb in (["show", "--all-rows"], ["explain"]):
        cmd = [sys.executable, "-m", "kvtrap", "dump", verb[0], str(dumps["26957"]), *verb[1:]]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.readline()
        proc.stdout.close()  # the reader goes away after one line, like `| head -1`
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 0, err
        assert err == ""


def test_ls_keeps_row_number_and_bad_count_at_80_columns(dumps: dict[str, Path]) -> None:
    from rich.console import Console

    from kvtrap.report import render

    recs, _ = render.ls_records(find_dumps([dumps["root"]]))
    con = Console(width=80, record=True, no_color=True, highlight=False, file=open(os.devnull, "w"))  # noqa: SIM115
    render.render_ls(con, recs)
    lines = con.export_text().splitlines()
    header = next(ln for ln in lines if ln.lstrip().startswith("#"))
    assert "bad" in header.split() and max(len(ln) for ln in lines[1:1 + 2 + len(recs)]) <= 80
    rows = lines[lines.index(header) + 2: lines.index(header) + 2 + len(recs)]
    for i, (row, rec) in enumerate(zip(rows, recs, strict=True), 1):
        assert row.split()[0] == str(i)
        assert f" {rec['count']} " in row
