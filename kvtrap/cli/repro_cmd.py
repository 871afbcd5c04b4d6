"""``kvtrap repro``: list the repro scenarios, or run one (``kvtrap repro NAME [options] [server args]``).

Register with ``main.add_command(repro)``. Scenario names are subcommands, resolved from the registry
(:mod:`kvtrap.repro.scenarios`) when the command line is parsed, so a scenario registered later (e.g.
``synthetic``) needs no change here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from kvtrap.repro import scenarios as _scenarios
from kvtrap.repro.classify import EXIT_USAGE, Outcome
from kvtrap.repro.scenarios import Scenario

_EPILOG = """\b
Exit codes: 0 clean; 1 trapped or crashed (reproduced); 2 usage or environment error
(no GPU, SGLang missing, model path missing); 3 unhealthy or hung (inconclusive); 130 interrupted.
Arguments kvtrap does not know are passed to sglang.launch_server (after the scenario's own flags,
so they win), e.g. `kvtrap repro e4b-summarize --eager --mem-fraction-static 0.8`."""


def _echo_err(line: str) -> None:
    click.echo(line, err=True)


def _needs_line(s: Scenario) -> str:
    n = s.needs
    if not n.requires_gpu:
        return "no GPU"
    mem = f">= {n.min_gpu_mem_gib} GiB/GPU" if n.min_gpu_mem_gib else ""
    gpus = f"{n.gpus} x " if n.gpus > 1 else ""
    return f"{gpus}GPU {mem}".strip()


def _print_list(as_json: bool) -> None:
    items = _scenarios.all_scenarios()
    if as_json:
        import orjson

        click.echo(orjson.dumps([s.to_json() for s in items], option=orjson.OPT_INDENT_2).decode())
        return
    for s in items:
        click.echo(f"{s.name}  [{s.kind}]  {s.description}")
        click.echo(f"    needs: {_needs_line(s)}; {s.needs.gpu}")
        if s.needs.weights_gib:
            click.echo(f"    weights: ~{s.needs.weights_gib:g} GiB bf16 (downloaded once into the HF cache)")
        if s.needs.note:
            click.echo(f"    note: {s.needs.note}")
        if s.model_ids:
            click.echo(f"    models: {s.model} (draft {s.draft_model})")
        if s.workload is not None:
            w = s.workload
            click.echo(
                f"    workload: random-ids {w.input_len} in / {w.output_len} out x {w.num_prompts} prompts,"
                f" max concurrency {w.max_concurrency}, seed {w.seed}"
            )
        click.echo("")


def _run_scenario(scenario: Scenario, **kw: Any) -> None:
    from kvtrap.repro import runner

    fix = kw["fix"]
    options = runner.RunOptions(
        scenario=scenario,
        out_dir=Path(kw["out"]) if kw["out"] else None,
        eager=kw["eager"],
        inject=tuple(i for part in kw["inject"] for i in part.split(",") if i),
        fix=fix,
        model_path=kw["model_path"],
        draft_model_path=kw["draft_model_path"],
        extra_server_args=tuple(kw["server_args"]),
        port=kw["port"],
        health_timeout_s=kw["health_timeout"],
        bench_timeout_s=kw["bench_timeout"],
        grace_s=kw["grace"],
        follow=not kw["quiet"],
    )
    if scenario.kind == "server" and not (options.model_path or scenario.model):
        raise click.UsageError(f"scenario {scenario.name!r} has no model; pass --model-path")
    plan = runner.build_plan(options)

    if kw["dry_run"]:
        click.echo(f"# scenario: {scenario.name} ({scenario.kind}): {scenario.description}")
        click.echo(f"# run directory: {plan.run_dir} (dumps: {plan.dump_dir})")
        click.echo(f"# needs: {_needs_line(scenario)}; {scenario.needs.gpu}")
        try:
            warns = runner.check_environment(options)
        except runner.EnvironmentProblem as exc:
            click.echo(f"# environment: a real run would stop here (exit 2): {exc}")
        else:
            click.echo("# environment: ok" + "".join(f"\n# warning: {w}" for w in warns))
        click.echo(plan.shell())
        return

    try:
        result = runner.run(options, plan=plan, echo=_echo_err)
    except runner.EnvironmentProblem as exc:
        click.echo(f"kvtrap repro: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    c = result.classification
    click.echo(f"{scenario.name}: {c.outcome.value}: {c.reason}")
    if c.kernel:
        click.echo(f"  kernel: {c.kernel}")
    for d in result.dumps[:5]:
        click.echo(f"  dump: {d['path']}" + (f" ({d.get('kind')})" if d.get("kind") else ""))
    if result.dumps:
        click.echo(f"  explain: kvtrap dump explain {result.dumps[0]['path']}")
    click.echo(f"  report: {plan.run_dir / 'report.md'}")
    if c.outcome == Outcome.INTERRUPTED:
        click.echo("  interrupted: every server and benchmark process was stopped", err=True)
    sys.exit(c.exit_code)


def _run_command(scenario: Scenario) -> click.Command:
    params: list[click.Parameter] = [
        click.Option(["--dry-run"], is_flag=True, help="Print the exact commands and environment; run nothing."),
        click.Option(["--eager/--graphs"], default=False,
                     help="--eager disables CUDA graphs (decode and prefill); --graphs (default) keeps them."),
        click.Option(["--inject"], multiple=True, metavar="BUG",
                     help="Re-introduce a historical bug in the server (KVTRAP_INJECT), e.g. sglang-26957."),
        click.Option(["--fix/--no-fix"], default=None,
                     help="KVTRAP_FIX=auto / off. Not given: kvtrap's default (auto)."),
        click.Option(["--out"], type=click.Path(file_okay=False), default=None,
                     help="Run directory (logs, dumps, report). Default: runs/NAME-<UTC stamp>."),
        click.Option(["--model-path"], default=None, help="Target model (HF id or local dir) instead of the scenario's."),
        click.Option(["--draft-model-path"], default=None, help="Draft model instead of the scenario's."),
        click.Option(["--port"], type=int, default=None, help="Server port on 127.0.0.1 (default: a free one)."),
        click.Option(["--health-timeout"], type=float, default=1800.0, show_default=True,
                     help="Seconds to wait for /health (includes download, load, graph capture)."),
        click.Option(["--bench-timeout"], type=float, default=3600.0, show_default=True,
                     help="Seconds the benchmark may run before the run counts as HUNG."),
        click.Option(["--grace"], type=float, default=20.0, show_default=True,
                     help="Seconds between SIGTERM and SIGKILL when stopping a process group."),
        click.Option(["--quiet", "-q"], is_flag=True, help="Do not echo the server and benchmark logs."),
        click.Argument(["server_args"], nargs=-1, type=click.UNPROCESSED),
    ]  # fmt: skip

    def callback(**kw: Any) -> None:
        _run_scenario(scenario, **kw)

    return click.Command(
        name=scenario.name,
        params=params,
        callback=callback,
        help=f"{scenario.description}",
        short_help=scenario.description[:70],
        epilog=_EPILOG,
        context_settings={"ignore_unknown_options": True, "help_option_names": ["-h", "--help"]},
    )


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(as_json: bool) -> None:
    """The scenarios, with the GPU, memory and models each needs."""
    _print_list(as_json)


class _ReproGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return ["list"] + [s.name for s in _scenarios.all_scenarios()]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "list":
            return list_cmd
        try:
            return _run_command(_scenarios.get(cmd_name))
        except KeyError:
            return None


@click.group("repro", cls=_ReproGroup, epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
def repro() -> None:
    """Reproduce paged-KV crashes: `kvtrap repro list`, `kvtrap repro NAME [--dry-run] [...]`."""
