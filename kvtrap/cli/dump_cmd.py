"""``kvtrap dump ...``: the post-mortem side. List, show, explain, plot and diff kvtrap dumps.

Exit codes (all verbs): 0 ok; 2 bad input (not a dump, wrong-typed, truncated or damaged files, a newer
schema, an empty or missing directory, bad options), with one line on stderr (see
:mod:`kvtrap.cli.boundary`). ``explain`` exits 0 when at least one rule matched and 1 when none did (the
dump is still printed, and the message says so plainly). ``diff`` follows diff(1): 0 when the dumps
agree, 1 when they differ. The commands parse options and call :mod:`kvtrap.report`; nothing here
unpickles: dumps are JSON + safetensors, read by :func:`kvtrap.record.dumpfile.load_dump`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import orjson

from kvtrap.cli.boundary import BoundaryGroup
from kvtrap.record.dumpfile import DumpError, find_dumps, load_dump
from kvtrap.report import render


@click.group("dump", cls=BoundaryGroup)
def dump() -> None:
    """Read kvtrap dumps: ls, show, explain, plot, diff."""


@dump.command("ls")
@click.argument("dirs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON array (first failure first) for scripts.")
def ls_cmd(dirs: tuple[Path, ...], as_json: bool) -> None:
    """List every dump under DIRS (default: $KVTRAP_DUMP_DIR or ./kvtrap-dumps), first failure first.

    Dumps from all processes and ranks are merged and ordered by event time, so the first row is the
    first thing that went wrong. Each unreadable dump is named on stderr with the reason and skipped;
    the command exits 0 when at least one dump was listed, 2 when none could be read.
    """
    if not dirs:
        from kvtrap.config import Config

        dirs = (Config.from_env().dump_dir,)
    for d in dirs:
        if not d.exists():
            raise DumpError(f"{d}: no such file or directory")
    paths = find_dumps(dirs)
    if not paths:
        raise DumpError(f"no kvtrap dumps under {', '.join(str(d) for d in dirs)}")
    recs, errs = render.ls_records(paths)
    if not recs and len(errs) == 1:
        raise DumpError(errs[0]["error"])  # the one dump there is, and why it cannot be read: one line
    for e in errs:
        click.echo(f"kvtrap: skipped unreadable dump: {e['error']}", err=True)
    if not recs:
        raise DumpError(f"none of the {len(errs)} dump(s) under {', '.join(str(d) for d in dirs)} can be read")
    if as_json:
        out = []
        for i, r in enumerate(recs):
            out.append({"index": i + 1, "first": i == 0, **{k: v for k, v in r.items() if not k.startswith("_")}})
        click.echo(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
        return
    render.render_ls(render.console(), recs)


@dump.command("show")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--rows", "rows_spec", metavar="SPEC", help="Print these rows of every page table in full, e.g. 0,3-5,-1.")
@click.option("--all-rows", is_flag=True, help="List every row's summary, not only the rows with bad entries.")
@click.option("--limit", default=16, show_default=True, type=click.IntRange(1), help="Rows listed per table.")
def show_cmd(path: Path, rows_spec: str | None, all_rows: bool, limit: int) -> None:
    """Everything in the dump at PATH: versions, machine, the violation, the context, and a row summary per table."""
    from kvtrap.report.tables import parse_rows, summarize_tables

    d = load_dump(path)
    tables = summarize_tables(d.record, d.tensors)
    rows = None
    if rows_spec:  # validated before anything is printed
        if not tables:
            raise click.BadParameter("this dump holds no page table", param_hint="--rows")
        try:
            rows = parse_rows(rows_spec, len(tables[0].rows))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--rows") from None
    render.render_show(render.console(), d, tables, rows=rows, limit=limit, all_rows=all_rows)


@dump.command("explain")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Findings as JSON.")
@click.option("--ranks", "rank_dirs", multiple=True, type=click.Path(path_type=Path),
              metavar="DIR", help="Also say whether other processes (TP ranks) dumped the same fault among the "
                                  "dumps under DIR (repeatable), and which rank failed first.")
def explain_cmd(path: Path, as_json: bool, rank_dirs: tuple[Path, ...]) -> None:
    """Name the likely cause of the dump at PATH, from explicit rules, with evidence and next steps.

    With --ranks DIR, also say whether every rank saw the same fault and which rank failed first.
    Exit 0 when a rule matched, 1 when none did (said plainly), 2 on bad input.
    """
    from kvtrap.report.explain import explain

    d = load_dump(path)
    findings = explain(d)
    for rd in rank_dirs:
        if not rd.is_dir():
            raise DumpError(f"--ranks {rd}: not a directory")
    peers, looked = render.event_peers(d.path, rank_dirs) if rank_dirs else ([], 0)
    if as_json:
        out: dict[str, object] = {"path": str(d.path), "kind": d.kind, "matched": bool(findings),
                                  "findings": [f.to_json() for f in findings]}  # fmt: skip
        if rank_dirs:
            out["ranks"] = {"processes": len(peers), "event_ranks": peers[0]["event_ranks"] if peers else [],
                            "first": peers[0]["path"] if peers else None, "dumps_looked_at": looked}  # fmt: skip
        click.echo(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    else:
        render.render_explain(render.console(), d, findings)
        if rank_dirs:
            render.render_event_peers(render.console(), d.path, peers, looked, rank_dirs)
    if not findings:
        sys.exit(1)


@dump.command("plot")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Image to write (.png).")
@click.option("--table", "tables", multiple=True, help="Only this page table (repeatable). Default: all.")
@click.option("--max-rows", default=256, show_default=True, type=click.IntRange(8), help="Rows drawn before downsampling.")
@click.option("--max-cols", default=1024, show_default=True, type=click.IntRange(8), help="Pages drawn before downsampling.")
def plot_cmd(path: Path, output: Path, tables: tuple[str, ...], max_rows: int, max_cols: int) -> None:
    """Heatmap of the page table(s) in the dump at PATH: rows x live pages, bad cells in red."""
    from kvtrap.report.plot import plot_dump

    if output.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise click.BadParameter(f"{output}: use a .png (or .svg/.pdf) file name", param_hint="--output")
    d = load_dump(path)
    out = plot_dump(d, output, tables=list(tables) or None, max_rows=max_rows, max_cols=max_cols)
    click.echo(f"wrote {out}")


@dump.command("diff")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Differences as JSON.")
def diff_cmd(a: Path, b: Path, as_json: bool) -> None:
    """What differs between dumps A and B. Exit 0 when they agree, 1 when they differ (like diff)."""
    from kvtrap.report.diff import diff_dumps

    da, db = load_dump(a), load_dump(b)
    changes = diff_dumps(da, db)
    if as_json:
        click.echo(orjson.dumps([c.to_json() for c in changes], option=orjson.OPT_INDENT_2, default=str).decode())
    else:
        render.render_diff(render.console(), da, db, changes)
    if changes:
        sys.exit(1)


if __name__ == "__main__":  # `python -m kvtrap.cli.dump_cmd ...` works without the `kvtrap` entry point
    dump(prog_name="kvtrap dump")
