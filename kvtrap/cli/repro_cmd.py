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
from kvtrap.repro.models import VARIANTS as _VARIANTS
from kvtrap.repro.scenarios import ATTENTION_BACKENDS, Scenario

_VARIANT_NAMES = tuple(_VARIANTS)  # plain data (the models module imports neither torch nor SGLang)

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
    _print_zoo()
    for s in items:
        click.echo(f"{s.name}  [{s.kind}]  {s.description}")
        click.echo(f"    needs: {_needs_line(s)}; {s.needs.gpu}")
        if s.needs.weights_gib:
            click.echo(f"    weights: ~{s.needs.weights_gib:g} GiB (downloaded once into the HF cache)")
        if s.needs.note:
            click.echo(f"    note: {s.needs.note}")
        if s.model_ids:
            click.echo(f"    models: {s.model} " + (f"(draft {s.draft_model})" if s.draft_model else "(no draft)"))
        if s.dummy_variant:
            click.echo(f"    weight-free: --dummy-weights writes a {s.dummy_variant}-like model (kvtrap repro models list)")
        if s.workload is not None:
            w = s.workload
            click.echo(
                f"    workload: random-ids {w.input_len} in / {w.output_len} out x {w.num_prompts} prompts,"
                f" max concurrency {w.max_concurrency}, seed {w.seed}"
            )
        click.echo("")


def _print_zoo() -> None:
    """The historical bugs ``--inject`` / ``KVTRAP_INJECT`` can re-introduce, with their upstream links."""
    from kvtrap.capture.bugs import BUGS  # names and lines only: imports no SGLang, no torch

    click.echo("Bug zoo (--inject NAME, or KVTRAP_INJECT=NAME in the server):")
    for name, entry in BUGS.items():
        click.echo(f"  {name}  {entry.what}")
        click.echo(f"    {' '.join(entry.links)}")
    click.echo("")


def _workload(scenario: Scenario, kw: dict[str, Any]) -> Scenario:
    """The scenario with the workload options applied (``--num-prompts`` etc.)."""
    import dataclasses

    changes = {field: kw[opt] for opt, field in (("num_prompts", "num_prompts"), ("concurrency", "max_concurrency"),
               ("input_len", "input_len"), ("output_len", "output_len")) if kw.get(opt) is not None}  # fmt: skip
    if not changes or scenario.workload is None:
        return scenario
    return dataclasses.replace(scenario, workload=dataclasses.replace(scenario.workload, **changes))


def _dummy_model(scenario: Scenario, kw: dict[str, Any]) -> Any:
    if not kw["dummy_weights"]:
        if kw["dummy_layers"] is not None:
            raise click.UsageError("--dummy-layers needs --dummy-weights")
        return None
    from kvtrap.repro.models import variant

    if scenario.dummy_variant is None:
        raise click.UsageError(f"scenario {scenario.name!r} has no weight-free model")
    if kw["model_path"] or kw["draft_model_path"]:
        raise click.UsageError("--dummy-weights writes its own model dirs: leave out --model-path/--draft-model-path")
    try:
        return variant(scenario.dummy_variant, kw["dummy_layers"])
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


#: Options that only mean something for a server scenario (a component repro runs in-process, armed, in raise mode).
_SERVER_ONLY = ("dummy_weights", "unarmed", "mode", "num_prompts", "concurrency", "input_len", "output_len", "probe",
                "attention_backend")


def _refuse_nonsense(scenario: Scenario, kw: dict[str, Any]) -> None:
    if scenario.kind != "server":
        given = [f"--{k.replace('_', '-')}" for k in _SERVER_ONLY if kw.get(k)]
        if given:
            raise click.UsageError(f"{', '.join(given)}: only for server scenarios ({scenario.name!r} is a component)")
    if kw["unarmed"] and (kw["fix"] or kw["mode"]):
        raise click.UsageError("--unarmed runs without kvtrap: --fix and --mode need it armed")
    if kw["out"] is not None and not str(kw["out"]).strip():
        raise click.UsageError("--out needs a directory name")


def _run_scenario(scenario: Scenario, **kw: Any) -> None:
    from kvtrap.repro import runner
    from kvtrap.repro.probe import ProbeSpec

    _refuse_nonsense(scenario, kw)
    fix = kw["fix"]
    scenario = _workload(scenario, kw)
    dummy = _dummy_model(scenario, kw)
    probe = None
    if kw["probe"]:
        probe = ProbeSpec(prompts=kw["probe"], input_len=kw["probe_input_len"], output_len=kw["probe_output_len"],
                          vocab=dummy.vocab if dummy is not None else ProbeSpec.vocab)  # fmt: skip
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
        armed=not kw["unarmed"],
        mode=kw["mode"],
        dummy=dummy,
        probe=probe,
        attention_backend=kw["attention_backend"],
    )
    if scenario.kind == "server" and not (options.model_path or scenario.model):
        raise click.UsageError(f"scenario {scenario.name!r} has no model; pass --model-path")
    refused = runner.backend_refusal(options)
    if refused:  # before any model dir, run dir or process; --dry-run too (it would show a run that cannot start)
        click.echo(f"kvtrap repro: {refused}", err=True)
        sys.exit(EXIT_USAGE)
    plan = runner.build_plan(options)

    if kw["dry_run"]:
        click.echo(f"# scenario: {scenario.name} ({scenario.kind}): {scenario.description}")
        click.echo(f"# run directory: {plan.run_dir} (dumps: {plan.dump_dir})")
        click.echo(f"# needs: {_needs_line(scenario)}; {scenario.needs.gpu}")
        if scenario.workload is not None:
            w = scenario.workload
            click.echo(f"# workload: random-ids {w.input_len} in / {w.output_len} out x {w.num_prompts} prompts, "
                       f"max concurrency {w.max_concurrency}, seed {w.seed}")  # fmt: skip
        if probe is not None:
            click.echo(f"# before the benchmark: {probe.prompts} greedy prompts ({probe.input_len} in / "
                       f"{probe.output_len} out) one at a time to /generate -> outputs.json")  # fmt: skip
        notes = runner.backend_warnings(options)
        for note in notes:
            click.echo(f"# note: {note}")
        try:
            warns = runner.check_environment(options)
        except runner.EnvironmentProblem as exc:
            click.echo(f"# environment: a real run would stop here (exit 2): {exc}")
        else:
            click.echo("# environment: ok" + "".join(f"\n# warning: {w}" for w in warns if w not in notes))
        click.echo(plan.shell())
        return

    try:
        result = runner.run(options, plan=plan, echo=_echo_err)
    except runner.EnvironmentProblem as exc:
        click.echo(f"kvtrap repro: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except OSError as exc:  # the run directory or the model dirs cannot be written
        click.echo(f"kvtrap repro: cannot write {exc.filename or plan.run_dir}: {exc.strerror or exc}", err=True)
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
        click.Option(["--dummy-weights"], is_flag=True,
                     help="Weight-free: write the scenario's model dirs (Gemma 4-like or GPT-OSS-like configs + "
                          "tokenizer) into the run dir and start SGLang with --load-format dummy. No download, any "
                          "GPU."),
        click.Option(["--dummy-layers"], type=click.IntRange(min=6, max=256), default=None,
                     help="With --dummy-weights: this many decoder layers (same sliding/full pattern; faster "
                          "start-up)."),
        click.Option(["--unarmed"], is_flag=True,
                     help="SGLANG_TRTLLM_MHA_DEBUG=0: no traps. --inject still re-introduces the bug (to see it crash)."),
        click.Option(["--mode"], type=click.Choice(["raise", "log"]), default=None,
                     help="KVTRAP_MODE. Not given: kvtrap's default (raise)."),
        click.Option(["--attention-backend"], type=click.Choice(ATTENTION_BACKENDS), default=None,
                     help="Run the server scenario on this SGLang attention backend instead of its own (replaces "
                          "its --attention-backend; recorded in the report). --dry-run says what SGLang requires. "
                          "SGLang 0.5.23 starts Gemma 4 only on trtllm_mha, triton or fa4 (fa3 and flashinfer are "
                          "refused, exit 2), GPT-OSS on fa3, trtllm_mha, triton or fa4 (flashinfer refused)."),
        click.Option(["--num-prompts"], type=click.IntRange(min=1), default=None, help="Benchmark prompts."),
        click.Option(["--concurrency"], type=click.IntRange(min=1), default=None, help="Benchmark max concurrency."),
        click.Option(["--input-len"], type=click.IntRange(min=1), default=None, help="Benchmark input tokens."),
        click.Option(["--output-len"], type=click.IntRange(min=1), default=None, help="Benchmark output tokens."),
        click.Option(["--probe"], type=click.IntRange(min=0, max=10000), default=0, show_default=True,
                     help="Before the benchmark, send N greedy random-id prompts one at a time and keep the output "
                          "ids (outputs.json) to compare runs with `kvtrap repro compare`. All of them must answer "
                          "within --bench-timeout, else the run is UNHEALTHY."),
        click.Option(["--probe-input-len"], type=click.IntRange(min=1, max=131072), default=256, show_default=True,
                     help="Tokens per probe prompt (with --probe)."),
        click.Option(["--probe-output-len"], type=click.IntRange(min=1, max=131072), default=64, show_default=True,
                     help="Greedy tokens generated per probe prompt (with --probe)."),
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


@click.group("models")
def models_group() -> None:
    """Weight-free Gemma 4-like and GPT-OSS-like models (configs + tokenizer) for `--load-format dummy` servers."""


@models_group.command("list")
def models_list() -> None:
    """The variants, their shapes and where they differ from the real checkpoints."""
    from kvtrap.repro.models import VARIANTS

    for m in VARIANTS.values():
        click.echo(f"{m.name}: {m.summary()}")
        for why in m.deviations:
            click.echo(f"    differs: {why}")


@models_group.command("write")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--variant", "name", type=click.Choice(list(_VARIANT_NAMES)), default="e4b", show_default=True)
@click.option("--layers", type=click.IntRange(min=6, max=256), default=None,
              help="Decoder layers (default: the real count).")
def models_write(dest: str, name: str, layers: int | None) -> None:
    """Write DEST/target (and, for Gemma 4, DEST/draft: the frozen-KV MTP assistant) for `sglang.launch_server
    --load-format dummy`."""
    from kvtrap.repro.models import variant, write_model_dirs

    if not dest.strip():
        raise click.UsageError("DEST needs a directory name")
    try:
        model = variant(name, layers)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        dirs = write_model_dirs(dest, model)
    except OSError as exc:
        click.echo(f"kvtrap repro models write: cannot write {exc.filename or dest}: {exc.strerror or exc}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(f"target: {dirs.target}")
    if dirs.draft is None:
        click.echo("draft:  none (this model has no draft)")
        click.echo(f"serve:  python -m sglang.launch_server --model-path {dirs.target} --load-format dummy ...")
        return
    click.echo(f"draft:  {dirs.draft}")
    click.echo(f"serve:  python -m sglang.launch_server --model-path {dirs.target} --speculative-draft-model-path "
               f"{dirs.draft} --load-format dummy ...")  # fmt: skip


def _near_tie_line(result: Any) -> str:
    """How the differing prompts first differ: a swap of the two runs' top two candidates closer than
    NEAR_TIE_NATS is rounding (the same computation reduced in another order), anything else is not."""
    from kvtrap.repro.probe import NEAR_TIE_NATS

    n = len(result.swap_margins)
    ties = result.near_ties
    other = result.judged - ties
    line = (f"near ties: {ties} of {n} differing prompts first differ by swapping the two runs' top two candidates "
            f"closer than {NEAR_TIE_NATS:g} nats (rounding-level)")  # fmt: skip
    if other:
        line += f"; {other} do not (a wider margin or a third candidate: the runs computed something different)"
    if n - result.judged:
        line += f"; {n - result.judged} cannot be judged (no top-2 log-probs recorded there)"
    return line


@click.command("compare")
@click.argument("run_a", type=click.Path())
@click.argument("run_b", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def compare_cmd(run_a: str, run_b: str, as_json: bool) -> None:
    """Compare the greedy outputs (outputs.json of `--probe N`) of two runs token by token.

    Exit 0 when every prompt's output ids are identical, 1 when any differ, 2 on unreadable input."""
    from kvtrap.repro.probe import ProbeError, compare, load_probe

    try:
        result = compare(load_probe(run_a), load_probe(run_b))
    except ProbeError as exc:
        click.echo(f"kvtrap repro compare: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    if as_json:
        import orjson

        click.echo(orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(f"{result.exact}/{result.prompts} prompts identical, {result.failed} without output in a run; "
                   f"{result.matched_tokens}/{result.total_tokens} tokens equal before the first mismatch")  # fmt: skip
        if result.first_divergence is not None:
            p, t = result.first_divergence
            click.echo(f"first divergence: prompt {p}, token {t}")
            click.echo(_near_tie_line(result))
    sys.exit(0 if result.identical else 1)


class _ReproGroup(click.Group):
    _FIXED = {"list": list_cmd, "models": models_group, "compare": compare_cmd}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self._FIXED) + [s.name for s in _scenarios.all_scenarios()]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._FIXED:
            return self._FIXED[cmd_name]
        try:
            return _run_command(_scenarios.get(cmd_name))
        except KeyError:
            return None


@click.group("repro", cls=_ReproGroup, epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
def repro() -> None:
    """Reproduce paged-KV crashes: `kvtrap repro list`, `kvtrap repro NAME [--dry-run] [...]`."""
