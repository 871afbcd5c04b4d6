"""Runner orchestration with stand-in server/benchmark processes: health wait, timeouts, classification,
reports, and process-group cleanup (also on SIGINT). CPU only; loopback only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from kvtrap.repro import runner, scenarios
from kvtrap.repro.classify import Outcome

STANDINS = Path(__file__).resolve().parents[1] / "helpers" / "standins"
FAKE_SERVER = STANDINS / "fake_server.py"
FAKE_BENCH = STANDINS / "fake_bench.py"


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def _pids(run_dir: Path) -> dict[str, int]:
    d = run_dir / "pids"
    return {p.stem: int(p.read_text()) for p in d.glob("*.pid")} if d.is_dir() else {}


def _run(tmp_path: Path, server_mode: str, bench_mode: str = "ok", *, grandchild: bool = True,
         server_extra: tuple[str, ...] = (), **opts: float) -> runner.RunResult:  # fmt: skip
    def server_cmd(sc: scenarios.Scenario, o: runner.RunOptions, port: int, rd: Path) -> list[str]:
        cmd = [sys.executable, str(FAKE_SERVER), "--port", str(port), "--mode", server_mode, "--pid-dir",
               str(rd / "pids"), "--delay", "0.2", *server_extra]  # fmt: skip
        return cmd + (["--grandchild"] if grandchild else [])

    def bench_cmd(sc: scenarios.Scenario, o: runner.RunOptions, port: int, rd: Path) -> list[str]:
        return [sys.executable, str(FAKE_BENCH), "--port", str(port), "--mode", bench_mode]

    settings = {"health_timeout_s": 15.0, "bench_timeout_s": 20.0, "grace_s": 3.0, "server_gone_grace_s": 5.0}
    settings.update(opts)
    options = runner.RunOptions(scenario=scenarios.get("e4b-summarize"), out_dir=tmp_path / "run", **settings)
    echoed: list[str] = []
    result = runner.run(options, server_cmd=server_cmd, bench_cmd=bench_cmd, check_env=False, echo=echoed.append)
    result.echoed = echoed  # type: ignore[attr-defined]
    return result


def _assert_all_gone(run_dir: Path) -> None:
    pids = _pids(run_dir)
    assert pids, "the stand-in recorded no pids"
    for name, pid in pids.items():
        assert not _alive(pid), f"{name} (pid {pid}) survived the runner"


def test_healthy_run_is_clean_with_metrics_and_reports(tmp_path: Path) -> None:
    res = _run(tmp_path, "healthy")
    assert res.outcome is Outcome.CLEAN, res.classification.reason
    assert res.exit_code == 0
    m = res.classification.metrics
    assert m["completed"] == 80
    assert m["output_throughput"] == pytest.approx(839.39)
    assert m["mean_ttft_ms"] == pytest.approx(5123.40)
    assert m["mean_tpot_ms"] == pytest.approx(62.95)
    assert m["accept_length"] == pytest.approx(2.87)
    run_dir = tmp_path / "run"
    data = orjson.loads((run_dir / "report.json").read_bytes())
    assert data["outcome"] == "CLEAN" and data["exit_code"] == 0
    assert data["plan"]["env"]["SGLANG_TRTLLM_MHA_DEBUG"] == "1"
    assert data["plan"]["env"]["KVTRAP_DUMP_DIR"] == str(run_dir / "dumps")
    assert data["plan"]["server_cmd"][1] == str(FAKE_SERVER)
    assert "versions" in data["environment"] and "sglang" in data["environment"]["versions"]
    md = (run_dir / "report.md").read_text()
    assert "CLEAN" in md and "| mean TTFT (ms) | 5123.40 |" in md and "## Log tails" in md
    assert any(line.startswith("[server]") for line in res.echoed)  # type: ignore[attr-defined]
    _assert_all_gone(run_dir)


def test_never_healthy_is_unhealthy_after_the_timeout(tmp_path: Path) -> None:
    res = _run(tmp_path, "never", health_timeout_s=1.5)
    assert res.outcome is Outcome.UNHEALTHY
    assert res.exit_code == 3
    assert res.facts.health_timed_out and not res.facts.healthy
    assert "/health" in res.classification.reason
    _assert_all_gone(tmp_path / "run")


def test_crash_is_crashed_with_kernel_name(tmp_path: Path) -> None:
    res = _run(tmp_path, "crash", "wait")
    assert res.outcome is Outcome.CRASHED, res.classification.reason
    assert res.exit_code == 1
    assert res.classification.kernel is not None
    assert res.classification.kernel.startswith("fmhaSm100fKernel_")
    assert "SlidingOrChunkedCausal" in res.classification.kernel
    assert "illegal" in res.classification.reason
    assert res.classification.site["python"].endswith("trtllm_mha_backend.py:1012 in forward_decode")
    assert res.classification.metrics["max_swa_token_usage"] == pytest.approx(0.86)
    data = orjson.loads((tmp_path / "run" / "report.json").read_bytes())
    assert data["outcome"] == "CRASHED" and data["kernel"] == res.classification.kernel
    assert "an illegal memory access" in data["log_tails"]["server"]
    _assert_all_gone(tmp_path / "run")


def test_startup_oom_is_unhealthy_not_crashed(tmp_path: Path) -> None:
    res = _run(tmp_path, "crash-startup", grandchild=False)
    assert res.outcome is Outcome.UNHEALTHY
    assert "start-up" in res.classification.reason and "out of memory" in res.classification.reason


def test_dump_is_trapped(tmp_path: Path) -> None:
    res = _run(tmp_path, "trap", "wait")
    assert res.outcome is Outcome.TRAPPED, res.classification.reason
    assert res.exit_code == 1
    assert len(res.dumps) == 1
    assert res.dumps[0]["kind"] == "swa_state_drift"
    assert Path(res.dumps[0]["path"]).parent == tmp_path / "run" / "dumps"
    assert "swa_state_drift" in res.classification.trap_kinds
    md = (tmp_path / "run" / "report.md").read_text()
    assert "kvtrap dump explain" in md
    _assert_all_gone(tmp_path / "run")


def test_server_dying_mid_benchmark_is_crashed(tmp_path: Path) -> None:
    res = _run(tmp_path, "die", "wait", server_extra=("--after", "2.5"))
    assert res.outcome is Outcome.CRASHED
    assert "SIGSEGV" in res.classification.reason
    _assert_all_gone(tmp_path / "run")


def test_benchmark_timeout_is_hung(tmp_path: Path) -> None:
    res = _run(tmp_path, "healthy", "hang", bench_timeout_s=1.0)
    assert res.outcome is Outcome.HUNG
    assert res.exit_code == 3
    assert res.facts.bench_timed_out
    _assert_all_gone(tmp_path / "run")


def test_failed_benchmark_is_unhealthy(tmp_path: Path) -> None:
    res = _run(tmp_path, "healthy", "fail")
    assert res.outcome is Outcome.UNHEALTHY
    assert "benchmark failed" in res.classification.reason


def test_sigterm_ignoring_server_is_killed(tmp_path: Path) -> None:
    res = _run(tmp_path, "stubborn", grace_s=0.5)
    assert res.outcome is Outcome.CLEAN
    assert res.cleanup["server"] == "SIGKILL"
    _assert_all_gone(tmp_path / "run")


def test_sigint_ends_the_whole_process_group(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    driver = subprocess.Popen(
        [sys.executable, str(STANDINS / "run_driver.py"), str(run_dir), "healthy", "hang"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not {"server", "child", "grandchild"} <= set(_pids(run_dir)):
            time.sleep(0.05)
        pids = _pids(run_dir)
        assert {"server", "child", "grandchild"} <= set(pids), f"stand-in did not start: {pids}"
        assert all(_alive(p) for p in pids.values())
        time.sleep(0.5)  # let the benchmark start too
        os.kill(driver.pid, signal.SIGINT)
        out, _ = driver.communicate(timeout=20)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == 130, out.decode(errors="replace")
    assert b"OUTCOME INTERRUPTED" in out
    for name, pid in _pids(run_dir).items():
        assert not _alive(pid), f"{name} (pid {pid}) survived SIGINT"
    data = orjson.loads((run_dir / "report.json").read_bytes())
    assert data["outcome"] == "INTERRUPTED" and data["facts"]["interrupted"]


def test_group_alive_and_kill_group_on_a_plain_group() -> None:
    p = subprocess.Popen(
        [sys.executable, "-c", "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(30)']); time.sleep(30)"],
        start_new_session=True,
    )  # fmt: skip
    try:
        assert runner._sleep_until(lambda: len(runner._group_members(p.pid) or []) >= 2, 10)
        assert runner.group_alive(p.pid)
        how = runner.kill_group(p.pid, p, grace_s=5)
        assert how == "SIGTERM"
        assert not runner.group_alive(p.pid)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def test_wait_healthy_returns_exited_when_the_process_is_gone() -> None:
    port = runner.free_port()
    assert runner.wait_healthy(f"http://127.0.0.1:{port}/health", 5, lambda: False) == "exited"
    t0 = time.monotonic()
    assert runner.wait_healthy(f"http://127.0.0.1:{port}/health", 0.5, lambda: True, interval_s=0.1) == "timeout"
    assert time.monotonic() - t0 < 10


def test_attention_backend_override_is_recorded_in_the_reports(tmp_path: Path) -> None:
    res = _run(tmp_path, "healthy", attention_backend="triton")  # type: ignore[arg-type]
    assert res.outcome is Outcome.CLEAN
    data = orjson.loads((tmp_path / "run" / "report.json").read_bytes())
    assert data["options"]["attention_backend"] == "triton"
    assert "attention backend=triton (replaces the scenario's)" in (tmp_path / "run" / "report.md").read_text()
    assert any("--attention-backend triton: Gemma 4's default off sm100" in w for w in data["warnings"]) or data["warnings"] == []
    plan = runner.build_plan(runner.RunOptions(scenario=scenarios.get("e4b-chat"), out_dir=tmp_path / "p",
                                               attention_backend="triton", port=1))  # fmt: skip
    assert plan.server_cmd[plan.server_cmd.index("--attention-backend") + 1] == "triton"
