"""Server configurations side by side in a real SGLang server: TPOT, ITL and throughput, each vs the unarmed server.

One server build, the chosen configurations started side by side on one GPU (same model dirs, same flags apart
from the configuration's environment), then benchmarked one at a time, configuration order rotated per round, at
each concurrency: only one server has requests at any moment, the others sit idle. Prints ratios to the unarmed
server and writes ``server-<name>-<device>.md/.json``. Needs a CUDA GPU and SGLang's full runtime.

Configurations: ``unarmed`` (the baseline), ``armed`` (kvtrap's traps, free-path checks on: the default),
``armed-free-off`` (``KVTRAP_FREE_CHECKS=off``), ``kv-canary`` (SGLang's own ``--kv-canary raise``), ``kernels``
(unarmed with ``KVTRAP_GEMMA4_KERNELS=1``). With ``--probe N`` every server first answers the same N greedy
random-id prompts one at a time, and each configuration's outputs are compared token by token to the unarmed
server's (:mod:`kvtrap.repro.probe`).

  python benchmarks/server_overhead.py --out benchmarks/results --layers 12 --rounds 4
  python benchmarks/server_overhead.py --name gemma4-kernels-26b --scenario 26b-chat --configs unarmed kernels --probe 8

Each round times every configuration once at every concurrency (about 20-40 s per benchmark with the defaults):
start it with setsid/nohup on a device machine and poll if the run outlasts one call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from kvtrap.repro import probe, runner
from kvtrap.repro.classify import bench_metrics
from kvtrap.repro.models import variant, write_model_dirs
from kvtrap.repro.scenarios import Workload, get

CONFIGS: dict[str, dict[str, Any]] = {
    "unarmed": {"armed": False, "extra": (), "env": {}},
    "armed": {"armed": True, "extra": (), "env": {}},
    "armed-free-off": {"armed": True, "extra": (), "env": {"KVTRAP_FREE_CHECKS": "off"}},
    "kv-canary": {"armed": False, "extra": ("--kv-canary", "raise"), "env": {}},
    "kernels": {"armed": False, "extra": (), "env": {"KVTRAP_GEMMA4_KERNELS": "1"}},
}
METRICS = (
    "median_tpot_ms",
    "mean_tpot_ms",
    "median_itl_ms",
    "output_throughput",
    "median_ttft_ms",
    "accept_length",
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="overhead", help="results go to server-NAME-<device>.md/.json")
    ap.add_argument("--scenario", default="e4b-chat")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--work", type=Path, default=Path("runs/server-overhead"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--input-len", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--mem-fraction", type=float, default=0.8)
    ap.add_argument("--max-total-tokens", type=int, default=160000)
    ap.add_argument("--health-timeout", type=float, default=900)
    ap.add_argument("--configs", nargs="+", default=["unarmed", "armed", "kv-canary"], choices=list(CONFIGS))
    ap.add_argument(
        "--min-prompts", type=int, default=8, help="prompts per benchmark: max(this, 2 x concurrency)"
    )
    ap.add_argument("--probe", type=int, default=0, help="greedy prompts each server answers first (0: none)")
    a = ap.parse_args()
    if "unarmed" not in a.configs:
        ap.error("--configs needs 'unarmed': every ratio is to it")

    scenario = get(a.scenario)
    model = variant(scenario.dummy_variant or "e4b", a.layers)
    work = a.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    dirs = write_model_dirs(work / "models", model)
    max_conc = max(a.concurrency)
    common = ("--load-format", "dummy", "--mem-fraction-static", str(a.mem_fraction),
              "--max-total-tokens", str(a.max_total_tokens), "--max-running-requests", str(max_conc))  # fmt: skip
    servers: dict[str, tuple[runner.Child, runner.Plan]] = {}
    started = time.time()
    try:
        for name in a.configs:
            cfg = CONFIGS[name]
            run_dir = work / name
            run_dir.mkdir(parents=True, exist_ok=True)
            opts = runner.RunOptions(scenario=scenario, out_dir=run_dir, armed=cfg["armed"],
                                     model_path=str(dirs.target), draft_model_path=str(dirs.draft),
                                     extra_server_args=common + tuple(cfg["extra"]), follow=False)  # fmt: skip
            plan = runner.build_plan(opts)
            cmd = [c for c in plan.server_cmd]
            env = {**os.environ, **plan.env_changes, **cfg["env"]}
            child = runner.Child(name, cmd, env, run_dir / "server.log", run_dir)
            child.start()
            servers[name] = (child, plan)
            print(f"[{name}] started on port {plan.port}: {' '.join(cmd)}", flush=True)
        for name, (child, plan) in servers.items():
            state = runner.wait_healthy(plan.health_url, a.health_timeout - (time.time() - started),
                                        lambda c=child: c.poll() is None)  # fmt: skip
            print(f"[{name}] {state} after {time.time() - started:.0f} s", flush=True)
            if state != "healthy":
                print(runner.tail(child.log_path, 40))
                return 3
        probes = run_probes(a, servers) if a.probe else {}
        rows: list[dict[str, Any]] = []
        # Round 0 warms every server at every concurrency (JIT of new shapes, graph pools, allocator, caches) and
        # is not reported: in an earlier run the first server benchmarked at a new concurrency was the slow one.
        for r in range(a.rounds + 1):
            order = a.configs[r % len(a.configs) :] + a.configs[: r % len(a.configs)]
            for conc in a.concurrency:
                for name in order:
                    child, plan = servers[name]
                    prompts = max(a.min_prompts, 2 * conc)
                    wl = Workload(input_len=a.input_len, output_len=a.output_len if r else 32, num_prompts=prompts,
                                  max_concurrency=conc)  # fmt: skip
                    sc = dataclasses.replace(scenario, workload=wl)
                    cmd = runner.default_bench_cmd(
                        sc, runner.RunOptions(scenario=sc), plan.port, plan.run_dir
                    )
                    log = plan.run_dir / f"bench-r{r}-c{conc}.log"
                    b = runner.Child(
                        "bench", cmd, dict(os.environ, NO_PROXY="127.0.0.1,localhost"), log, plan.run_dir
                    )
                    b.start()
                    while b.poll() is None:
                        if child.poll() is not None:
                            b.stop(5)
                            print(f"[{name}] server exited during the benchmark", flush=True)
                            return 1
                        time.sleep(0.2)
                    m = bench_metrics(log.read_text(errors="replace"))
                    if not r:
                        continue
                    row = {"round": r, "config": name, "concurrency": conc, "prompts": prompts,
                           **{k: m.get(k) for k in METRICS}}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        traps = sorted(str(p) for name in a.configs for p in (work / name / "dumps").glob("*") if p.is_dir())
    finally:
        for child, _ in servers.values():
            child.stop(20)
    write_results(a, model, rows, traps, started, probes)
    return 0


def run_probes(a: argparse.Namespace, servers: dict[str, tuple[runner.Child, runner.Plan]]) -> dict[str, Any]:
    """Every server answers the same greedy prompts; each configuration compared to the unarmed server."""
    spec = probe.ProbeSpec(prompts=a.probe)
    outs: dict[str, dict[str, Any]] = {}
    for name, (child, plan) in servers.items():
        data = probe.run_probe(
            f"http://{runner.HOST}:{plan.port}", spec, alive=lambda c=child: c.poll() is None
        )
        probe.write_probe(plan.run_dir, data)
        outs[name] = data
        print(f"[{name}] probe: {len(spec.failed(data))} of {spec.prompts} prompts unanswered", flush=True)
    result: dict[str, Any] = {"spec": spec.to_json()}
    for name, data in outs.items():
        if name != "unarmed":
            cmp = probe.compare(outs["unarmed"], data)
            result[name] = cmp.to_json()
            print(f"[{name}] vs unarmed: {json.dumps(cmp.to_json())}", flush=True)
    return result


def probe_lines(probes: dict[str, Any]) -> list[str]:
    if not probes:
        return []
    spec = probes["spec"]
    out = [f"- greedy probe: {spec['prompts']} random-id prompts of {spec['input_len']} tokens, {spec['output_len']}"
           " new tokens each, one at a time, compared to the unarmed server:"]  # fmt: skip
    for name, c in probes.items():
        if name != "spec":
            out.append(f"  - {name}: {c['exact']}/{c['prompts']} prompts identical, {c['matched_tokens']}/"
                       f"{c['total_tokens']} tokens before the first difference, first divergence (prompt, token)"
                       f" {c['first_divergence']}, unanswered {c['failed']}")  # fmt: skip
    return out


def _gpu() -> str:
    gpus = runner.gpu_inventory() or [{"name": "unknown"}]
    return str(gpus[0]["name"])


def write_results(a: argparse.Namespace, model: Any, rows: list[dict[str, Any]], traps: list[str],
                  started: float, probes: dict[str, Any]) -> None:  # fmt: skip
    from kvtrap.repro.report import versions

    device = _gpu()
    slug = device.lower().replace("nvidia ", "nvidia-").replace(" ", "-")
    summary: list[dict[str, Any]] = []
    for conc in a.concurrency:
        base = [r for r in rows if r["config"] == "unarmed" and r["concurrency"] == conc]
        for name in a.configs:
            mine = [r for r in rows if r["config"] == name and r["concurrency"] == conc]
            s: dict[str, Any] = {"config": name, "concurrency": conc, "rounds": len(mine)}
            # Paired per-round ratios (same round = adjacent in time) show the spread the medians hide.
            paired = [m["median_tpot_ms"] / b["median_tpot_ms"] for m in mine for b in base
                      if m["round"] == b["round"] and m["median_tpot_ms"] and b["median_tpot_ms"]]  # fmt: skip
            s["tpot_ratio_per_round"] = paired
            for k in METRICS:
                vals = [r[k] for r in mine if r[k] is not None]
                s[k] = statistics.median(vals) if vals else None
                bvals = [r[k] for r in base if r[k] is not None]
                if vals and bvals and k != "accept_length":
                    s[f"{k}_vs_unarmed"] = statistics.median(vals) / statistics.median(bvals)
            summary.append(s)
    data = {
        "device": device, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "command": " ".join([sys.executable, *sys.argv]), "versions": versions(), "model": model.to_json(),
        "scenario": a.scenario, "configs": a.configs, "rows": rows, "summary": summary, "dumps": traps,
        "probe_vs_unarmed": probes,
    }  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"server-{a.name}-{slug}.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [f"# kvtrap in a real SGLang server: {', '.join(a.configs)} on {device}", "",
             f"- date {data['date']}; command `{data['command']}`",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items() if v),
             f"- scenario {a.scenario}; model: weight-free {model.name}-like, {model.layers} layers, frozen-KV MTP"
             " (3 steps, 4 draft tokens), trtllm_mha, page 64, CUDA graphs (decode); prefill eager on KV-shared models",
             f"- {a.rounds} rounds per cell after a warm-up round at every concurrency (order rotated), medians;"
             f" {a.input_len} in / {a.output_len} out, prompts = max({a.min_prompts}, 2 x concurrency); servers side"
             " by side on one GPU, one benchmarked at a time",
             f"- kvtrap dumps written by any server: {len(traps)}", *probe_lines(probes), "",
             "| concurrency | config | median TPOT ms | vs unarmed | TPOT ratio per round | median ITL ms | vs unarmed |"
             " output tok/s | vs unarmed | accept len |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def f(v: Any, p: str = ".3f") -> str:
        return "-" if v is None else format(v, p)

    for s in summary:
        per_round = ", ".join(format(x, ".3f") for x in s["tpot_ratio_per_round"]) or "-"
        lines.append(f"| {s['concurrency']} | {s['config']} | {f(s['median_tpot_ms'])} | "
                     f"{f(s.get('median_tpot_ms_vs_unarmed'), '.4f')} | {per_round} | {f(s['median_itl_ms'])} | "
                     f"{f(s.get('median_itl_ms_vs_unarmed'), '.4f')} | {f(s['output_throughput'], '.1f')} | "
                     f"{f(s.get('output_throughput_vs_unarmed'), '.4f')} | {f(s['accept_length'], '.2f')} |")  # fmt: skip
    (a.out / f"server-{a.name}-{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
