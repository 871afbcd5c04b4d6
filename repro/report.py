"""``report.json`` (orjson) and ``report.md`` for one repro run, written into its run directory."""

from __future__ import annotations

import platform
import socket
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from kvtrap.repro.runner import RunResult

REPORT_SCHEMA = "kvtrap.repro.report"
REPORT_VERSION = 1

_DISTS = ("kvtrap", "sglang", "sglang-kernel", "torch", "triton", "flashinfer-python", "transformers")

# Metrics shown in report.md, in this order (all of them go to report.json).
_HEADLINE = (
    ("completed", "successful requests", "{:.0f}"),
    ("output_throughput", "output throughput (tok/s)", "{:.2f}"),
    ("total_throughput", "total throughput (tok/s)", "{:.2f}"),
    ("mean_ttft_ms", "mean TTFT (ms)", "{:.2f}"),
    ("p99_ttft_ms", "P99 TTFT (ms)", "{:.2f}"),
    ("mean_tpot_ms", "mean TPOT (ms)", "{:.2f}"),
    ("p99_tpot_ms", "P99 TPOT (ms)", "{:.2f}"),
    ("accept_length", "accept length", "{:.2f}"),
    ("max_swa_token_usage", "peak SWA pool usage (server log)", "{:.2f}"),
    ("max_full_token_usage", "peak full pool usage (server log)", "{:.2f}"),
    ("last_decode_accept_len", "last accept len (server log)", "{:.2f}"),
)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in _DISTS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def environment() -> dict[str, Any]:
    from kvtrap.repro.runner import gpu_inventory

    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "gpus": gpu_inventory(),
        "versions": versions(),
    }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def report_data(result: RunResult) -> dict[str, Any]:
    c = result.classification
    facts = result.facts
    return {
        "schema": REPORT_SCHEMA,
        "schema_version": REPORT_VERSION,
        "scenario": result.plan.scenario.to_json(),
        "outcome": c.outcome.value,
        "exit_code": c.exit_code,
        "reason": c.reason,
        "kernel": c.kernel,
        "site": c.site,
        "trap_kinds": list(c.trap_kinds),
        "metrics": c.metrics,
        "dumps": result.dumps,
        "plan": result.plan.to_json(),
        "options": {
            "eager": result.options.eager,
            "armed": result.options.armed,
            "mode": result.options.mode,
            "inject": list(result.options.inject),
            "fix": result.options.fix,
            "model_path": result.options.model_path,
            "draft_model_path": result.options.draft_model_path,
            "extra_server_args": list(result.options.extra_server_args),
            "attention_backend": result.options.attention_backend,
            "health_timeout_s": result.options.health_timeout_s,
            "bench_timeout_s": result.options.bench_timeout_s,
            "grace_s": result.options.grace_s,
        },
        "facts": {
            "healthy": facts.healthy,
            "health_timed_out": facts.health_timed_out,
            "server_exit_code": facts.server_exit_code,
            "server_exited_early": facts.server_exited_early,
            "bench_exit_code": facts.bench_exit_code,
            "bench_timed_out": facts.bench_timed_out,
            "interrupted": facts.interrupted,
            "expected_requests": facts.expected_requests,
            "error": facts.error,
        },
        "matches": [m.to_json() for m in c.matches[:50]],
        "environment": environment(),
        "started": _iso(result.started),
        "ended": _iso(result.ended),
        "duration_s": round(result.ended - result.started, 3),
        "timings": result.timings,
        "cleanup": result.cleanup,
        "warnings": result.warnings,
        "logs": result.logs,
        "log_tails": result.log_tails,
        "component_details": result.component_details,
        "models": None if result.plan.models is None else result.plan.models.to_json(),
        "probe": _probe_summary(result.probe),
    }


def _probe_summary(probe: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the report keeps of outputs.json: the spec, how many prompts answered, a digest to compare by eye."""
    if probe is None:
        return None
    import hashlib

    outs = probe["outputs"]
    answered = [o["output_ids"] for o in outs if o.get("output_ids") is not None]
    digest = hashlib.sha256(repr([o.get("output_ids") for o in outs]).encode()).hexdigest()[:16]
    errors = sorted({o["error"] for o in outs if o.get("error")})
    return {"spec": probe["spec"], "answered": len(answered), "prompts": len(outs), "sha256_16": digest,
            "errors": errors[:5], "file": "outputs.json"}  # fmt: skip


def _fence(text: str, lang: str = "") -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def render_markdown(data: dict[str, Any]) -> str:
    sc = data["scenario"]
    out: list[str] = [f"# kvtrap repro: {sc['name']} -> **{data['outcome']}**", ""]
    out.append(f"- reason: {data['reason']}")
    if data.get("kernel"):
        out.append(f"- kernel: `{data['kernel']}`")
    for k, v in (data.get("site") or {}).items():
        out.append(f"- {k}: `{v}`")
    if data.get("trap_kinds"):
        out.append(f"- kvtrap violation kinds: {', '.join(data['trap_kinds'])}")
    out.append(f"- exit code: {data['exit_code']}")
    out.append(f"- started {data['started']}, ended {data['ended']} ({data['duration_s']} s)")
    out.append(f"- scenario: {sc['description']}")
    if sc.get("model") and not data.get("models"):
        draft = f" + draft `{sc['draft_model']}`" if sc.get("draft_model") else " (no draft)"
        out.append(f"- models: `{sc['model']}`{draft}")
    opts = data["options"]
    out.append(
        f"- options: armed={opts.get('armed', True)}, mode={opts.get('mode') or 'raise'}, eager={opts['eager']}, "
        f"inject={','.join(opts['inject']) or '-'}, "
        f"fix={'-' if opts['fix'] is None else ('on' if opts['fix'] else 'off')}"
        + (f", attention backend={opts['attention_backend']} (replaces the scenario's)"
           if opts.get("attention_backend") else "")  # fmt: skip
    )
    models = data.get("models")
    if models:
        m = models["model"]
        draft = f", draft `{models['draft']}`" if models.get("draft") else ", no draft"
        out.append(f"- weight-free models ({m['name']}-like, shapes of `{m['like']}`): `{models['target']}`{draft}")
        for why in m.get("deviations") or []:
            out.append(f"  - {why}")
    probe = data.get("probe")
    if probe:
        sp = probe["spec"]
        out.append(f"- output probe: {probe['answered']}/{probe['prompts']} prompts answered ({sp['input_len']} in / "
                   f"{sp['output_len']} out, greedy, one at a time, seed {sp['seed']}); ids digest "
                   f"`{probe['sha256_16']}` (compare runs: `kvtrap repro compare RUN_A RUN_B`)")  # fmt: skip
        for e in probe.get("errors") or []:
            out.append(f"  - probe error: {e}")
    for w in data.get("warnings") or []:
        out.append(f"- warning: {w}")
    out.append("")

    if data["metrics"]:
        out += ["## Metrics", "", "| metric | value |", "|---|---|"]
        shown = set()
        for key, label, fmt in _HEADLINE:
            if key in data["metrics"]:
                out.append(f"| {label} | {fmt.format(data['metrics'][key])} |")
                shown.add(key)
        for key in sorted(set(data["metrics"]) - shown):
            out.append(f"| {key} | {data['metrics'][key]:.2f} |")
        out.append("")

    out += ["## Dumps", ""]
    if data["dumps"]:
        out += ["| dump | kind | where | layer | summary |", "|---|---|---|---|---|"]
        for d in data["dumps"]:
            if "error" in d:
                out.append(f"| `{d['path']}` | unreadable | | | {d['error']} |")
            else:
                layer = "" if d.get("layer_id") is None else f"{d['layer_id']} ({d.get('layer_type')})"
                out.append(f"| `{d['path']}` | {d['kind']} | {d.get('where') or ''} | {layer} | {d.get('summary') or ''} |")
        out += ["", f"Explain one: `kvtrap dump explain {data['dumps'][0]['path']}`", ""]
    else:
        out += [f"none under `{data['plan']['dump_dir']}`", ""]

    out += ["## Commands", "", _fence(data["plan"]["shell"], "bash"), ""]

    env = data["environment"]
    out += ["## Environment", ""]
    out.append(f"- host `{env['host']}`, {env['platform']}, Python {env['python']}")
    gpus = env.get("gpus")
    if gpus:
        out.append("- GPUs: " + ", ".join(f"{g['name']} ({g.get('memory_gib')} GiB)" for g in gpus))
    else:
        out.append("- GPUs: none visible" if gpus == [] else "- GPUs: unknown (no nvidia-smi)")
    out.append("- versions: " + ", ".join(f"{k} {v or '(not installed)'}" for k, v in env["versions"].items()))
    out.append("")

    facts = data["facts"]
    out += ["## What the runner saw", ""]
    out.append(
        f"- healthy: {facts['healthy']}, health timeout: {facts['health_timed_out']}, "
        f"server exited on its own: {facts['server_exited_early']} (code {facts['server_exit_code']}), "
        f"benchmark exit: {facts['bench_exit_code']}, benchmark timeout: {facts['bench_timed_out']}, "
        f"interrupted: {facts['interrupted']}"
    )
    if data["timings"]:
        out.append("- timings: " + ", ".join(f"{k} {v}" for k, v in data["timings"].items()))
    if data["cleanup"]:
        out.append("- cleanup: " + ", ".join(f"{k}: {v or 'not started'}" for k, v in data["cleanup"].items()))
    if facts.get("error"):
        out += ["", _fence(facts["error"])]
    out.append("")

    if data["matches"]:
        out += ["## Signature lines", ""]
        for m in data["matches"][:20]:
            out.append(f"- {m['log']}:{m['line_no']} [{m['name']}] `{m['line'][:300]}`")
        out.append("")

    out += ["## Log tails", ""]
    for name, text in data["log_tails"].items():
        out += [f"### {name} (`{data['logs'].get(name)}`)", "", _fence(text or "(empty)"), ""]
    return "\n".join(out)


def write_reports(result: RunResult) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into the run directory; return their paths."""
    data = report_data(result)
    run_dir = result.plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    jpath = run_dir / "report.json"
    mpath = run_dir / "report.md"
    jpath.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str))
    mpath.write_text(render_markdown(data), encoding="utf-8")
    return jpath, mpath
