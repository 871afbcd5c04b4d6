"""Heatmaps of a dump's page tables (matplotlib, Agg backend, imported lazily).

Rows x live pages, each live cell coloured by ``id / bound`` of the pool the table is checked against,
out-of-range cells in red, cells past a row's live prefix in light grey, and each row's
``cache_seqlens`` end drawn as a black tick. Large tables are downsampled by blocks; a block is red when
*any* cell in it is out of range and otherwise shows its largest id, so downsampling never hides a bad
entry. Allocator dumps (no page table) get a strip plot of the returned slots against the pool bound.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from kvtrap.record.dumpfile import Dump, DumpError
from kvtrap.report.tables import (
    bad_mask,
    live_mask,
    live_pages,
    page_size_of,
    pool_pages,
    summarize_tables,
    summarize_vectors,
)

MAX_ROWS = 256
MAX_COLS = 1024


def _block_reduce(frac: np.ndarray, bad: np.ndarray, live: np.ndarray, fr: int, fc: int):
    """Downsample by ``fr x fc`` blocks: max of live values, any bad, any live."""
    rows, cols = frac.shape
    R, C = math.ceil(rows / fr), math.ceil(cols / fc)
    pad_r, pad_c = R * fr - rows, C * fc - cols

    def pad(a: np.ndarray, fill: Any) -> np.ndarray:
        return np.pad(a, ((0, pad_r), (0, pad_c)), constant_values=fill)

    f = pad(np.where(live, frac, -np.inf), -np.inf).reshape(R, fr, C, fc).max(axis=(1, 3))
    b = pad(bad, False).reshape(R, fr, C, fc).any(axis=(1, 3))
    lv = pad(live, False).reshape(R, fr, C, fc).any(axis=(1, 3))
    return np.where(lv, f, np.nan), b, lv


def table_grid(
    table: np.ndarray,
    cache_seqlens: np.ndarray | None,
    page_size: int,
    lower: int,
    bound: int | None,
    max_rows: int = MAX_ROWS,
    max_cols: int = MAX_COLS,
) -> dict[str, Any]:
    """The arrays a heatmap draws (exposed for tests): ``frac``, ``bad``, ``live``, ``ends`` and the factors."""
    t = np.asarray(table).astype(np.int64)
    bs, width = t.shape
    pages = live_pages(cache_seqlens, page_size) if cache_seqlens is not None else None
    live = live_mask(t, pages)
    cols = int(min(width, pages.max())) if pages is not None and pages.size else width
    cols = max(cols, 1)
    # page ids past the table width (seqlens_exceed_table) are drawn up to the table edge only
    t, live = t[:, :cols], live[:, :cols]
    bad = bad_mask(t, lower, bound) & live
    scale = float(bound) if bound else float(max(int(t[live].max()) if live.any() else 1, 1))
    frac = np.clip(t / scale, 0.0, 1.0)
    fr = max(1, math.ceil(bs / max_rows))
    fc = max(1, math.ceil(cols / max_cols))
    frac_d, bad_d, live_d = _block_reduce(frac, bad, live, fr, fc)
    ends = None
    if pages is not None:
        ends = np.zeros(bs, dtype=np.float64)
        ends[: min(bs, len(pages))] = pages[:bs]
    return {"frac": frac_d, "bad": bad_d, "live": live_d, "fr": fr, "fc": fc, "cols": cols, "rows": bs, "ends": ends}


def plot_dump(
    dump: Dump,
    out: str | Path,
    *,
    tables: list[str] | None = None,
    max_rows: int = MAX_ROWS,
    max_cols: int = MAX_COLS,
    dpi: int = 110,
) -> Path:
    """Write a PNG of the dump's page tables (or allocator slots) to ``out``; return its path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    summaries = summarize_tables(dump.record, dump.tensors)
    if tables:
        unknown = sorted(set(tables) - {s.name for s in summaries})
        if unknown:
            raise DumpError(f"{dump.path}: no page table named {', '.join(unknown)} in this dump (have: {', '.join(s.name for s in summaries) or 'none'})")
        summaries = [s for s in summaries if s.name in tables]
    out = Path(out)
    v = dump.violation
    title = f"{v.kind}: {v.summary}"
    if len(title) > 300:
        title = title[:297] + "..."
    # the title gets its own band above the axes (wrapped), so it never runs into a subplot's title
    title = "\n".join(textwrap.wrap(title, 120))
    title_lines = title.count("\n") + 1
    if not summaries:
        fig = _plot_vectors(dump, plt)
        _title_band(fig, title, title_lines)
    else:
        n = len(summaries)
        fig, axes = plt.subplots(n, 1, figsize=(13, 3.2 + 4.2 * n), squeeze=False)
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e6e6e6")
        red = ListedColormap(["#e8000b"])
        seqlens = dump.tensors.get("cache_seqlens")
        ps = page_size_of(dump.record)
        for ax, s in zip(axes[:, 0], summaries, strict=True):
            g = table_grid(dump.tensors[s.name], seqlens, ps, s.lower, s.bound, max_rows, max_cols)
            rows_d, cols_d = g["frac"].shape
            fr, fc = g["fr"], g["fc"]
            # cell (i, j) of the drawn grid is centred on row i*fr + (fr-1)/2, column j*fc + (fc-1)/2
            extent = (-0.5, cols_d * fc - 0.5, rows_d * fr - 0.5, -0.5)
            im = ax.imshow(
                np.ma.masked_invalid(g["frac"]), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                interpolation="nearest", extent=extent,
            )
            ax.imshow(np.ma.masked_where(~g["bad"], np.ones_like(g["frac"])), cmap=red, aspect="auto",
                      interpolation="nearest", extent=extent, vmin=0, vmax=1)
            raw = np.asarray(dump.tensors[s.name])
            br, bc = np.nonzero(g["bad"])
            if fr == 1 and fc == 1 and rows_d * cols_d <= 600:  # small table: print every live id in its cell
                for i, j in zip(*np.nonzero(g["live"]), strict=True):
                    bad = bool(g["bad"][i, j])
                    ax.text(j, i, str(int(raw[i, j])), ha="center", va="center", fontsize=7 if cols_d <= 40 else 5,
                            color="white" if bad or g["frac"][i, j] < 0.6 else "black",
                            fontweight="bold" if bad else "normal")
            elif br.size:  # make single bad cells visible at any size: outlined markers
                keep = slice(0, 4000)
                ax.scatter(bc[keep] * fc + (fc - 1) / 2, br[keep] * fr + (fr - 1) / 2, marker="s", s=22,
                           facecolors="none", edgecolors="#e8000b", linewidths=1.0)
            if br.size:  # bad rows marked on the left edge
                rows_bad = np.unique(br)
                ax.scatter(np.full(rows_bad.size, -0.5), rows_bad * fr + (fr - 1) / 2, marker=">", c="#e8000b",
                           s=30, clip_on=False, zorder=5)
            from matplotlib.lines import Line2D
            from matplotlib.patches import Patch

            handles: list[Any] = []
            if g["ends"] is not None:
                ends = g["ends"]
                y = np.arange(len(ends))
                ax.scatter(np.minimum(ends, g["cols"]) - 0.5, y, marker="|", s=max(30.0, 3000.0 / max(len(ends), 1)),
                           c="black", linewidths=1.2, zorder=4)
                handles.append(Line2D([], [], color="black", marker="|", linestyle="None", markersize=9,
                                      label="cache_seqlens end (live pages)"))
                over = ends > g["cols"]
                if over.any():
                    # the row runs past the table's last column: a large marker on the right edge, and the
                    # first such row said in words, so the offending row is seen at a glance
                    ax.scatter(np.full(int(over.sum()), g["cols"] - 0.5), y[over], marker=">", c="#e8000b", s=160,
                               clip_on=False, zorder=6)
                    first = int(np.flatnonzero(over)[0])
                    needed = int(live_pages(seqlens, ps)[first * fr]) if seqlens is not None else int(ends[first])
                    ax.annotate(
                        f"row {first * fr} needs {needed} pages > {s.width} columns",
                        xy=(g["cols"] - 0.5, first), xytext=(-12, 0), textcoords="offset points", ha="right",
                        va="center", fontsize=9, color="white", fontweight="bold",
                        bbox={"boxstyle": "round,pad=0.3", "fc": "#e8000b", "ec": "none"}, zorder=7,
                    )
                    handles.append(Line2D([], [], color="#e8000b", marker=">", linestyle="None", markersize=8,
                                          label="cache_seqlens past table width"))
            from matplotlib.ticker import FixedLocator, MaxNLocator

            if g["rows"] <= 16:  # few rows: one tick per row, never fractional rows
                ax.yaxis.set_major_locator(FixedLocator(list(range(g["rows"]))))
            else:
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlim(-0.5, g["cols"] - 0.5)
            ax.set_ylim(g["rows"] - 0.5, -0.5)
            handed = " - handed to this layer" if s.handed_to_layer else ""
            bad_vals = raw[:, : g["cols"]][bad_mask(raw[:, : g["cols"]], s.lower, s.bound) & live_mask(
                raw[:, : g["cols"]], live_pages(seqlens, ps) if seqlens is not None else None)]
            pools = ", ".join(f"{k} {v} pages" for k, v in sorted(pool_pages(dump.record).items()))
            bad_txt = f"; bad ids {int(bad_vals.min())}..{int(bad_vals.max())}" if bad_vals.size else ""
            ds = f"; shown in {g['fr']}x{g['fc']} blocks (red if any cell is bad)" if g["fr"] > 1 or g["fc"] > 1 else ""
            ax.set_title(
                f"{s.name} [{s.shape[0]}x{s.shape[1]}] vs {s.pool} pool, valid [{s.lower}, {s.bound}){handed}\n"
                f"{s.bad} bad of {s.live_ids} live ids in {len(s.bad_rows)} row(s){bad_txt} (pools: {pools}){ds}",
                fontsize=9,
            )
            ax.set_xlabel("page (column)")
            ax.set_ylabel("row (request)")
            cb = fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
            cb.set_label("id / pool bound", fontsize=8)
            handles += [Patch(color="#e8000b", label="out of range (> marks the row)"), Patch(color="#e6e6e6", label="past live prefix")]
            ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(handles),
                      fontsize=7, frameon=False)
        _title_band(fig, title, title_lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _plot_vectors(dump: Dump, plt: Any):
    """Allocator dumps: returned slots per position against the violation's bounds."""
    vecs = [v for v in summarize_vectors(dump.record, dump.tensors) if v.name.startswith("out_")]
    if not vecs:
        vecs = summarize_vectors(dump.record, dump.tensors)
    if not vecs:
        raise DumpError(f"{dump.path}: this dump holds no tensors to plot")
    fig, axes = plt.subplots(len(vecs), 1, figsize=(12, 2.8 * len(vecs) + 1), squeeze=False)
    for ax, v in zip(axes[:, 0], vecs, strict=True):
        a = np.asarray(dump.tensors[v.name]).reshape(-1)
        x = np.arange(a.size)
        bad = np.zeros(a.size, dtype=bool)
        if v.lower is not None:
            bad |= a < v.lower
            ax.axhline(v.lower, color="grey", ls="--", lw=0.8, label=f"lower {v.lower}")
        if v.bound is not None:
            bad |= a >= v.bound
            ax.axhline(v.bound, color="#e8000b", ls="--", lw=0.8, label=f"bound {v.bound}")
        ax.scatter(x[~bad], a[~bad], s=6, c="#1f77b4", label="in range")
        if bad.any():
            ax.scatter(x[bad], a[bad], s=14, c="#e8000b", marker="x", label="out of range")
        ax.set_title(f"{v.name} ({v.size} values, {v.bad} out of range)", fontsize=9)
        ax.set_xlabel("position")
        if bad.any():  # the first offending value, said in words beside it
            i = int(np.flatnonzero(bad)[0])
            lo = "-" if v.lower is None else v.lower
            ax.annotate(
                f"position {i} holds {_num(a[i])}, valid [{lo}, {'-' if v.bound is None else v.bound})",
                xy=(i, float(a[i])), xytext=(24, -18), textcoords="offset points", fontsize=9, color="white",
                fontweight="bold", bbox={"boxstyle": "round,pad=0.3", "fc": "#e8000b", "ec": "none"},
                arrowprops={"arrowstyle": "->", "color": "#e8000b"}, zorder=7,
            )
        ax.legend(fontsize=7, loc="upper right")
    return fig


def _num(x: Any) -> str:
    return str(int(x)) if float(x).is_integer() else f"{float(x):g}"


def _title_band(fig: Any, title: str, lines: int) -> None:
    """The figure title in a band of its own above the subplots (their titles never overlap it)."""
    height = fig.get_figheight()
    band = min(0.3, (0.22 * lines + 0.15) / height)  # inches of title text, as a fraction of the figure
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - band))
    fig.suptitle(title, fontsize=10, y=1.0 - 0.06 / height, va="top")
