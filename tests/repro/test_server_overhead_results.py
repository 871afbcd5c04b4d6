"""benchmarks/server_overhead.py's results step on CPU: a zero baseline reads n/a (never a crash after a long GPU
run), the rows reach the JSON first, and --from-log rebuilds the md/json from a run's stdout."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def so() -> Any:
    spec = importlib.util.spec_from_file_location("server_overhead", ROOT / "benchmarks" / "server_overhead.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["server_overhead"] = mod
    spec.loader.exec_module(mod)
    return mod


def _row(r: int, config: str, conc: int, tpot: float, itl: float, ttft: float, tput: float) -> dict[str, Any]:
    return {"round": r, "config": config, "concurrency": conc, "prompts": max(4, 2 * conc), "median_tpot_ms": tpot,
            "mean_tpot_ms": tpot, "median_itl_ms": itl, "output_throughput": tput, "median_ttft_ms": ttft,
            "accept_length": 4.0}  # fmt: skip


ROWS = [_row(1, "unarmed", 1, 1.30, 0.0, 0.0, 750.0), _row(1, "kernels", 1, 1.17, 0.0, 0.0, 800.0),
        _row(2, "kernels", 1, 1.20, 0.0, 0.0, 810.0), _row(2, "unarmed", 1, 1.20, 0.0, 0.0, 790.0)]  # fmt: skip


def test_a_zero_baseline_is_none_not_a_crash(so: Any) -> None:
    assert so.ratio(1.0, 0.0) is None and so.ratio(1.0, None) is None and so.ratio(None, 2.0) is None
    assert so.ratio(3.0, 2.0) == 1.5
    summary = so.summarize(ROWS, ["unarmed", "kernels"], [1])
    k = next(s for s in summary if s["config"] == "kernels")
    assert k["median_itl_ms"] == 0.0 and k["median_itl_ms_vs_unarmed"] is None
    assert k["median_ttft_ms_vs_unarmed"] is None
    assert k["median_tpot_ms_vs_unarmed"] == pytest.approx(1.185 / 1.25)
    assert k["tpot_ratio_per_round"] == pytest.approx([1.17 / 1.30, 1.20 / 1.20])


def test_write_results_renders_na_with_a_footnote_and_saves_rows_first(so: Any, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from kvtrap.repro.models import variant

    a = so.build_parser().parse_args(["--out", str(tmp_path), "--name", "t", "--configs", "unarmed", "kernels",
                                      "--concurrency", "1", "--rounds", "2", "--scenario", "26b-chat"])  # fmt: skip
    a.argv = []
    kw = {"device": "NVIDIA H200", "date": "2026-11-29", "command": "c", "versions": {"sglang": "0.5.23"}}
    so.write_results(a, variant("26b-a4b", 12), ROWS, [], {}, **kw)
    md = (tmp_path / "server-t-nvidia-h200.md").read_text()
    kernels = next(line for line in md.splitlines() if line.startswith("| 1 | kernels |"))
    assert kernels.split(" | ")[6] == "n/a"  # ITL vs unarmed
    assert "- n/a (median ITL): the unarmed server's median ITL is 0 or missing at concurrency 1" in md
    assert "TTFT and ITL read 0: sglang.bench_serving stamps them only when a streamed chunk carries text" in md
    assert "partial" not in md
    data = json.loads((tmp_path / "server-t-nvidia-h200.json").read_text())
    assert data["rows"] == ROWS and data["partial"] is None

    # a failure after the rows are in hand loses none of them
    def boom(*args: Any) -> Any:
        raise RuntimeError("summary failed")

    monkeypatch.setattr(so, "summarize", boom)
    with pytest.raises(RuntimeError):
        so.write_results(a, variant("26b-a4b", 12), ROWS[:3], [], {}, **kw)
    data = json.loads((tmp_path / "server-t-nvidia-h200.json").read_text())
    assert data["rows"] == ROWS[:3] and data["summary"] is None


CMD = ("/py -m sglang.launch_server --model-path /w/models/target --speculative-draft-model-path /w/models/draft "
       "--attention-backend trtllm_mha --page-size 64 --host 127.0.0.1 --port {port} --load-format dummy")  # fmt: skip
PROBE = {"prompts": 2, "exact": 2, "failed": 0, "exact_match_rate": 1.0, "first_divergence": None,
         "matched_tokens": 128, "total_tokens": 128, "identical": True}  # fmt: skip


def _log(tmp_path: Path, tail: list[str]) -> Path:
    lines = [f"[unarmed] started on port 1: {CMD.format(port=1)}", f"[kernels] started on port 2: {CMD.format(port=2)}",
             "[unarmed] healthy after 137 s", "[kernels] healthy after 138 s",
             "[unarmed] probe: 0 of 2 prompts unanswered", "[kernels] probe: 0 of 2 prompts unanswered",
             f"[kernels] vs unarmed: {json.dumps(PROBE)}", *(json.dumps(r) for r in ROWS[:2]), *tail]  # fmt: skip
    p = tmp_path / "run.log"
    p.write_text("\n".join(lines) + "\n")
    return p


def _rebuild(so: Any, log: Path, out: Path, *extra: str) -> int:
    return so.main(["--from-log", str(log), "--out", str(out), "--name", "k", "--scenario", "26b-chat", "--rounds", "3",
                    "--configs", "unarmed", "kernels", "--probe", "2", "--min-prompts", "4", "--concurrency", "1",
                    *extra])  # fmt: skip


GIVEN = ("--device", "NVIDIA H200", "--date", "2026-11-29", "--command", "python3 server_overhead.py --rounds 3")


def test_from_log_rebuilds_the_md_and_json(so: Any, tmp_path: Path) -> None:
    versions = tmp_path / "v.json"
    versions.write_text(json.dumps({"versions": {"sglang": "0.5.23", "torch": "2.14.1"}}))
    tb = ["Traceback (most recent call last):", '  File "/x/server_overhead.py", line 232, in write_results',
          "    s = a / b", "ZeroDivisionError: float division by zero", "exit 1"]  # fmt: skip
    log = _log(tmp_path, tb)
    assert _rebuild(so, log, tmp_path / "out", *GIVEN, "--versions-from", str(versions), "--note", "as measured") == 0
    md = (tmp_path / "out" / "server-k-nvidia-h200.md").read_text()
    assert f"- rebuilt from the run's log `{log}`" in md
    assert "the run stopped with `ZeroDivisionError: float division by zero` in write_results" in md
    assert "- partial: 1 of 3 rounds" in md
    assert "- date 2026-11-29; command `python3 server_overhead.py --rounds 3`" in md
    assert f"- versions: sglang 0.5.23, torch 2.14.1 (from `{versions}`)" in md
    assert "--port" not in md and "  - kernels: the same flags" in md
    assert "- servers: unarmed healthy after 137 s, kernels healthy after 138 s" in md
    assert "  - kernels: 2/2 prompts identical, 128/128 tokens" in md
    assert "- kvtrap dumps written by any server: not in the log" in md and "- as measured" in md
    assert "| 1 | kernels | 1.170 | 0.9000 | 0.900 | 0.000 | n/a | 800.0 | 1.0667 | 4.00 |" in md
    data = json.loads((tmp_path / "out" / "server-k-nvidia-h200.json").read_text())
    assert data["rows"] == ROWS[:2] and data["dumps"] is None
    assert data["partial"] == {"rounds_done": 1, "rounds_planned": 3}
    assert data["probe_vs_unarmed"]["kernels"] == PROBE and data["probe_vs_unarmed"]["spec"]["prompts"] == 2
    assert data["rebuilt_from"]["log"] == str(log)
    assert data["server_commands"]["kernels"][-1] == "dummy"


def test_from_log_leaves_out_a_cut_off_last_row(so: Any, tmp_path: Path) -> None:
    log = _log(tmp_path, ['{"round": 2, "config": "unarm'])
    assert _rebuild(so, log, tmp_path / "out", *GIVEN) == 0
    md = (tmp_path / "out" / "server-k-nvidia-h200.md").read_text()
    assert "the log ends after round 1's rows, with no error (its last line, 10, is a cut-off row" in md


@pytest.mark.parametrize(
    ("tail", "extra", "message"),
    [
        ([], ("--date", "d"), "--from-log needs --device: the log does not say it"),
        (['{"round": 2, "config": "unarmed"', "exit 1"], GIVEN, "run.log:10: not a JSON row"),
        ([json.dumps(_row(1, "armed", 1, 1.0, 1.0, 1.0, 1.0))], GIVEN, "configuration 'armed', not in --configs"),
        ([json.dumps(_row(1, "unarmed", 8, 1.0, 1.0, 1.0, 1.0))], GIVEN, "concurrency [8], not in --concurrency [1]"),
        ([], (*GIVEN, "--no-spec"), "server 'unarmed' in the log runs with a draft model, but --no-spec is given"),
        ([], (*GIVEN, "--versions-from", "/nonexistent/v.json"), "cannot read /nonexistent/v.json"),
    ],
)
def test_from_log_bad_input_is_one_line_and_exit_2(so: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   tail: list[str], extra: tuple[str, ...], message: str) -> None:  # fmt: skip
    assert _rebuild(so, _log(tmp_path, tail), tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("server_overhead.py --from-log: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_from_log_without_rows_or_file(so: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.log"
    empty.write_text("[unarmed] healthy after 3 s\n")
    assert _rebuild(so, empty, tmp_path / "out", *GIVEN) == 2
    assert _rebuild(so, tmp_path / "missing.log", tmp_path / "out", *GIVEN) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"server_overhead.py --from-log: {empty}: no benchmark rows (JSON lines with round, config, concurrency)",
                   f"server_overhead.py --from-log: cannot read {tmp_path / 'missing.log'}: No such file or directory"]  # fmt: skip


def test_probe_lines_say_how_differences_first_arise(so: Any) -> None:
    from kvtrap.repro.probe import Comparison

    spec = {"prompts": 2, "input_len": 8, "output_len": 4}
    tie = Comparison(2, 0, 0, (0, 1), 2, 8, (0.0004, 0.3), 2).to_json()
    lines = so.probe_lines({"spec": spec, "kernels": tie})
    assert "near ties 1/2 differing prompts" in lines[1] and "swap margins 0.0004-0.3; 2 judged" in lines[1]
    old = {k: v for k, v in tie.items()
           if k not in ("differing", "swap_margins", "near_ties", "near_tie_nats", "judged")}
    assert "near ties" not in so.probe_lines({"spec": spec, "kernels": old})[1]  # an older log's comparison
