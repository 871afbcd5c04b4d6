"""Writing a CPU benchmark's results: one markdown table and the same rows as JSON, beside each other."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(out: Path, stem: str, title: str, meta: dict[str, Any], rows: dict[str, Any], table: str) -> None:
    """``out/<stem>.json`` ({meta, rows}) and ``out/<stem>.md`` (title, one line per meta item, the table)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = [f"# {title}", ""] + [f"- {k}: {v}" for k, v in meta.items()] + ["", table, ""]
    (out / f"{stem}.md").write_text("\n".join(md))
