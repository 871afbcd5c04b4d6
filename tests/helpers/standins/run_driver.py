"""Runs :func:`kvtrap.repro.runner.run` with the stand-ins, as its own process (for the SIGINT test).

Usage: run_driver.py RUN_DIR SERVER_MODE BENCH_MODE. Exits with the run's exit code.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kvtrap.repro import runner, scenarios

HERE = Path(__file__).resolve().parent


def main() -> None:
    run_dir, server_mode, bench_mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

    def server_cmd(sc: scenarios.Scenario, opts: runner.RunOptions, port: int, rd: Path) -> list[str]:
        return [sys.executable, str(HERE / "fake_server.py"), "--port", str(port), "--mode", server_mode,
                "--pid-dir", str(rd / "pids"), "--grandchild", "--delay", "0.2"]  # fmt: skip

    def bench_cmd(sc: scenarios.Scenario, opts: runner.RunOptions, port: int, rd: Path) -> list[str]:
        return [sys.executable, str(HERE / "fake_bench.py"), "--port", str(port), "--mode", bench_mode]

    opts = runner.RunOptions(
        scenario=scenarios.get("e4b-summarize"), out_dir=run_dir, health_timeout_s=20, bench_timeout_s=60, grace_s=3
    )
    result = runner.run(opts, server_cmd=server_cmd, bench_cmd=bench_cmd, check_env=False)
    print(f"OUTCOME {result.outcome.value}", flush=True)
    sys.exit(result.exit_code)


if __name__ == "__main__":
    main()
