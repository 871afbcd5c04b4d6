"""Each explain rule, on a dump written by a real kvtrap trap firing on real SGLang 0.5.23 objects.

The dumps come from ``tests/helpers/trapdumps.py`` (one per scenario, made once per module). No hand-written
JSON: every fact a rule reads was recorded by the trap.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from kvtrap.record.dumpfile import MANIFEST, Dump, DumpError, load_dump
from kvtrap.record.kinds import Kind
from kvtrap.report.explain import RULES, Finding, explain, rule_ids

trapdumps = pytest.importorskip("helpers.trapdumps", reason="tests/helpers/trapdumps.py (real trap scenarios) is missing")

pytestmark = pytest.mark.cpu_world()


def _path(made: object) -> Path:
    """trapdumps' ``make_*`` return ``(dump_path, KVTrapError)``."""
    return Path(made[0] if isinstance(made, tuple) else made)  # type: ignore[index]


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Dump]:
    root = tmp_path_factory.mktemp("real-dumps")
    made = {
        "26957": trapdumps.make_26957_dump(root / "26957"),
        "26957-high-fill": trapdumps.make_26957_dump(root / "26957-high-fill", high_fill=True),
        "drift": trapdumps.make_drift_dump(root / "drift"),
        "off-by-one": trapdumps.make_out_of_range_dump(root / "off-by-one"),
        "negative": trapdumps.make_negative_id_dump(root / "negative"),
        "stale": trapdumps.make_stale_row_dump(root / "stale"),
        "swa_slot": trapdumps.make_swa_slot_dump(root / "swa_slot"),
        "seqlens": trapdumps.make_seqlens_exceed_dump(root / "seqlens"),
        "spec_context": trapdumps.make_spec_context_limit_dump(root / "spec_context"),
        "spec_draft_decode": trapdumps.make_spec_context_limit_dump(root / "spec_draft_decode", draft_decode=True),
        "38269": trapdumps.make_38269_dump(root / "38269"),
        "27779": trapdumps.make_27779_dump(root / "27779"),
        "25805": trapdumps.make_25805_dump(root / "25805"),
        "page0": trapdumps.make_swa_page0_free_dump(root / "page0"),
        "double": trapdumps.make_swa_double_free_dump(root / "double"),
        "not_owned": trapdumps.make_swa_not_owned_dump(root / "not_owned"),
        "24402": trapdumps.make_24402_dump(root / "24402"),
        "24402-wrapped": trapdumps.make_24402_dump(root / "24402-wrapped", wrapped=True),
        "24394": trapdumps.make_24394_dump(root / "24394"),
        "24394-low-fill": trapdumps.make_24394_dump(root / "24394-low-fill", high_fill=False),
        "triton-oor": trapdumps.make_triton_out_of_range_dump(root / "triton-oor"),
        "triton-indptr": trapdumps.make_triton_indptr_dump(root / "triton-indptr"),
        "27737": trapdumps.make_27737_dump(root / "27737"),
        "flashinfer-oor": trapdumps.make_flashinfer_out_of_range_dump(root / "flashinfer-oor"),
    }
    return {k: load_dump(_path(p)) for k, p in made.items()}


def _by_rule(findings: list[Finding]) -> dict[str, Finding]:
    return {f.rule: f for f in findings}


def _numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


def test_registry_is_ordered_and_unique() -> None:
    ids = rule_ids()
    assert ids == ["sglang-26957", "negative-id", "stale-row", "swa-slot-out-of-range", "spec-rows-past-context",
                   "seqlens-exceed-table", "padding-page-for-real-request", "kv-write-out-of-range", "sglang-24394",
                   "sglang-27737", "ragged-kv-ids", "sglang-38269", "sglang-27779", "sglang-25805", "sglang-24402"]
    assert len(set(ids)) == len(RULES)


def test_26957_signature_before_it_faults(real: dict[str, Dump]) -> None:
    # first step after the view swap: the SWA layer is handed the full table, ids still small
    d = real["26957"]
    assert d.manifest["context"]["layer"]["type"] == "swa"
    top = explain(d)[0]
    assert top.rule == "sglang-26957" and top.confidence == "high"
    assert "#26957" in top.title
    assert any("was handed `page_table`" in e for e in top.evidence)
    assert any("use_sliding_window_kv_pool is False" in e for e in top.evidence)
    assert any("#26966" in s or "KVTRAP_FIX" in s for s in top.next_steps)


def test_26957_signature_at_high_fill(real: dict[str, Dump]) -> None:
    # where the real bug faulted: full-pool ids >= SWA page count but < full page count
    d = real["26957-high-fill"]
    top = explain(d)[0]
    assert top.rule == "sglang-26957" and top.confidence == "high"
    swa, full = d.manifest["context"]["pools"]["swa"]["pages"], d.manifest["context"]["pools"]["full"]["pages"]
    gap = [e for e in top.evidence if "(SWA pages)" in e]
    assert gap, top.evidence
    nums = _numbers(gap[0])
    assert nums[2:] == [swa, full] or (swa in nums and full in nums)
    live = int(nums[1])
    assert nums[0] == live > 0  # every live id of the handed table lies in the gap


def test_stale_backend_state_on_a_full_layer(real: dict[str, Dump]) -> None:
    d = real["drift"]
    assert d.kind == Kind.SWA_STATE_DRIFT and d.manifest["context"]["layer"]["type"] == "full"
    top = explain(d)[0]
    assert top.rule == "sglang-26957" and top.confidence == "high"
    assert "stale" in top.title.lower()
    assert any("_swa_full_to_swa_mapping" in e for e in top.evidence)


def test_single_id_at_the_swa_bound_is_only_a_weak_26957_hint(real: dict[str, Dump]) -> None:
    # one SWA-table id == SWA page count, backend state fine: matches the id range, nothing else
    findings = explain(real["off-by-one"])
    assert [f.rule for f in findings] == ["sglang-26957"]
    assert findings[0].confidence == "low"


def test_negative_sentinel(real: dict[str, Dump]) -> None:
    d = real["negative"]
    found = _by_rule(explain(d))
    f = found["negative-id"]
    assert f.confidence == "high"  # the value is exactly -1
    v = d.manifest["violation"]
    assert any(f"row {v['row']}" in e for e in f.evidence)
    assert "sglang-26957" not in found or found["sglang-26957"].confidence != "high" or d.manifest["context"]["layer"]["type"] == "swa"


def test_ids_beyond_every_pool(real: dict[str, Dump]) -> None:
    d = real["stale"]
    findings = explain(d)
    f = findings[0]
    assert f.rule == "stale-row" and f.confidence == "high"
    top = max(p["pages"] for p in d.manifest["context"]["pools"].values() if p.get("pages") is not None)
    assert any(f">= {top}" in e for e in f.evidence)
    seqlen = int(d.tensors["cache_seqlens"][d.manifest["violation"]["row"]])
    assert any(f"cache_seqlens is {seqlen}" in e for e in f.evidence)  # longer than the written prefix
    # the SWA table's unwritten tail is negative garbage, not a -1 sentinel: at most a low-confidence hint
    assert all(x.confidence == "low" for x in findings if x.rule == "negative-id")


def test_allocator_swa_slot(real: dict[str, Dump]) -> None:
    d = real["swa_slot"]
    assert d.kind == Kind.SWA_SLOT_OUT_OF_RANGE
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
    # a plain DECODE batch wider than its table is not the speculative context-limit case
    assert "spec-rows-past-context" not in found and f.confidence == "high"


def test_spec_rows_past_context(real: dict[str, Dump]) -> None:
    """The last verify step of a request at SGLang's length limit (trapdumps): the specific rule names it
    first, computes the workaround context length, and the generic rule steps down."""
    d = real["spec_context"]
    assert d.manifest["context"]["forward_mode"] == "TARGET_VERIFY"
    assert d.manifest["context"]["backend"]["max_context_len"] == 512 and d.manifest["context"]["backend"]["speculative_num_draft_tokens"] == 4
    findings = explain(d)
    top = findings[0]
    assert top.rule == "spec-rows-past-context" and top.confidence == "high"
    assert any("longest cache_seqlens 515" in e for e in top.evidence)
    assert any("3 token(s) past it, within 2 x 4 draft tokens" in e for e in top.evidence)
    assert any("--context-length 504" in s for s in top.next_steps)  # 32 pages x 16 - 2 x 4
    generic = _by_rule(findings)["seqlens-exceed-table"]
    assert generic.confidence == "medium"


def test_spec_rows_past_context_on_a_draft_decode_step(real: dict[str, Dump]) -> None:
    # DECODE with spec_info set (the draft's own decode steps) is speculative too
    d = real["spec_draft_decode"]
    top = explain(d)[0]
    assert top.rule == "spec-rows-past-context" and top.confidence == "high"
    assert any("DECODE of a speculative batch" in e for e in top.evidence)


def test_spec_rule_edges(real: dict[str, Dump], tmp_path: Path) -> None:
    d = real["spec_context"]

    def edited(**changes: object) -> Dump:
        """The dump, rewritten with context / backend fields changed, read back as kvtrap reads dumps."""
        dest = tmp_path / f"edit{len(list(tmp_path.iterdir()))}"
        shutil.copytree(d.path, dest)
        m = json.loads((dest / MANIFEST).read_text())
        for key, value in changes.items():
            (m["context"]["backend"] if key in ("speculative_num_draft_tokens", "max_context_len") else m["context"])[key] = value
        (dest / MANIFEST).write_text(json.dumps(m))
        return load_dump(dest)

    # relabelled as a plain DECODE forward: no speculative rows, only the generic finding
    assert "spec-rows-past-context" not in _by_rule(explain(edited(forward_mode="DECODE", speculative=False)))
    # no forward mode (a device-guard dump): still named, one step less sure
    unknown_mode = {"forward_mode": None, "speculative": None}
    assert _by_rule(explain(edited(**unknown_mode)))["spec-rows-past-context"].confidence == "medium"
    # ... but not for a backend without speculative decoding
    assert "spec-rows-past-context" not in _by_rule(explain(edited(**unknown_mode, speculative_num_draft_tokens=None)))
    # a speculative mode with no draft size: named, medium, generic workaround
    f = _by_rule(explain(edited(forward_mode="TARGET_VERIFY", speculative_num_draft_tokens=None)))["spec-rows-past-context"]
    assert f.confidence == "medium" and any("2 x num_draft_tokens" in s for s in f.next_steps)
    # malformed fields in a hand-edited dump: refused when read, naming the field (never a crash in a rule)
    with pytest.raises(DumpError, match="manifest.context.backend.speculative_num_draft_tokens: expected an integer"):
        edited(speculative_num_draft_tokens="4")
    with pytest.raises(DumpError, match="manifest.context.backend.max_context_len: expected an integer, got a list"):
        edited(max_context_len=[512])
    # so many draft tokens that no context length helps at this page size (2 x 8 >= 16)
    f = _by_rule(explain(edited(forward_mode="TARGET_VERIFY", speculative_num_draft_tokens=8, max_context_len=512)))[
        "spec-rows-past-context"]
    assert any("No --context-length avoids it" in s for s in f.next_steps)
    # rows further past the context length than speculation can explain: only the generic rule
    assert "spec-rows-past-context" not in _by_rule(explain(edited(forward_mode="TARGET_VERIFY",
                                                                 speculative_num_draft_tokens=1, max_context_len=512)))


def test_rules_do_not_fire_on_other_scenarios(real: dict[str, Dump]) -> None:
    # each scenario's own rule is the most certain; the allocator rule never fires on attention dumps
    for name in ("26957", "26957-high-fill", "drift", "negative", "stale", "seqlens", "spec_context",
                 "spec_draft_decode"):
        assert "swa-slot-out-of-range" not in _by_rule(explain(real[name])), name
    for name in ("26957", "26957-high-fill", "drift", "negative", "stale", "off-by-one"):
        assert "spec-rows-past-context" not in _by_rule(explain(real[name])), name
    assert _by_rule(explain(real["swa_slot"])).keys() == {"swa-slot-out-of-range"}
    free_rules = {"sglang-38269", "sglang-27779", "sglang-25805"}
    for name in ("26957", "26957-high-fill", "drift", "negative", "stale", "off-by-one", "swa_slot", "seqlens",
                 "spec_context"):
        assert not free_rules & _by_rule(explain(real[name])).keys(), name


@pytest.mark.parametrize("name, rule_id, kind", [
    ("38269", "sglang-38269", Kind.SWA_FREE_RESERVED_PAGE),
    ("27779", "sglang-27779", Kind.SWA_DOUBLE_FREE),
    ("25805", "sglang-25805", Kind.SWA_FREE_NOT_OWNED),
])
def test_free_path_bug_named(real: dict[str, Dump], name: str, rule_id: str, kind: Kind) -> None:
    d = real[name]
    assert d.kind == kind
    findings = explain(d)
    assert [f.rule for f in findings] == [rule_id]  # one rule per free kind
    f = findings[0]
    assert f.confidence == "high" and f"#{name}" in f.title
    assert any(f"injects {rule_id}" in e for e in f.evidence)
    v = d.manifest["violation"]
    assert any(f"first {v['value']}" in e for e in f.evidence)


def test_free_path_rules_without_the_injection(real: dict[str, Dump]) -> None:
    # the same kinds from faults kvtrap did not inject: named, no injection claimed
    page0 = explain(real["page0"])[0]
    assert page0.rule == "sglang-38269" and page0.confidence == "high"
    assert not any("injects" in e for e in page0.evidence)
    double = explain(real["double"])[0]
    assert double.rule == "sglang-27779" and double.confidence == "medium"  # not injected: #25805 possible too
    assert "#25805" in double.cause and "#25805" not in explain(real["27779"])[0].cause
    not_owned = explain(real["not_owned"])[0]
    assert not_owned.rule == "sglang-25805" and not_owned.confidence == "medium"
    d = real["not_owned"].manifest["violation"]["details"]
    assert any(f"handed out with full page {d['owner_full_page']}" in e for e in not_owned.evidence)


def test_no_rule_matched_is_an_empty_list(real: dict[str, Dump], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kvtrap.report.explain.RULES", [])
    assert explain(real["26957"]) == []


def test_padding_page_for_real_request(real: dict[str, Dump], tmp_path: Path) -> None:
    d = trapdumps.make_padding_page_dump(tmp_path / "padding", row=2, column=1)[0]
    dump = load_dump(d)
    assert dump.kind == Kind.PADDING_PAGE_FOR_REAL_REQUEST
    findings = explain(dump)
    assert findings[0].rule == "padding-page-for-real-request" and findings[0].confidence == "high"
    f = findings[0]
    # row 2 is request slot 3, 17 tokens = 2 live pages (from the dump's tensors)
    assert any("1 live entr(ies)" in e and "row 2 is request slot 3 with cache_seqlens 17 (2 live pages)" in e
               for e in f.evidence)
    # never on the other attention or allocator dumps (their real rows hold no page 0)
    for name, other in real.items():
        assert "padding-page-for-real-request" not in _by_rule(explain(other)), name


def test_kv_write_out_of_range(real: dict[str, Dump], tmp_path: Path) -> None:
    full = load_dump(trapdumps.make_kv_write_dump(tmp_path / "full")[0])
    assert full.kind == Kind.KV_WRITE_OUT_OF_RANGE
    findings = explain(full)
    assert [f.rule for f in findings] == ["kv-write-out-of-range"]
    f = findings[0]
    assert f.confidence == "high" and "allocator" in f.cause
    assert any("`out_cache_loc`[1] = 1040, outside [0, 1040) of the full pool (1 bad location(s) of 3)" in e
               for e in f.evidence)
    assert any("1 of 3 location(s) out of range, at positions 1" in e for e in f.evidence)
    swa = load_dump(trapdumps.make_kv_write_dump(tmp_path / "swa", swa=True)[0])
    f = explain(swa)[0]
    assert f.rule == "kv-write-out-of-range" and "translation" in f.cause
    loc = int(swa.tensors["out_cache_loc"][2])
    assert int(swa.tensors["swa_out_cache_loc"][2]) == loc
    assert any(f"full-pool location at that position is {loc}: the SWA location equals it (never translated)" in e
               for e in f.evidence)
    for name, other in real.items():
        assert "kv-write-out-of-range" not in _by_rule(explain(other)), name


def test_24394_named_on_the_injected_unified_extend(real: dict[str, Dump]) -> None:
    d = real["24394"]
    assert d.kind == Kind.INDEX_SPACE_MISMATCH
    findings = explain(d)
    assert [f.rule for f in findings] == ["sglang-24394"]  # not #26957: no page table in a ragged dump
    f = findings[0]
    assert f.confidence == "high" and "#24394" in f.title and "#24395" in f.cause
    assert any("injects sglang-24394" in e for e in f.evidence)
    out = d.tensors["out_cache_loc"]
    swa_rows = d.manifest["context"]["pools"]["swa"]["rows"]
    past = int((out >= swa_rows).sum())
    assert past > 0 and any(f"{past} of {out.size} of those ids are >= {swa_rows} (SWA pool rows)" in e for e in f.evidence)
    low = explain(real["24394-low-fill"])[0]
    assert low.rule == "sglang-24394" and any("not faulting yet" in e for e in low.evidence)


def test_ragged_kv_ids(real: dict[str, Dump]) -> None:
    oor = explain(real["triton-oor"])
    assert [f.rule for f in oor] == ["ragged-kv-ids"]
    v = real["triton-oor"].manifest["violation"]
    assert any(f"first bad id {v['value']} is >= {v['bound']} (SWA rows)" in e for e in oor[0].evidence)
    assert any("`window_kv_indices`: 1 of " in e for e in oor[0].evidence)
    indptr = explain(real["triton-indptr"])
    assert [f.rule for f in indptr] == ["ragged-kv-ids"] and "#26750" in indptr[0].cause
    for name, other in real.items():  # page-table and allocator dumps never get the ragged rules
        if name not in ("24394", "24394-low-fill", "triton-oor", "triton-indptr", "27737", "flashinfer-oor"):
            assert not {"ragged-kv-ids", "sglang-24394", "sglang-27737"} & _by_rule(explain(other)).keys(), name
    assert [f.rule for f in explain(real["flashinfer-oor"])] == ["ragged-kv-ids"]


def test_27737_named_on_the_injected_flashinfer_draft(real: dict[str, Dump]) -> None:
    findings = explain(real["27737"])
    assert [f.rule for f in findings] == ["sglang-27737"]  # not #26957, not the generic ragged rule
    f = findings[0]
    assert f.confidence == "high" and "#27737" in f.title
    assert any("injects sglang-27737" in e for e in f.evidence)
    assert any("planned with full-pool ids" in e for e in f.evidence)
    assert any("indices_updater_decode._swa_kv_pool is None" in e for e in f.evidence)


@pytest.mark.parametrize("name", ["24402", "24402-wrapped"])
def test_24402_named_on_fa3_speculative_swa_table(real: dict[str, Dump], name: str) -> None:
    # fa3's speculative SWA table built from full-pool ids: its own rule, not #26957's
    d = real[name]
    findings = _by_rule(explain(d))
    assert "sglang-26957" not in findings
    f = findings["sglang-24402"]
    assert explain(d)[0].rule == "sglang-24402" and f.confidence == "high" and "#24402" in f.title
    assert any("injects sglang-24402" in e for e in f.evidence)
    live = d.manifest["violation"]["count"]
    assert any(e.endswith("equal the untranslated full-pool id at the same position") for e in f.evidence)
    assert any("#24617" in s for s in f.next_steps) or "#24617" in f.cause
    if name == "24402-wrapped":
        assert any("(SWA pages): they read past the SWA k-cache" in e for e in f.evidence)
    else:
        assert d.kind == Kind.INDEX_SPACE_MISMATCH and live > 0


def test_24402_rule_ignores_other_attention_dumps(real: dict[str, Dump]) -> None:
    for name in ("26957", "26957-high-fill", "drift", "off-by-one", "negative", "stale", "seqlens", "spec_context",
                 "24394", "triton-oor", "27737", "flashinfer-oor"):
        assert "sglang-24402" not in _by_rule(explain(real[name])), name
