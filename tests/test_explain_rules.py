"""Each explain rule, on a dump written by a real kvtrap trap firing on real SGLang 0.5.23 objects.

The dumps come from ``tests/trapdumps.py`` (one per scenario, made once per module). No hand-written
JSON: every fact a rule reads was recorded by the trap.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvtrap import errors
from kvtrap.dumpfile import Dump, load_dump
from kvtrap.explain import RULES, Finding, explain, rule_ids

trapdumps = pytest.importorskip("trapdumps", reason="tests/trapdumps.py (real trap scenarios) is missing")


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Dump]:
    root = tmp_path_factory.mktemp("real-dumps")
    made = {
        "26957": trapdumps.make_26957_dump(root / "26957"),
        "negative": trapdumps.make_negative_id_dump(root / "negative"),
        "stale": trapdumps.make_stale_row_dump(root / "stale"),
        "swa_slot": trapdumps.make_swa_slot_dump(root / "swa_slot"),
        "seqlens": trapdumps.make_seqlens_exceed_dump(root / "seqlens"),
    }
    return {k: load_dump(Path(p)) for k, p in made.items()}


def _by_rule(findings: list[Finding]) -> dict[str, Finding]:
    return {f.rule: f for f in findings}


def _numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


def test_registry_is_ordered_and_unique() -> None:
    ids = rule_ids()
    assert ids == ["sglang-26957", "negative-id", "stale-row", "swa-slot-out-of-range", "seqlens-exceed-table"]
    assert len(set(ids)) == len(RULES)


def test_26957_signature(real: dict[str, Dump]) -> None:
    d = real["26957"]
    assert d.context["layer"]["type"] == "swa"
    findings = explain(d)
    top = findings[0]
    assert top.rule == "sglang-26957"
    assert top.confidence == "high"
    text = "\n".join(top.evidence)
    assert "page_table" in text
    swa, full = d.context["pools"]["swa"]["pages"], d.context["pools"]["full"]["pages"]
    # the evidence quotes the real pool sizes from the dump
    gap_lines = [e for e in top.evidence if "(SWA pages)" in e]
    if gap_lines:
        nums = _numbers(gap_lines[0])
        assert swa in nums and full in nums
    assert any("handed" in e for e in top.evidence) or gap_lines
    assert any("#26966" in s or "KVTRAP_FIX" in s for s in top.next_steps)


def test_negative_sentinel(real: dict[str, Dump]) -> None:
    d = real["negative"]
    found = _by_rule(explain(d))
    f = found["negative-id"]
    assert f.confidence == "high"  # the value is exactly -1
    v = d.manifest["violation"]
    assert any(f"row {v['row']}" in e for e in f.evidence)
    assert "sglang-26957" not in found or found["sglang-26957"].confidence != "high" or d.context["layer"]["type"] == "swa"


def test_ids_beyond_every_pool(real: dict[str, Dump]) -> None:
    d = real["stale"]
    found = _by_rule(explain(d))
    f = found["stale-row"]
    top = max(p["pages"] for p in d.context["pools"].values() if p.get("pages") is not None)
    assert any(f">= {top}" in e for e in f.evidence)
    assert f.confidence in ("high", "medium")
    assert "negative-id" not in found


def test_allocator_swa_slot(real: dict[str, Dump]) -> None:
    d = real["swa_slot"]
    assert d.kind == errors.SWA_SLOT_OUT_OF_RANGE
    findings = explain(d)
    assert findings[0].rule == "swa-slot-out-of-range"
    f = findings[0]
    assert f.confidence == "high"
    v = d.manifest["violation"]
    assert any(str(v["value"]) in e and str(v["bound"]) in e for e in f.evidence)
    assert "double free" in f.title
    assert any("SGLANG_DEBUG_MEMORY_POOL" in s for s in f.next_steps)


def test_seqlens_exceed_table(real: dict[str, Dump]) -> None:
    d = real["seqlens"]
    found = _by_rule(explain(d))
    f = found["seqlens-exceed-table"]
    width = d.tensors["page_table"].shape[1]
    assert any(f"{width} page(s) wide" in e for e in f.evidence)


def test_rules_do_not_fire_on_other_scenarios(real: dict[str, Dump]) -> None:
    # each scenario's own rule is the most certain; the allocator rule never fires on attention dumps
    for name in ("26957", "negative", "stale", "seqlens"):
        assert "swa-slot-out-of-range" not in _by_rule(explain(real[name])), name
    assert _by_rule(explain(real["swa_slot"])).keys() == {"swa-slot-out-of-range"}


def test_no_rule_matched_is_an_empty_list(real: dict[str, Dump], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kvtrap.explain.RULES", [])
    assert explain(real["26957"]) == []
