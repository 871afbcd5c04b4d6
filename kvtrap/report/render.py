"""Rendering dumps for people: the ``kvtrap dump`` listing, ``show``, ``explain`` and ``diff`` views.

Reads records only (:mod:`kvtrap.record`) and the numpy summaries of :mod:`kvtrap.report.tables`; the
CLI (:mod:`kvtrap.cli.dump_cmd`) parses options and calls these. Output is plain text through rich, at a
fixed width when stdout is not a terminal, so golden tests do not depend on ``$COLUMNS``.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kvtrap.record.context import Context
from kvtrap.record.dumpfile import Dump, DumpError, load_dump
from kvtrap.record.guard_entry import ENTRY_WIDTH
from kvtrap.record.kinds import Kind
from kvtrap.record.violation import Violation
from kvtrap.report.diff import Change
from kvtrap.report.explain import Finding
from kvtrap.report.tables import TableSummary, bad_mask, summarize_vectors

#: Width used when stdout is not a terminal (pipes, CI, golden tests): output does not depend on $COLUMNS.
PLAIN_WIDTH = 120


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich would exit 1 here; the CLI boundary decides what a closed stdout means (a quiet stop)
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def console() -> Console:
    tty = sys.stdout.isatty()
    return _Console(
        file=sys.stdout,
        width=None if tty else PLAIN_WIDTH,
        no_color=not tty,
        color_system="auto" if tty else None,
        highlight=False,
        emoji=False,
        soft_wrap=False,
    )


def display_path(p: Path) -> str:
    try:
        rel = os.path.relpath(p)
    except ValueError:
        return str(p)
    return rel if not rel.startswith("../..") else str(p)


def _layer_of(v: Violation, ctx: Context) -> tuple[int | None, str | None]:
    """The layer as resolved from the live pool (context), else as the violation names it."""
    if ctx.layer is not None:
        return ctx.layer.id, ctx.layer.type
    return v.layer_id, v.layer_type


def _fmt_layer(v: Violation, ctx: Context) -> str:
    lid, ltype = _layer_of(v, ctx)
    if lid is None and ltype is None:
        return "-"
    return f"{lid if lid is not None else '?'} {ltype or ''}".strip()


def _fmt_value(v: Violation) -> str:
    value, lower, bound, details = v.value, v.lower, v.bound, v.details
    over = details.get("overflow")
    if v.kind == Kind.SEQLENS_EXCEED_TABLE and over:
        return f"needs {over.get('needed_pages')} > {over.get('width')} pages"
    if value is None:
        if v.kind == Kind.INDEX_SPACE_MISMATCH:
            return f"{details.get('handed_table', v.table)} handed"
        if v.kind == Kind.SWA_STATE_DRIFT:
            return "state drift"
        return "-"
    lo = lower if lower is not None else 0
    if value < lo:
        return f"{value} < {lo}"
    if bound is not None and value >= bound:
        return f"{value} >= {bound}"
    return f"{value} in [{lo}, {bound})"


# ------------------------------------------------------------------------------------------------- ls
def ls_records(paths: Sequence[Path]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """One record per readable dump (first failure first), and ``{path, error}`` for each unreadable one."""
    recs: list[dict[str, Any]] = []
    errs: list[dict[str, str]] = []
    for p in paths:
        try:
            d = load_dump(p, tensors=False)
        except DumpError as exc:
            errs.append({"path": str(p), "error": str(exc)})
            continue
        rec, v, ctx = d.record, d.violation, d.context
        layer_id, layer_type = _layer_of(v, ctx)
        recs.append(
            {
                "time": rec.time,
                "time_iso": rec.time_iso,
                "kind": d.kind,
                "where": v.where or ctx.hook,
                "layer_id": layer_id,
                "layer_type": layer_type,
                "table": v.table,
                "pool": v.pool,
                "value": v.value,
                "lower": v.lower,
                "bound": v.bound,
                "count": v.count,
                "fatal": v.fatal,
                "host": rec.host,
                "rank": rec.rank,
                "tp_rank": rec.parallel.tp_rank if rec.parallel else None,
                "pid": rec.pid,
                "seq": rec.seq,
                "path": str(d.path),
                "_v": v,
                "_ctx": ctx,
            }
        )
    recs.sort(key=lambda r: (r["time"] or 0.0, -1 if r["rank"] is None else r["rank"], r["pid"] or 0, r["seq"] or 0))
    _group_events(recs)
    return recs, errs


#: Dumps of one event from several ranks land within this many seconds of the first (TP ranks run the same
#: step in lockstep; a dump takes milliseconds to a few seconds with large tables).
EVENT_WINDOW_S = 30.0


def _event_key(r: dict[str, Any]) -> tuple[Any, ...]:
    # Tensor-parallel ranks run the same batch with the same page tables, so the same fault shows the same
    # violation on every rank: kind, hook, layer, table, row, column and the offending value all agree.
    v: Violation = r["_v"]
    return (r["kind"], r["where"], r["layer_id"], v.table, v.row, v.column, v.value, v.bound, v.count)


def _group_events(recs: list[dict[str, Any]]) -> None:
    """Give each record ``event`` (1-based, in order of first appearance) and ``event_ranks``: records of
    different processes with the same violation within :data:`EVENT_WINDOW_S` are one event seen by several
    ranks; the first record of an event is its first failing rank."""
    events: list[dict[str, Any]] = []
    for r in recs:
        key, proc, t = _event_key(r), (r["host"], r["pid"]), r["time"] or 0.0
        for ev in events:
            if ev["key"] == key and proc not in ev["procs"] and t - ev["t0"] <= EVENT_WINDOW_S:
                break
        else:
            ev = {"key": key, "procs": set(), "t0": t, "recs": []}
            events.append(ev)
        ev["procs"].add(proc)
        ev["recs"].append(r)
        r["event"] = events.index(ev) + 1
    for ev in events:
        ranks = sorted({_rank_label(r) for r in ev["recs"]})
        for r in ev["recs"]:
            r["event_ranks"] = ranks


def event_peers(path: Path, dirs: Sequence[Path]) -> tuple[list[dict[str, Any]], int]:
    """The records of the event the dump at ``path`` belongs to, among the dumps under ``dirs`` (first failing
    first), and how many readable dumps were looked at. Unreadable neighbours are skipped: they are not this dump."""
    from kvtrap.record.dumpfile import find_dumps

    recs, _ = ls_records(find_dumps(list(dirs)))
    me = next((r for r in recs if Path(r["path"]).resolve() == Path(path).resolve()), None)
    if me is None:
        return [], len(recs)
    return [r for r in recs if r["event"] == me["event"]], len(recs)


def render_event_peers(con: Console, path: Path, peers: list[dict[str, Any]], looked: int, where: Sequence[Path]) -> None:
    """One line: whether other processes (ranks) dumped the same fault, and which failed first."""
    under = ", ".join(display_path(Path(d)) for d in where)
    if len(peers) <= 1:
        con.print(f"ranks: no other process dumped this fault under {escape(under)} ({looked} dump(s) there)",
                  soft_wrap=True)  # fmt: skip
        return
    first = peers[0]
    mine = Path(first["path"]).resolve() == Path(path).resolve()
    con.print(f"ranks: the same fault was dumped by {len(peers)} processes ({', '.join(first['event_ranks'])}) under "
              f"{escape(under)}: every rank saw it; "
              + ("this dump is the first." if mine else f"{_rank_label(first)} failed first: "
                 f"{escape(display_path(Path(first['path'])))}"), soft_wrap=True)  # fmt: skip


def _rank_label(r: dict[str, Any]) -> str:
    if r.get("tp_rank") is not None:
        return f"tp{r['tp_rank']}"
    return "-" if r["rank"] is None else f"r{r['rank']}"


def render_ls(con: Console, recs: list[dict[str, Any]]) -> None:
    """The ``kvtrap dump ls`` table: first failure first, then every dump's path on its own line."""
    t0 = recs[0]["time"] or 0.0
    procs = {(r["host"], r["pid"]) for r in recs}
    ranks = {r["rank"] for r in recs if r["rank"] is not None}
    hosts = sorted({str(r["host"]) for r in recs})
    con.print(
        f"{len(recs)} dump(s) from {len(procs)} process(es)" + (f", {len(ranks)} rank(s)" if ranks else "")
        + (f" on host {hosts[0]}" if len(hosts) == 1 else f" on {len(hosts)} hosts")
        + f"; first failure at {recs[0]['time_iso']} (#1)"
    )
    headers = ["#", "time (UTC)", "kind", "layer", "table", "value vs bound", "bad", "rank/pid",
               *(["host"] if len(hosts) > 1 else []), "hook"]
    cells: list[list[str]] = []
    for i, r in enumerate(recs):
        iso = str(r["time_iso"] or "")
        when = (iso[11:23] or "-") if i == 0 else f"+{(r['time'] or 0.0) - t0:.3f}s"
        rank = "-" if r["rank"] is None else str(r["rank"])
        cells.append([
            str(i + 1), when, str(r["kind"]), _fmt_layer(r["_v"], r["_ctx"]), str(r["table"] or "-"),
            _fmt_value(r["_v"]), str(r["count"] if r["count"] is not None else "-"), f"r{rank}/p{r['pid']}",
            *([str(r["host"] or "-")] if len(hosts) > 1 else []),
            str(r["where"] or "-").rsplit(".", 1)[-1],
        ])
    widths = _fit_widths(headers, cells, con.width, keep=("#", "bad"))
    tab = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1, 0, 0))
    for col, width in zip(headers, widths, strict=True):
        tab.add_column(col, no_wrap=True, overflow="ellipsis", width=width,
                       justify="right" if col in ("#", "bad") else "left")
    for row in cells:
        tab.add_row(*(escape(c) for c in row))
    con.print(tab)
    # paths on their own lines, never folded, so they can be copied
    for i, r in enumerate(recs):
        con.print(f"{i + 1:>3}  {escape(display_path(Path(r['path'])))}", soft_wrap=True)
    events: dict[int, list[int]] = {}
    for i, r in enumerate(recs):
        events.setdefault(r["event"], []).append(i + 1)
    if len(events) < len(recs):  # some event was dumped by several processes: say which rows belong together
        for ev, rows in events.items():
            if len(rows) > 1:
                ranks = ", ".join(recs[rows[0] - 1]["event_ranks"])
                con.print(f"event {ev}: rows {', '.join(map(str, rows))} are one fault seen by {len(rows)} processes "
                          f"(ranks {ranks}); row {rows[0]} failed first", soft_wrap=True)  # fmt: skip
    con.print(f"next: kvtrap dump explain {escape(display_path(Path(recs[0]['path'])))}", soft_wrap=True)


def _fit_widths(headers: list[str], cells: list[list[str]], total: int, keep: tuple[str, ...]) -> list[int]:
    """Column widths that fit ``total`` characters (two spaces between columns). Columns in ``keep`` keep
    their natural width; the others shrink in proportion to theirs, to no less than 4 characters."""
    natural = [max(len(h), *(len(row[j]) for row in cells)) for j, h in enumerate(headers)]
    room = total - 2 * (len(headers) - 1) - 1  # a padding space and a divider space between columns
    if sum(natural) <= room:
        return natural
    fixed = sum(w for h, w in zip(headers, natural, strict=True) if h in keep)
    flexible = sum(w for h, w in zip(headers, natural, strict=True) if h not in keep)
    scale = max(room - fixed, 0) / flexible if flexible else 1.0
    return [w if h in keep else max(4, min(w, int(w * scale))) for h, w in zip(headers, natural, strict=True)]


# ----------------------------------------------------------------------------------------------- show
def _kv(con: Console, rows: Sequence[tuple[str, Any]]) -> None:
    t = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 1))
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for k, v in rows:
        t.add_row(escape(k), escape("-" if v is None else str(v)))
    con.print(t)


def _fmt_num(x: Any) -> str:
    return "-" if x is None else str(x)


def _cols(cols: Sequence[int], live: int) -> str:
    return ", ".join(map(str, cols)) + ("" if len(cols) < 8 else ", ...") if cols else "-"


def render_show(
    con: Console, d: Dump, tables: list[TableSummary], *, rows: list[int] | None = None, limit: int = 16,
    all_rows: bool = False,
) -> None:
    """Everything in a dump, readable. ``tables`` is :func:`summarize_tables` of the dump; ``rows`` the
    rows to print in full (validated by the caller before anything is printed). Sections print the
    manifest as recorded, unknown fields included (so a newer writer's additions are shown too)."""
    m, v, ctx = d.manifest, d.manifest["violation"], d.manifest.get("context") or {}
    con.rule(f"kvtrap dump: {escape(display_path(d.path))}", align="left")
    rank = m.get("rank")
    _kv(con, [
        ("kind", f"{d.kind}" + (" (fatal: the kernel would read out of bounds)" if v.get("fatal") else " (not fatal yet)")),
        ("time", m.get("time_iso")),
        ("process", f"host {m.get('host')}, rank {'-' if rank is None else rank}, pid {m.get('pid')}, dump #{m.get('seq')} of this process"),
        ("schema", f"{m.get('schema')} v{m.get('schema_version')}"),
    ])

    con.print()
    con.rule("Versions and machine", align="left")
    vers = m.get("versions") or {}
    gpu = m.get("gpu")
    _kv(con, [
        ("versions", "  ".join(f"{k} {v_ or '-'}" for k, v_ in vers.items()) or "-"),
        ("gpu", f"{gpu.get('name')} (index {gpu.get('index')}, {gpu.get('capability')})" if gpu else "none recorded (CUDA not initialised in the process)"),
    ])

    con.print()
    con.rule("Violation", align="left")
    con.print(" " + escape(Violation.from_json(v).describe()), overflow="fold")
    rows_list = v.get("rows") or []
    lo = v.get("lower") if v.get("lower") is not None else 0
    _kv(con, [
        ("where", v.get("where")),
        ("layer", f"{_fmt_num(v.get('layer_id'))} (type {v.get('layer_type') or '-'}, window {_fmt_num(v.get('window'))})"),
        ("table / pool", f"{v.get('table') or '-'} / {v.get('pool') or '-'}"),
        ("first bad", f"row {_fmt_num(v.get('row'))}, column {_fmt_num(v.get('column'))}: {_fmt_num(v.get('value'))}"
         f" (valid [{lo}, {_fmt_num(v.get('bound'))}))"),
        ("count", f"{v.get('count')} bad entr{'y' if v.get('count') == 1 else 'ies'}"
         + (f" in rows {', '.join(map(str, rows_list[:16]))}{' ...' if len(rows_list) > 16 else ''}" if rows_list else "")),
        *[(f"details.{k}", orjson.dumps(val).decode() if not isinstance(val, str) else val) for k, val in sorted((v.get("details") or {}).items())],
    ])

    con.print()
    con.rule("Context", align="left")
    ctx_rows: list[tuple[str, Any]] = []
    for key in ("hook", "forward_mode", "batch_size", "page_size", "capturing", "size_full", "size_swa", "num_tokens"):
        if key in ctx:
            ctx_rows.append((key, ctx[key]))
    if ctx.get("layer"):
        lay = ctx["layer"]
        ctx_rows.append(("layer", f"id {lay.get('id')}, type {lay.get('type')}, window {lay.get('window')}, index in pool {lay.get('index_in_pool')}"))
    for name, info in (ctx.get("pools") or {}).items():
        if isinstance(info, dict):
            extra = f" ({info['rows']} rows)" if "rows" in info else ""
            ctx_rows.append((f"pool {name}", f"{info.get('pages')} pages{extra}"))
    if ctx.get("free_pages"):
        ctx_rows.append(("free pages", ", ".join(f"{k} {val}" for k, val in ctx["free_pages"].items())))
    if ctx.get("live_pool"):
        ctx_rows.append(("live pool", ctx["live_pool"].get("class")))
    if ctx.get("backend"):
        b = dict(ctx["backend"])
        ctx_rows.append(("backend", str(b.pop("class", "-"))))
        for k, val in b.items():
            ctx_rows.append((f"  {k}", val))
    for name, info in (ctx.get("tables") or {}).items():
        ctx_rows.append((f"table {name}", f"pool {info.get('pool')}, bound {info.get('bound')}"
                         + (", handed to this layer" if info.get("handed_to_layer") else "")))
    if ctx.get("guard"):
        ctx_rows.append(("guard", orjson.dumps(ctx["guard"]).decode()))
    known = {"hook", "forward_mode", "batch_size", "page_size", "capturing", "size_full", "size_swa", "num_tokens",
             "layer", "pools", "free_pages", "live_pool", "backend", "tables", "guard"}
    for key in sorted(set(ctx) - known):
        val = ctx[key]
        ctx_rows.append((key, val if isinstance(val, (str, int, float, bool)) or val is None else orjson.dumps(val).decode()))
    _kv(con, ctx_rows or [("context", "empty")])

    for s in tables:
        con.print()
        handed = ", handed to this layer" if s.handed_to_layer else ""
        con.rule(f"Table {s.name}: {s.dtype}[{s.shape[0]}x{s.shape[1]}], checked against the {s.pool} pool [{s.lower}, {s.bound}){handed}", align="left")
        over = s.overflowing_rows
        con.print(
            f" {s.live_ids} live ids in {len(s.rows)} rows (ids {_fmt_num(s.min)}..{_fmt_num(s.max)});"
            f" {s.bad} bad in {len(s.bad_rows)} row(s); {s.negative} negative"
            + (f"; {len(over)} row(s) need more pages than the table is wide" if over else "")
        )
        shown = list(s.rows) if all_rows else ([r for r in s.rows if r.bad or r.needed > r.live] or [])
        hidden_ok = len(s.rows) - len(shown)
        if len(shown) > limit and not all_rows:
            shown = shown[:limit]
        if shown:
            tab = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
            for col in ("row", "cache_seqlens", "live pages", "min", "max", "bad", "negative", "first bad columns"):
                tab.add_column(col, justify="right" if col not in ("first bad columns",) else "left")
            for r in shown:
                live = str(r.live) + (f" (needs {r.needed})" if r.needed > r.live else "")
                tab.add_row(str(r.row), _fmt_num(r.seqlen), live, _fmt_num(r.min), _fmt_num(r.max), str(r.bad),
                            str(r.negative), _cols(r.first_bad, r.live))
            con.print(tab)
        bad_total = len([r for r in s.rows if r.bad or r.needed > r.live])
        if not all_rows and bad_total > len(shown):
            con.print(f" ... {bad_total - len(shown)} more row(s) with bad entries (--all-rows to list them)")
        if not all_rows and hidden_ok:
            ok = [r for r in s.rows if not r.bad and r.needed <= r.live]
            lives = [r.live for r in ok]
            if ok:
                con.print(f" {len(ok)} row(s) without bad entries (live pages {min(lives)}..{max(lives)}) not listed; --all-rows lists every row")

    if rows:
        _render_rows(con, d, tables, rows)

    vecs = summarize_vectors(d.record, d.tensors)
    if vecs:
        con.print()
        con.rule("Other tensors", align="left")
        tab = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for col in ("name", "dtype", "shape", "min", "max", "valid range", "bad", "first bad at", "repeated values"):
            tab.add_column(col)
        for vs in vecs:
            rng = f"[{_fmt_num(vs.lower)}, {_fmt_num(vs.bound)})" if vs.lower is not None or vs.bound is not None else "-"
            tab.add_row(vs.name, vs.dtype, str(list(vs.shape)), _fmt_num(vs.min), _fmt_num(vs.max), rng,
                        str(vs.bad) if rng != "-" else "-", ", ".join(map(str, vs.first_bad)) or "-",
                        str(vs.duplicates) if rng != "-" else "-")
        con.print(tab)
        for name in ("cache_seqlens", "seq_lens", "req_pool_indices"):
            if name in d.tensors and np.asarray(d.tensors[name]).size <= 64:
                con.print(f" {name}: {' '.join(map(str, np.asarray(d.tensors[name]).reshape(-1).tolist()))}", overflow="fold")
    if "guard_entries" in d.tensors:
        ge = np.asarray(d.tensors["guard_entries"]).reshape(-1, ENTRY_WIDTH)
        con.print()
        con.rule(f"Guard entries ({ge.shape[0]})", align="left")
        tab = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for col in ("table id", "layer", "row", "column", "value", "bound", "flags"):
            tab.add_column(col, justify="right")
        for e in ge[:limit]:
            tab.add_row(*[str(int(x)) for x in e])
        con.print(tab)
    omitted = m.get("tensors_omitted") or {}
    if omitted:
        con.print()
        con.print(" tensors left out by the size cap (KVTRAP_MAX_DUMP_MB): " + ", ".join(
            f"{k} {val.get('dtype')}{val.get('shape')} ({val.get('nbytes')} bytes)" for k, val in omitted.items()))

    con.print()
    con.rule("Config", align="left")
    cfg = m.get("config") or {}
    con.print(" " + "  ".join(f"{k}={orjson.dumps(val).decode() if not isinstance(val, str) else val}" for k, val in cfg.items()), overflow="fold")
    con.print()
    con.print(f"next: kvtrap dump explain {escape(display_path(d.path))}")


def _render_rows(con: Console, d: Dump, tables: list[TableSummary], rows: list[int]) -> None:
    for s in tables:
        arr = np.asarray(d.tensors[s.name]).astype(np.int64)
        for i in rows:
            if i >= arr.shape[0]:
                continue
            r = s.rows[i]
            con.print()
            con.rule(f"{s.name} row {i}: cache_seqlens {_fmt_num(r.seqlen)} -> {r.live} live page(s) of {s.width};"
                     f" * = outside [{s.lower}, {s.bound})", align="left", characters="-")
            live = arr[i, : r.live]
            bad = bad_mask(live[None, :], s.lower, s.bound)[0]
            per = 12
            for c0 in range(0, live.size, per):
                cells = [f"{int(x)}{'*' if b else ''}" for x, b in zip(live[c0:c0 + per], bad[c0:c0 + per], strict=True)]
                con.print(f" {c0:>5}: " + " ".join(f"{c:>8}" for c in cells))
            if live.size == 0:
                con.print(" (no live pages)")
            if r.live < s.width:
                con.print(f" ({s.width - r.live} column(s) past the live prefix: not read by the kernel, not shown)")


# -------------------------------------------------------------------------------------------- explain
def render_explain(con: Console, d: Dump, findings: list[Finding]) -> None:
    v = d.violation
    con.rule(f"kvtrap dump explain: {escape(display_path(d.path))}", align="left")
    con.print(f" {escape(d.kind)} in {escape(v.where or '-')}: {escape(v.summary)}", overflow="fold")
    if not findings:
        con.print()
        con.print(" No rule matched this dump: kvtrap cannot name a likely cause.")
        con.print(" The violation as recorded: " + escape(v.describe()), overflow="fold")
        con.print(f" Read the tables with `kvtrap dump show {escape(display_path(d.path))}` and `kvtrap dump plot`.")
        return
    con.print(f" Likely cause: {escape(findings[0].title)} [{findings[0].confidence} confidence]", overflow="fold")
    for i, f in enumerate(findings, 1):
        con.print()
        _hang(con, f" {i}.", f.title)
        _hang(con, "   ", f"rule {f.rule}, confidence {f.confidence}")
        _hang(con, "    cause:", f.cause)
        con.print("    evidence:")
        for e in f.evidence:
            _hang(con, "      -", e)
        con.print("    next steps:")
        for s in f.next_steps:
            _hang(con, "      -", s)


def _hang(con: Console, prefix: str, text: str) -> None:
    """``prefix text`` with wrapped lines indented under the text (hanging indent)."""
    grid = Table.grid(padding=(0, 1, 0, 0))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row(escape(prefix), escape(text))
    con.print(grid)


# ----------------------------------------------------------------------------------------------- diff
def render_diff(con: Console, da: Dump, db: Dump, changes: list[Change]) -> None:
    con.print(f"A: {escape(display_path(da.path))}")
    con.print(f"B: {escape(display_path(db.path))}")
    if not changes:
        con.print("no differences")
    else:
        tab = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for col in ("section", "key", "A", "B"):
            tab.add_column(col, overflow="fold", no_wrap=col in ("section", "key"))
        for c in changes:
            tab.add_row(c.section, escape(c.key), escape(_short(c.a)), escape(_short(c.b)))
        con.print(tab)
        con.print(f"{len(changes)} difference(s)")


def _short(x: Any, n: int = 60) -> str:
    s = "(absent)" if x is None else (x if isinstance(x, str) else orjson.dumps(x, default=str).decode())
    return s if len(s) <= n else s[: n - 3] + "..."
