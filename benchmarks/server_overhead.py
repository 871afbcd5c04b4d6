"""Server configurations side by side in a real SGLang server: TPOT, ITL and throughput, each vs the unarmed server.

One server build, the chosen configurations started side by side on one GPU (same model dirs, same flags apart
from the configuration's environment), then benchmarked one at a time, configuration order rotated per round, at
each concurrency: only one server has requests at any moment, the others sit idle. Prints ratios to the unarmed
server and writes ``server-<name>-<device>.md/.json``. Needs a CUDA GPU and SGLang's full runtime.

Configurations: ``unarmed`` (the baseline), ``armed`` (kvtrap's traps, free-path checks on: the default),
``armed-free-off`` (``KVTRAP_FREE_CHECKS=off``), ``armed-guard-off`` (``KVTRAP_GUARD=off``), ``armed-checks-off``
(both off: what is left is the host hooks and the alloc checks), ``kv-canary`` (SGLang's own ``--kv-canary raise``), ``kernels``
(unarmed with ``KVTRAP_GEMMA4_KERNELS=1``). With ``--probe N`` every server first answers the same N greedy
random-id prompts one at a time, and each configuration's outputs are compared token by token to the unarmed
server's (:mod:`kvtrap.repro.probe`).

  python benchmarks/server_overhead.py --out benchmarks/results --layers 12 --rounds 4
  python benchmarks/server_overhead.py --name gemma4-kernels-26b --scenario 26b-chat --configs unarmed kernels --probe 8

Each round times every configuration once at every concurrency (about 20-40 s per benchmark with the defaults):
start it with setsid/nohup on a device machine and poll if the run outlasts one call. Every row is printed as one
JSON line as it is measured, and written to the JSON before any summary is computed. A ratio whose unarmed
baseline is 0 or missing (bench_serving reports TTFT/ITL 0 when no streamed chunk carries text) reads n/a, with a
footnote saying why.

When a run's results were not written (it stopped, or its machine went away), rebuild them from its stdout:

  python benchmarks/server_overhead.py --from-log run.log --name NAME [the run's own options] \
      --device "NVIDIA H200" --date 2026-11-29 --versions-from OTHER-RESULTS.json --command "THE RUN'S COMMAND"

It parses the JSON rows and the ``started on port``, ``healthy after`` and ``vs unarmed`` lines, checks them
against the options given, and writes the same md/json, saying in the header which log it was rebuilt from and
whether the log holds fewer rounds than ``--rounds`` (``partial: 1 of 3 rounds``). Bad input: one line, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from kvtrap.repro import probe, runner
from kvtrap.repro.classify import bench_metrics
from kvtrap.repro.models import variant, write_model_dirs
from kvtrap.repro.scenarios import SPEC_ARGS, Workload, get

CONFIGS: dict[str, dict[str, Any]] = {
    "unarmed": {"armed": False, "extra": (), "env": {}},
    "armed": {"armed": True, "extra": (), "env": {}},
    "armed-free-off": {"armed": True, "extra": (), "env": {"KVTRAP_FREE_CHECKS": "off"}},
    "armed-guard-off": {"armed": True, "extra": (), "env": {"KVTRAP_GUARD": "off"}},
    "armed-checks-off": {"armed": True, "extra": (), "env": {"KVTRAP_GUARD": "off", "KVTRAP_FREE_CHECKS": "off"}},
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


def build_parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--no-spec", action="store_true",
                    help="serve without the MTP draft (SGLang's --kv-canary does not start with frozen-KV MTP)")  # fmt: skip
    rb = ap.add_argument_group(
        "rebuilding the results from a run's log (the run's own settings are given as above, as the run had them)"
    )
    rb.add_argument("--from-log", type=Path, default=None, metavar="LOG",
                    help="run nothing: parse LOG (this script's stdout) and write the md/json the run would have")  # fmt: skip
    rb.add_argument("--device", default=None, help="with --from-log: the GPU the run used (the log does not say)")
    rb.add_argument("--date", default=None, help="with --from-log: when the run started (the log does not say)")
    rb.add_argument("--versions-from", type=Path, default=None, metavar="JSON",
                    help="with --from-log: take the versions from this results JSON of the same environment")  # fmt: skip
    rb.add_argument("--command", default=None, help="with --from-log: the run's own command line, recorded verbatim")
    rb.add_argument("--note", action="append", default=[],
                    help="a line added to the results header as given (repeatable), e.g. what was measured")  # fmt: skip
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if "unarmed" not in a.configs:
        ap.error("--configs needs 'unarmed': every ratio is to it")
    if a.from_log is not None:
        try:
            return rebuild_from_log(a)
        except LogError as exc:
            print(f"server_overhead.py --from-log: {exc}", file=sys.stderr)
            return 2
    for opt in ("device", "date", "versions_from", "command"):
        if getattr(a, opt) is not None:
            ap.error(f"--{opt.replace('_', '-')} is only for --from-log (a run reads it from this machine)")

    scenario = _scenario(a)
    model = variant(scenario.dummy_variant or "e4b", a.layers)
    work = a.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    dirs = write_model_dirs(work / "models", model)
    max_conc = max(a.concurrency)
    common = ("--load-format", "dummy", "--mem-fraction-static", str(a.mem_fraction),
              "--max-total-tokens", str(a.max_total_tokens), "--max-running-requests", str(max_conc))  # fmt: skip
    servers: dict[str, tuple[runner.Child, runner.Plan]] = {}
    started = time.time()
    rows: list[dict[str, Any]] = []
    health: dict[str, str] = {}
    try:
        for name in a.configs:
            cfg = CONFIGS[name]
            run_dir = work / name
            run_dir.mkdir(parents=True, exist_ok=True)
            opts = runner.RunOptions(scenario=scenario, out_dir=run_dir, armed=cfg["armed"],
                                     model_path=str(dirs.target),
                                     draft_model_path=None if a.no_spec else str(dirs.draft),
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
            health[name] = f"{state} after {time.time() - started:.0f} s"
            print(f"[{name}] {health[name]}", flush=True)
            if state != "healthy":
                print(runner.tail(child.log_path, 40))
                return 3
        probes = run_probes(a, servers) if a.probe else {}
        stopped = bench_rounds(a, scenario, servers, rows)
        traps = sorted(str(p) for name in a.configs for p in (work / name / "dumps").glob("*") if p.is_dir())
    finally:
        for child, _ in servers.values():
            child.stop(20)
    from kvtrap.repro.report import versions

    write_results(a, model, rows, traps, probes, device=_gpu(), notes=[stopped] if stopped else [],
                  date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                  command=" ".join([sys.executable, *sys.argv]), versions=versions(),
                  servers={name: list(plan.server_cmd) for name, (_, plan) in servers.items()}, health=health)  # fmt: skip
    return 1 if stopped else 0


def bench_rounds(a: argparse.Namespace, scenario: Any, servers: dict[str, tuple[runner.Child, runner.Plan]],
                 rows: list[dict[str, Any]]) -> str | None:  # fmt: skip
    """Benchmark every server, round by round, appending (and printing) one row per timed benchmark to ``rows``.

    Returns why it stopped early (a server exited), else None."""
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
                cmd = runner.default_bench_cmd(sc, runner.RunOptions(scenario=sc), plan.port, plan.run_dir)
                log = plan.run_dir / f"bench-r{r}-c{conc}.log"
                b = runner.Child("bench", cmd, dict(os.environ, NO_PROXY="127.0.0.1,localhost"), log, plan.run_dir)
                b.start()
                while b.poll() is None:
                    if child.poll() is not None:
                        b.stop(5)
                        why = f"[{name}] server exited during the benchmark (round {r}, concurrency {conc})"
                        print(why, flush=True)
                        return why
                    time.sleep(0.2)
                m = bench_metrics(log.read_text(errors="replace"))
                if not r:
                    continue
                row = {"round": r, "config": name, "concurrency": conc, "prompts": prompts,
                       **{k: m.get(k) for k in METRICS}}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    return None


def _scenario(a: argparse.Namespace) -> Any:
    scenario = get(a.scenario)
    if a.no_spec:
        scenario = dataclasses.replace(
            scenario, draft_model=None, server_args=_without(scenario.server_args, SPEC_ARGS)
        )
    return scenario


def _without(args: tuple[str, ...], drop: tuple[str, ...]) -> tuple[str, ...]:
    """``args`` without the flag/value pairs of ``drop``."""
    flags = set(drop[::2])
    out: list[str] = []
    it = iter(args)
    for flag in it:
        if flag in flags:
            next(it, None)
        else:
            out.append(flag)
    return tuple(out)


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
            line = (f"  - {name}: {c['exact']}/{c['prompts']} prompts identical, {c['matched_tokens']}/"
                    f"{c['total_tokens']} tokens before the first difference, first divergence (prompt, token)"
                    f" {c['first_divergence']}, unanswered {c['failed']}")  # fmt: skip
            if c.get("differing"):  # logs written before the probe kept top-2 log-probs have no such fields
                known = [m for m in c.get("swap_margins", []) if m is not None]
                line += (f"; near ties {c['near_ties']}/{c['differing']} differing prompts (their first difference "
                         f"swaps the two runs' top two candidates closer than {c['near_tie_nats']:g} nats"
                         + (f"; swap margins {min(known):.3g}-{max(known):.3g}" if known else "")
                         + f"; {c.get('judged', 0)} judged)")  # fmt: skip
            out.append(line)
    return out


def _gpu() -> str:
    gpus = runner.gpu_inventory() or [{"name": "unknown"}]
    return str(gpus[0]["name"])


#: What each configuration is, for the results header.
CONFIG_WHAT = {
    "unarmed": "kvtrap disarmed (the baseline)",
    "armed": "kvtrap's traps armed, free-path checks on",
    "armed-free-off": "armed with KVTRAP_FREE_CHECKS=off",
    "armed-guard-off": "armed with KVTRAP_GUARD=off (no device guard in the CUDA graphs)",
    "armed-checks-off": "armed with KVTRAP_GUARD=off and KVTRAP_FREE_CHECKS=off (what is left: host hooks, alloc checks)",
    "kv-canary": "unarmed + SGLang's --kv-canary raise",
    "kernels": "unarmed + KVTRAP_GEMMA4_KERNELS=1",
}
_LABELS = {"median_tpot_ms": "median TPOT", "median_itl_ms": "median ITL", "output_throughput": "output throughput"}


def ratio(mine: float | None, base: float | None) -> float | None:
    """``mine / base``; None when either is missing or the baseline is 0 (no ratio to report, never a crash)."""
    if mine is None or base is None or base == 0:
        return None
    return mine / base


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(rows: list[dict[str, Any]], configs: list[str], concurrency: list[int]) -> list[dict[str, Any]]:
    """Per (concurrency, config): medians over rounds, each (but accept length) as a ratio to the unarmed median;
    a ratio is None where the unarmed median is 0 or missing."""
    summary: list[dict[str, Any]] = []
    for conc in concurrency:
        base = [r for r in rows if r["config"] == "unarmed" and r["concurrency"] == conc]
        for name in configs:
            mine = [r for r in rows if r["config"] == name and r["concurrency"] == conc]
            s: dict[str, Any] = {"config": name, "concurrency": conc, "rounds": len(mine)}
            # Paired per-round ratios (same round = adjacent in time) show the spread the medians hide.
            s["tpot_ratio_per_round"] = [
                x for m in mine for b in base if m["round"] == b["round"]
                if (x := ratio(m.get("median_tpot_ms"), b.get("median_tpot_ms"))) is not None
            ]  # fmt: skip
            for k in METRICS:
                s[k] = _median(mine, k)
                if k != "accept_length":
                    s[f"{k}_vs_unarmed"] = ratio(s[k], _median(base, k))
            summary.append(s)
    return summary


def footnotes(rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> list[str]:
    """Why a cell reads n/a, and what a 0 TTFT/ITL from bench_serving means."""
    out: list[str] = []
    for k in ("median_tpot_ms", "median_itl_ms", "output_throughput"):  # the table's ratio columns
        concs = sorted({s["concurrency"] for s in summary if s["config"] == "unarmed" and s.get(f"{k}_vs_unarmed") is None})
        if concs:
            out.append(f"- n/a ({_LABELS[k]}): the unarmed server's {_LABELS[k]} is 0 or missing at concurrency "
                       f"{', '.join(map(str, concs))}, so no ratio to it is reported.")  # fmt: skip
    if any(r.get("median_ttft_ms") == 0 for r in rows):
        # sglang/benchmark/serving.py (0.5.23), async_request_sglang_generate: TTFT and ITL are stamped only on a
        # streamed chunk whose "text" is non-empty; TPOT is (latency - ttft) / (output_len - 1) per request.
        out.append("- TTFT and ITL read 0: sglang.bench_serving stamps them only when a streamed chunk carries text "
                   "(benchmark/serving.py, async_request_sglang_generate), so a 0 median means at least half of the "
                   "requests streamed no text at all; such a request's TPOT is (latency - 0) / (output_len - 1), its "
                   "whole time (prefill and queueing included) per output token.")  # fmt: skip
    return out


def _flag(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd and cmd.index(flag) + 1 < len(cmd) else None


def _without_port(cmd: list[str]) -> list[str]:
    return list(_without(tuple(cmd), ("--port", "")))


def server_lines(servers: dict[str, list[str]]) -> list[str]:
    """The unarmed server's command, and what each other configuration's adds to it."""
    if "unarmed" not in servers:
        return []
    base = _without_port(servers["unarmed"])
    out = [f"- server command (unarmed; port left out): `{' '.join(base)}`"]
    for name, cmd in servers.items():
        if name == "unarmed":
            continue
        mine = _without_port(cmd)
        if mine == base:
            out.append(f"  - {name}: the same flags")
        elif mine[: len(base)] == base:
            out.append(f"  - {name}: adds `{' '.join(mine[len(base):])}`")
        else:
            out.append(f"  - {name}: `{' '.join(mine)}`")
    return out


def write_results(a: argparse.Namespace, model: Any, rows: list[dict[str, Any]], traps: list[str] | None,
                  probes: dict[str, Any], *, device: str, date: str, command: str, versions: dict[str, Any],
                  servers: dict[str, list[str]] | None = None, health: dict[str, str] | None = None,
                  rebuilt: dict[str, Any] | None = None, notes: list[str] | tuple[str, ...] = ()) -> tuple[Path, Path]:  # fmt: skip
    """``server-<name>-<device>.json`` and ``.md``. The rows reach the JSON before anything is computed from them,
    so a later failure loses nothing that was measured. ``traps`` None: not known (a run rebuilt from its log)."""
    slug = device.lower().replace("nvidia ", "nvidia-").replace(" ", "-")
    a.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = a.out / f"server-{a.name}-{slug}.json", a.out / f"server-{a.name}-{slug}.md"
    done = max((r["round"] for r in rows), default=0)
    data: dict[str, Any] = {
        "device": device, "date": date, "command": command, "versions": versions, "model": model.to_json(),
        "scenario": a.scenario, "configs": a.configs, "rows": rows, "summary": None, "dumps": traps,
        "probe_vs_unarmed": probes, "server_commands": servers or {}, "health": health or {},
        "partial": None if done >= a.rounds else {"rounds_done": done, "rounds_planned": a.rounds},
        "rebuilt_from": rebuilt, "notes": [*notes, *a.note],
    }  # fmt: skip
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    summary = summarize(rows, a.configs, a.concurrency)
    data["summary"], data["footnotes"] = summary, footnotes(rows, summary)
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    md = render_md(a, data)
    md_path.write_text(md)
    print(md, end="")
    return json_path, md_path


def render_md(a: argparse.Namespace, data: dict[str, Any]) -> str:
    model, partial, rebuilt = data["model"], data["partial"], data["rebuilt_from"]
    servers: dict[str, list[str]] = data["server_commands"]
    ref = servers.get("unarmed") or list(_scenario(a).server_args)
    backend, page = _flag(ref, "--attention-backend"), _flag(ref, "--page-size")
    prefill_eager = _flag(ref, "--cuda-graph-backend-prefill") == "disabled"
    lines = [f"# kvtrap in a real SGLang server: {', '.join(a.configs)} on {data['device']}", ""]
    if rebuilt:
        lines.append(f"- rebuilt from the run's log `{rebuilt['log']}` (`server_overhead.py --from-log`): "
                     f"{rebuilt['log_end']}; rows, server flags, health and probe results are the log's, device, "
                     f"date, command and versions were given when rebuilding")  # fmt: skip
    if partial:
        lines.append(f"- partial: {partial['rounds_done']} of {partial['rounds_planned']} rounds")
    vsrc = f" (from `{rebuilt['versions_from']}`)" if rebuilt and rebuilt.get("versions_from") else ""
    lines += [f"- date {data['date']}; command `{data['command']}`",
              "- versions: " + (", ".join(f"{k} {v}" for k, v in data["versions"].items() if v) or "not known") + vsrc,
              f"- scenario {a.scenario}; model: weight-free {model['name']}-like, {model['layers']} layers, "
              + ("no speculative decoding" if a.no_spec else "frozen-KV MTP (3 steps, 4 draft tokens)")
              + f", {backend}, page {page}, CUDA graphs (decode)" + ("; prefill eager" if prefill_eager else ""),
              "- configs: " + "; ".join(f"{n}: {CONFIG_WHAT[n]}" for n in a.configs),
              *server_lines(servers)]  # fmt: skip
    if data["health"]:
        lines.append("- servers: " + ", ".join(f"{n} {h}" for n, h in data["health"].items()))
    rounds = f"{a.rounds} rounds" if not partial else f"{partial['rounds_done']} round(s) (of {a.rounds} planned)"
    traps = data["dumps"]
    lines += [f"- {rounds} per cell after a warm-up round at every concurrency (order rotated), medians;"
              f" {a.input_len} in / {a.output_len} out, prompts = max({a.min_prompts}, 2 x concurrency); servers side"
              " by side on one GPU, one benchmarked at a time",
              "- kvtrap dumps written by any server: " + ("not in the log" if traps is None else str(len(traps))),
              *probe_lines(data["probe_vs_unarmed"]), *(f"- {n}" for n in data["notes"]), "",
              "| concurrency | config | median TPOT ms | vs unarmed | TPOT ratio per round | median ITL ms | vs unarmed |"
              " output tok/s | vs unarmed | accept len |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def f(v: Any, p: str = ".3f") -> str:
        return "-" if v is None else format(v, p)

    def r(s: dict[str, Any], k: str) -> str:
        v = s.get(f"{k}_vs_unarmed")
        return ("n/a" if s.get(k) is not None else "-") if v is None else format(v, ".4f")

    for s in data["summary"]:
        per_round = ", ".join(format(x, ".3f") for x in s["tpot_ratio_per_round"]) or "-"
        lines.append(f"| {s['concurrency']} | {s['config']} | {f(s['median_tpot_ms'])} | {r(s, 'median_tpot_ms')} | "
                     f"{per_round} | {f(s['median_itl_ms'])} | {r(s, 'median_itl_ms')} | "
                     f"{f(s['output_throughput'], '.1f')} | {r(s, 'output_throughput')} | {f(s['accept_length'], '.2f')} |")  # fmt: skip
    if data["footnotes"]:
        lines += ["", *data["footnotes"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ --from-log
class LogError(Exception):
    """The log, or what --from-log was told about the run, cannot give the results: one line for the user."""


_STARTED = re.compile(r"^\[(?P<name>[\w-]+)\] started on port \d+: (?P<cmd>.+)$")
_HEALTH = re.compile(r"^\[(?P<name>[\w-]+)\] (?P<what>\w+ after \d+ s)$")
_COMPARE = re.compile(r"^\[(?P<name>[\w-]+)\] vs unarmed: (?P<json>\{.*\})$")
_STOPPED = re.compile(r"^\[[\w-]+\] server exited during the benchmark.*$")
_EXC = re.compile(r"^(?P<exc>[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)\b.*)$")
_FRAME = re.compile(r'^\s*File ".*", line \d+, in (?P<fn>\S+)$')


def parse_log(path: Path) -> dict[str, Any]:
    """What a run's stdout holds: the JSON rows, the servers' commands, health, probe comparisons, how it ended."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise LogError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = text.splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    out: dict[str, Any] = {"rows": [], "servers": {}, "health": {}, "compare": {}, "stopped": None,
                           "exception": None, "truncated": None}  # fmt: skip
    frame = None
    for i, line in enumerate(lines):
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if i == last:  # the machine went away mid-line
                    out["truncated"] = i + 1
                    continue
                raise LogError(f"{path}:{i + 1}: not a JSON row: {line[:80]}") from None
            if not isinstance(row, dict) or not {"round", "config", "concurrency"} <= row.keys():
                raise LogError(f"{path}:{i + 1}: a JSON line without round/config/concurrency: {line[:80]}")
            out["rows"].append({"round": row["round"], "config": row["config"], "concurrency": row["concurrency"],
                                "prompts": row.get("prompts"), **{k: row.get(k) for k in METRICS}})  # fmt: skip
        elif m := _STARTED.match(line):
            out["servers"][m["name"]] = m["cmd"].split()
        elif m := _HEALTH.match(line):
            out["health"][m["name"]] = m["what"]
        elif m := _COMPARE.match(line):
            try:
                out["compare"][m["name"]] = json.loads(m["json"])
            except json.JSONDecodeError:
                raise LogError(f"{path}:{i + 1}: unreadable probe comparison: {line[:80]}") from None
        elif _STOPPED.match(line):
            out["stopped"] = line
        elif m := _FRAME.match(line):
            frame = m["fn"]
        elif (m := _EXC.match(line)) and frame is not None:
            out["exception"] = (m["exc"], frame)
    if not out["rows"]:
        raise LogError(f"{path}: no benchmark rows (JSON lines with round, config, concurrency)")
    return out


def rebuild_from_log(a: argparse.Namespace) -> int:
    """``--from-log``: the md/json :func:`write_results` writes, from the stdout of a run that did not write them."""
    for opt in ("device", "date"):
        if not getattr(a, opt):
            raise LogError(f"--from-log needs --{opt}: the log does not say it")
    log = parse_log(a.from_log)
    rows = log["rows"]
    for name in {r["config"] for r in rows} | set(log["servers"]) | set(log["compare"]):
        if name not in a.configs:
            raise LogError(f"the log has configuration {name!r}, not in --configs {' '.join(a.configs)}")
    if log["servers"] and set(log["servers"]) != set(a.configs):
        raise LogError(f"the log started {' '.join(log['servers'])}, --configs says {' '.join(a.configs)}")
    bad = sorted({r["concurrency"] for r in rows} - set(a.concurrency))
    if bad:
        raise LogError(f"the log has concurrency {bad}, not in --concurrency {a.concurrency}")
    if max(r["round"] for r in rows) > a.rounds:
        raise LogError(f"the log has round {max(r['round'] for r in rows)}, more than --rounds {a.rounds}")
    for name, cmd in log["servers"].items():
        if ("--speculative-draft-model-path" in cmd) == a.no_spec:
            raise LogError(f"server {name!r} in the log runs {'with' if a.no_spec else 'without'} a draft model, "
                           f"but --no-spec is {'given' if a.no_spec else 'not given'}")  # fmt: skip
    try:
        scenario = _scenario(a)
        model = variant(scenario.dummy_variant or "e4b", a.layers)
    except (KeyError, ValueError) as exc:
        raise LogError(str(exc).strip("'\"")) from None
    versions: dict[str, Any] = {}
    if a.versions_from is not None:
        try:
            versions = json.loads(a.versions_from.read_text())["versions"]
        except OSError as exc:
            raise LogError(f"cannot read {a.versions_from}: {exc.strerror or exc}") from None
        except (ValueError, KeyError, TypeError):
            raise LogError(f"{a.versions_from}: not a results JSON with a 'versions' object") from None
        if not isinstance(versions, dict):
            raise LogError(f"{a.versions_from}: 'versions' is not an object")
    probes: dict[str, Any] = {}
    if log["compare"]:
        n = {c.get("prompts") for c in log["compare"].values()}
        if len(n) != 1 or (a.probe and a.probe not in n):
            raise LogError(f"the log's probe comparisons cover {sorted(map(str, n))} prompts, --probe says {a.probe}")
        # run_probes' spec: ProbeSpec(prompts=--probe) with its defaults, which the log does not restate
        probes = {"spec": probe.ProbeSpec(prompts=n.pop()).to_json(), **log["compare"]}
    done = max(r["round"] for r in rows)
    if log["exception"]:
        exc, fn = log["exception"]
        end = f"the run stopped with `{exc}` in {fn} after printing its last row"
    elif log["stopped"]:
        end = f"the run stopped: {log['stopped']}"
    else:
        end = f"the log ends after round {done}'s rows, with no error"
    if log["truncated"]:
        end += f" (its last line, {log['truncated']}, is a cut-off row and is left out)"
    rebuilt = {"log": str(a.from_log), "log_end": end, "versions_from": str(a.versions_from or "") or None,
               "rebuild_command": shlex.join(["python", "benchmarks/server_overhead.py", *a.argv])}  # fmt: skip
    json_path, md_path = write_results(a, model, rows, None, probes, device=a.device, date=a.date,
                                       command=a.command or "not in the log", versions=versions,
                                       servers=log["servers"], health=log["health"], rebuilt=rebuilt)  # fmt: skip
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)
    return 0

if __name__ == "__main__":
    sys.exit(main())
