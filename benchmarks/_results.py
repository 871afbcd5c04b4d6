"""Writing a CPU benchmark's results: one markdown table and the same rows as JSON, beside each other."""

from __future__ import annotations

import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any


def run_meta(script: str, dists: tuple[str, ...], *, command: str | None = None, **extra: Any) -> dict[str, Any]:
    """The header every results file starts with: machine, Python, versions of ``dists``, UTC date, the command
    (``python benchmarks/<script>`` and this run's arguments, unless ``command`` is given), then ``extra``."""
    return {
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {d: metadata.version(d) for d in dists},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command or " ".join([f"python benchmarks/{script}", *sys.argv[1:]]),
        **extra,
    }


def write_results(out: Path, stem: str, title: str, meta: dict[str, Any], rows: dict[str, Any], table: str) -> None:
    """``out/<stem>.json`` ({meta, rows}) and ``out/<stem>.md`` (title, one line per meta item, the table)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = [f"# {title}", ""] + [f"- {k}: {v}" for k, v in meta.items()] + ["", table, ""]
    (out / f"{stem}.md").write_text("\n".join(md))
