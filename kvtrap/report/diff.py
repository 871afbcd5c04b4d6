"""What differs between two dumps: versions, machine, sizes, config, violation, context and tables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvtrap.record.dumpfile import Dump
from kvtrap.report.tables import live_mask, live_pages, page_size_of, summarize_tables

#: Sections in the order they are reported.
SECTIONS = ("event", "versions", "gpu", "config", "violation", "context", "tensors", "tables")
_EVENT_KEYS = ("schema_version", "kind", "time_iso", "host", "rank", "pid", "seq")


@dataclass(frozen=True)
class Change:
    section: str
    key: str
    a: Any  # value in the first dump (None: absent)
    b: Any

    def to_json(self) -> dict[str, Any]:
        return {"section": self.section, "key": self.key, "a": self.a, "b": self.b}


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are kept as values."""
    if not isinstance(obj, Mapping):
        return {prefix: obj} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _diff_maps(section: str, a: Any, b: Any) -> list[Change]:
    fa, fb = flatten(a or {}), flatten(b or {})
    return [Change(section, k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def _table_changes(a: Dump, b: Dump) -> list[Change]:
    out: list[Change] = []
    sa = {s.name: s for s in summarize_tables(a.record, a.tensors)}
    sb = {s.name: s for s in summarize_tables(b.record, b.tensors)}
    for name in sorted(set(sa) | set(sb)):
        x, y = sa.get(name), sb.get(name)
        if x is None or y is None:
            out.append(Change("tables", name, "present" if x else None, "present" if y else None))
            continue
        for attr in ("shape", "pool", "bound", "handed_to_layer", "live_ids", "bad", "negative", "min", "max"):
            va, vb = getattr(x, attr), getattr(y, attr)
            if va != vb:
                out.append(Change("tables", f"{name}.{attr}", list(va) if isinstance(va, tuple) else va,
                                  list(vb) if isinstance(vb, tuple) else vb))
        bad_a = [r.row for r in x.bad_rows]
        bad_b = [r.row for r in y.bad_rows]
        if bad_a != bad_b:
            out.append(Change("tables", f"{name}.bad_rows", bad_a[:16], bad_b[:16]))
        # cell-level: live cells (in either dump) that differ, over the common shape
        ta, tb = np.asarray(a.tensors[name]), np.asarray(b.tensors[name])
        r, c = min(ta.shape[0], tb.shape[0]), min(ta.shape[1], tb.shape[1])
        ma = _live(a, ta)[:r, :c]
        mb = _live(b, tb)[:r, :c]
        differ = (ta[:r, :c] != tb[:r, :c]) & (ma | mb)
        n = int(differ.sum())
        if n:
            rows = np.flatnonzero(differ.any(axis=1))
            out.append(Change("tables", f"{name}.live_cells_differing", 0, f"{n} cell(s) in {rows.size} row(s), first row {int(rows[0])}"))
    return out


def _live(d: Dump, t: np.ndarray) -> np.ndarray:
    s = d.tensors.get("cache_seqlens")
    return live_mask(t, live_pages(s, page_size_of(d.record)) if s is not None else None)


def diff_dumps(a: Dump, b: Dump) -> list[Change]:
    """Every difference, grouped by :data:`SECTIONS`. Empty when the dumps agree on everything compared."""
    ma, mb = a.manifest, b.manifest
    out = [Change("event", k, ma.get(k), mb.get(k)) for k in _EVENT_KEYS if ma.get(k) != mb.get(k)]
    out += _diff_maps("versions", ma.get("versions"), mb.get("versions"))
    out += _diff_maps("gpu", ma.get("gpu"), mb.get("gpu"))
    out += _diff_maps("config", ma.get("config"), mb.get("config"))
    out += _diff_maps("violation", ma.get("violation"), mb.get("violation"))
    out += _diff_maps("context", ma.get("context"), mb.get("context"))
    ta = {k: f"{v.get('dtype')}{list(v.get('shape', []))}" for k, v in (ma.get("tensors") or {}).items()}
    tb = {k: f"{v.get('dtype')}{list(v.get('shape', []))}" for k, v in (mb.get("tensors") or {}).items()}
    out += [Change("tensors", k, ta.get(k), tb.get(k)) for k in sorted(set(ta) | set(tb)) if ta.get(k) != tb.get(k)]
    out += _diff_maps("tensors_omitted", ma.get("tensors_omitted"), mb.get("tensors_omitted"))
    out += _table_changes(a, b)
    return out
