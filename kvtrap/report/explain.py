"""Diagnosis of a dump: explicit rules, each naming the evidence it used, how sure it is, and what to do.

A rule is a small function ``Facts -> Finding | None`` registered with :func:`rule`; :data:`RULES` keeps
them in the order they are tried. :func:`explain` runs every rule and returns the findings, most certain
first (ties keep registry order). An empty list means no rule matched: the CLI says so plainly instead of
guessing. Rules read the typed record (:attr:`kvtrap.record.dumpfile.Dump.record`) and the tensors,
never SGLang.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kvtrap.record.context import ABSENT, Context
from kvtrap.record.dumpfile import Dump, ManifestRecord
from kvtrap.record.kinds import Kind
from kvtrap.record.violation import Violation
from kvtrap.report.tables import (
    PAGE_TABLES,
    TableSummary,
    VectorSummary,
    in_gap,
    live_values,
    page_size_of,
    pool_pages,
    summarize_tables,
    summarize_vectors,
)

CONFIDENCE = ("high", "medium", "low")


@dataclass(frozen=True)
class Finding:
    rule: str  # stable id, e.g. "sglang-26957"
    title: str
    confidence: str  # "high", "medium" or "low"
    cause: str  # one or two sentences: what most likely happened
    evidence: list[str] = field(default_factory=list)  # facts read from the dump, with numbers
    next_steps: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Facts:
    """What the rules look at, computed once per dump."""

    dump: Dump
    record: ManifestRecord
    violation: Violation
    context: Context  # a piece the dump does not hold is None
    kind: str
    page_size: int
    pools: dict[str, int]  # pool -> pages
    layer_type: str | None
    layer_id: int | None
    tables: list[TableSummary]
    vectors: list[VectorSummary]

    @classmethod
    def of(cls, dump: Dump) -> Facts:
        rec = dump.record
        ctx, viol, layer = rec.context, rec.violation, rec.context.layer
        layer_id = layer.id if layer is not None else None
        return cls(
            dump=dump,
            record=rec,
            violation=viol,
            context=ctx,
            kind=str(viol.kind or rec.kind),
            page_size=page_size_of(rec),
            pools=pool_pages(rec),
            layer_type=(layer.type if layer is not None else None) or viol.layer_type,
            layer_id=layer_id if layer_id is not None else viol.layer_id,
            tables=summarize_tables(rec, dump.tensors),
            vectors=summarize_vectors(rec, dump.tensors),
        )

    def table(self, name: str) -> TableSummary | None:
        return next((t for t in self.tables if t.name == name), None)

    @property
    def handed(self) -> TableSummary | None:
        """The table the backend passes to this layer's kernel (context), else the violation's table."""
        for t in self.tables:
            if t.handed_to_layer:
                return t
        return self.table(str(self.violation.table))

    def vector(self, name: str) -> VectorSummary | None:
        return next((v for v in self.vectors if v.name == name), None)

    def live(self, name: str) -> np.ndarray | None:
        arr = self.dump.tensors.get(name)
        if arr is None or np.asarray(arr).ndim != 2:
            return None
        return live_values(arr, self.dump.tensors.get("cache_seqlens"), self.page_size)

    @property
    def layer(self) -> str:
        s = f"layer {self.layer_id}" if self.layer_id is not None else "the layer"
        return s + (f" ({self.layer_type.upper()})" if self.layer_type else "")

    def omitted(self) -> list[str]:
        return sorted(self.record.tensors_omitted or {})


Rule = Callable[[Facts], "Finding | None"]
RULES: list[tuple[str, Rule]] = []


def rule(rule_id: str) -> Callable[[Rule], Rule]:
    """Register a rule; rules are tried in registration order."""

    def deco(fn: Rule) -> Rule:
        RULES.append((rule_id, fn))
        return fn

    return deco


def _rows(rows: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f" (+{len(rows) - limit} more)" if len(rows) > limit else "")


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.0f}%" if b else "n/a"


def _same_as_full_table(f: Facts, name: str, swa: int, full: int) -> tuple[int, int] | None:
    """Of the live entries of table ``name`` in [swa, full), how many equal ``page_table`` there."""
    a, b = f.dump.tensors.get(name), f.dump.tensors.get("page_table")
    if a is None or b is None or np.shape(a) != np.shape(b):
        return None
    from kvtrap.report.tables import live_mask, live_pages

    s = f.dump.tensors.get("cache_seqlens")
    mask = live_mask(np.asarray(a), live_pages(s, f.page_size) if s is not None else None)
    gap = mask & in_gap(a, swa, full)
    n = int(gap.sum())
    same = int((gap & (np.asarray(a) == np.asarray(b))).sum())
    return (same, n) if n and same * 2 >= n else None


# ---------------------------------------------------------------------------------------------- rules
#: fa3's speculative SWA table (``swa_spec_metadata.page_table``) and its full-pool rows, as kvtrap dumps them
SPEC_SWA_TABLE = "swa_spec_page_table"
SPEC_SWA_FULL = SPEC_SWA_TABLE + "_full_ids"

@rule("sglang-26957")
def full_pool_ids_on_swa_layer(f: Facts) -> Finding | None:
    """An SWA layer reads full-pool page ids: the SWA translation was skipped (SGLang #26957)."""
    evidence: list[str] = []
    strong = False
    partial = False
    weak = False  # a few ids in the gap, nothing else: could as well be an off-by-one elsewhere
    swa, full = f.pools.get("swa"), f.pools.get("full")
    backend = f.context.backend
    if f.violation.table == SPEC_SWA_TABLE:
        return None  # fa3's speculative SWA table: its own rule (sglang-24402)
    if _ragged(f):
        return None  # ragged ids (triton, flashinfer): the ragged rules below

    if f.kind == Kind.SWA_STATE_DRIFT:
        strong = True
        details = f.violation.details
        fields = details.get("drift") if isinstance(details.get("drift"), dict) else details
        drift = "; ".join(f"{k}: {v}" for k, v in fields.items()) if fields else "no details"
        evidence.append(f"violation kind is {Kind.SWA_STATE_DRIFT}: backend SWA state cached at init disagrees with the live pool ({drift})")
    if f.layer_type == "swa":
        pt = f.table("page_table")
        handed_full = (pt is not None and pt.handed_to_layer) or (
            (f.context.tables or {}).get("page_table") is not None
            and f.context.tables["page_table"].handed_to_layer is True
        )
        if handed_full:
            strong = True
            evidence.append(f"{f.layer} was handed `page_table` (the full-pool table), not `swa_page_table`")
        if f.kind == Kind.INDEX_SPACE_MISMATCH and not handed_full:
            strong = True
            evidence.append(f"violation kind is {Kind.INDEX_SPACE_MISMATCH} on {f.layer}: {f.violation.summary}")
        if swa is not None and full is not None and swa < full:
            t = f.handed or f.table("page_table")
            vals = f.live(t.name) if t is not None else None
            if vals is not None and vals.size:
                gap = int(in_gap(vals, swa, full).sum())
                beyond = int((vals >= full).sum())
                if gap:
                    evidence.append(
                        f"{gap} of {vals.size} live ids in `{t.name}` on {f.layer} are >= {swa} (SWA pages)"
                        f" and < {full} (full pages){'' if not beyond else f'; {beyond} are >= {full}'}"
                    )
                    same = _same_as_full_table(f, t.name, swa, full) if t.name != "page_table" else None
                    if same:
                        strong = True
                        evidence.append(
                            f"{same[0]} of those {same[1]} entries equal `page_table` at the same position:"
                            " the full-pool id was copied without translation"
                        )
                    elif strong or (beyond == 0 and gap * 2 >= vals.size):
                        partial = True
                    else:
                        weak = True
                elif strong:
                    evidence.append(
                        f"all {vals.size} live ids in `{t.name}` are still < {swa} (SWA pages): not faulting yet,"
                        " but they index the wrong pool (the fault comes once the full pool fills past the SWA size)"
                    )
            else:
                v = f.violation.value
                if isinstance(v, int) and swa <= v < full:
                    partial = True
                    evidence.append(f"first bad id {v} is >= {swa} (SWA pages) and < {full} (full pages) (tables not in the dump)")
    if not (strong or partial or weak):
        return None
    if backend is not None:
        if backend.use_sliding_window_kv_pool is False and swa is not None:
            evidence.append("backend.use_sliding_window_kv_pool is False although the live pool has an SWA sub-pool")
        if backend.swa_kv_pool_is_live is False:
            evidence.append(f"backend's cached SWA pool is not the live pool's (swa_kv_pool={backend.swa_kv_pool!r})")
        if backend.has_swa_full_to_swa_mapping is False or backend.swa_mapping_is_live is False:
            evidence.append("backend's full->SWA index mapping is missing or stale")
    lp = f.context.live_pool
    if lp is not None and lp.class_:
        mode = f.context.forward_mode if f.context.forward_mode is not None else "?"
        evidence.append(f"live pool at forward time: {lp.class_} (forward mode {mode})")
    steps = [
        "Check the draft worker's TRTLLMHAAttnBackend: `_swa_kv_pool` / `use_sliding_window_kv_pool` must come from"
        " the live (target) SWAKVPool, not from the draft runner's own pool (SGLang PRs #26966 / #27491 fixed this).",
        "If you run an SGLang build from main between PR #25103 and those fixes, upgrade to a release >= 0.5.13,"
        " or keep KVTRAP_FIX=auto (the default) so kvtrap applies its lockstep fix where the live build has the bug.",
        "If the backend swaps `token_to_kv_pool` at forward time (frozen-KV views), refresh its SWA state"
        " (`_swa_kv_pool`, `_swa_full_to_swa_mapping`, SWA page-table buffers) in the same place.",
    ]
    if _injected(f, "sglang-26957"):
        steps.insert(0, "This dump was armed with KVTRAP_INJECT=sglang-26957: the bug was re-introduced on purpose.")
    on_swa = f.layer_type == "swa"
    title = (
        "Full-pool page ids on an SWA layer: SWA translation skipped (SGLang #26957 signature)"
        if on_swa
        else "Backend SWA state is stale: cached at init, not the live pool's (the root cause of SGLang #26957)"
    )
    return Finding(
        rule="sglang-26957",
        title=title,
        confidence="high" if strong else "medium" if partial else "low",
        cause="The backend's SWA state is stale (cached at init from another pool), so the SWA layer reads"
        " full-pool page ids; ids >= the SWA page count read past the SWA k-cache: illegal address.",
        evidence=evidence,
        next_steps=steps,
    )


@rule("negative-id")
def negative_sentinel(f: Facts) -> Finding | None:
    """A negative id (the -1 sentinel) inside a row's live prefix."""
    evidence: list[str] = []
    minus_one = True
    for t in f.tables:
        if not t.negative:
            continue
        rows = [r for r in t.rows if r.negative]
        arr = np.asarray(f.dump.tensors[t.name])
        vals = np.unique(f.live(t.name) if f.live(t.name) is not None else arr)
        negs = sorted(int(v) for v in vals if v < 0)
        minus_one = minus_one and negs == [-1]
        first = rows[0]
        cols = [c for c in first.first_bad if arr[first.row, c] < 0]
        evidence.append(
            f"`{t.name}`: {t.negative} negative id(s) ({', '.join(map(str, negs[:4]))}) inside the live prefix of"
            f" {len(rows)} row(s): {_rows([r.row for r in rows])}; first at row {first.row}, column(s) {_rows(cols, 4)}"
            f" of {first.live} live"
        )
    if not evidence:
        v = f.violation.value
        if isinstance(v, int) and v < 0 and f.violation.table not in (f.dump.tensors or {}):
            evidence.append(f"the violation's first bad value is {v} (row {f.violation.row}, column {f.violation.column}); tables not in the dump")
            minus_one = v == -1
        else:
            return None
    swa_side = any(t.pool == "swa" and t.negative for t in f.tables)
    cause = (
        "A -1 sentinel reached the kernel inside a row's live prefix: a page that was never written"
        " (req_to_token still holds its fill value) or an SWA translation of a page that has no SWA slot"
        " (evicted from the window, or a negative full->SWA mapping entry)."
    )
    steps = [
        "Find who should have written these positions: req_to_token for the request (req_pool_indices in the dump)"
        " and, for SWA tables, full_to_swa_index_mapping of the matching full pages.",
        "If the page left the sliding window, the backend must not hand it to the kernel (window_left / page"
        " offset); check the SWA eviction path against cache_seqlens.",
    ]
    if swa_side:
        evidence.append("the negative ids are in an SWA table: look at the full->SWA translation first")
    return Finding(
        rule="negative-id",
        title="A negative page id (-1 sentinel) inside a row's live prefix",
        confidence="high" if minus_one else "low",
        cause=cause,
        evidence=evidence,
        next_steps=steps,
    )


@rule("stale-row")
def ids_beyond_every_pool(f: Facts) -> Finding | None:
    """Ids beyond every pool: an uninitialised or stale row (e.g. cache_seqlens longer than the written prefix)."""
    if not f.pools:
        return None
    top = max(f.pools.values())
    evidence: list[str] = []
    tails = 0
    bad_rows_total = 0
    for t in f.tables:
        arr = np.asarray(f.dump.tensors[t.name]).astype(np.int64)
        rows_hit: list[int] = []
        n_beyond = 0
        for r in t.rows:
            if not r.live:
                continue
            live = arr[r.row, : r.live]
            beyond = np.flatnonzero(live >= top)
            if not beyond.size:
                continue
            rows_hit.append(r.row)
            n_beyond += beyond.size
            first = int(beyond[0])
            # a suffix of garbage after a valid prefix: the row was written for `first` pages only
            if first > 0 and beyond.size == r.live - first:
                tails += 1
                if tails <= 3:
                    written_tokens = first * f.page_size
                    evidence.append(
                        f"`{t.name}` row {r.row}: columns {first}..{r.live - 1} (all {beyond.size} after column {first - 1})"
                        f" hold ids >= {top} (e.g. {int(live[first])}), columns 0..{first - 1} are valid: the row looks"
                        f" written for {first} page(s) (<= {written_tokens} tokens) but cache_seqlens is {r.seqlen}"
                    )
            elif beyond.size == r.live:
                if len(rows_hit) <= 3:
                    evidence.append(f"`{t.name}` row {r.row}: all {r.live} live ids are >= {top} (e.g. {int(live[0])}): never written")
        if rows_hit:
            bad_rows_total += len(rows_hit)
            evidence.insert(
                0,
                f"`{t.name}`: {n_beyond} live id(s) in {len(rows_hit)} row(s) ({_rows(rows_hit)}) are >= {top},"
                f" beyond every pool ({', '.join(f'{k}: {v} pages' for k, v in sorted(f.pools.items()))});"
                f" largest live id {t.max}",
            )
    if not bad_rows_total:
        v = f.violation.value
        if isinstance(v, int) and v >= top and not f.tables and f.violation.table in PAGE_TABLES:
            evidence.append(f"the violation's first bad value {v} is >= {top}, beyond every pool (tables not in the dump)")
            return Finding(
                rule="stale-row",
                title="Page ids beyond every pool: an uninitialised or stale row",
                confidence="low",
                cause="A page-table row holds ids no pool has: it was not (fully) written for this step.",
                evidence=evidence,
                next_steps=["Re-run with a larger KVTRAP_MAX_DUMP_MB so the tables are kept, then explain again."],
            )
        return None
    conf = "high" if tails and tails == bad_rows_total else "medium"
    if tails:
        cause = (
            "cache_seqlens is longer than the prefix the page-table builder wrote: the tail of the live prefix is"
            " stale/uninitialised buffer content (torch.empty), read as page ids."
        )
    else:
        cause = "Whole rows hold ids no pool has: the row was not written for this step (stale or uninitialised row)."
    return Finding(
        rule="stale-row",
        title="Page ids beyond every pool: an uninitialised or stale row",
        confidence=conf,
        cause=cause,
        evidence=evidence,
        next_steps=[
            "Compare cache_seqlens with the request's real length (seq_lens in the scheduler batch, req_to_token"
            " entries): an extra speculative step or a retracted request that kept its old length would do this.",
            "Check the metadata path that fills the table for this forward mode (eager `trtllm_mha_page_table` or the"
            " in-graph `trtllm_mha_graph_metadata` kernel) writes ceil(cache_seqlens / page_size) pages per row.",
            "Under CUDA graphs, check the row belongs to a live request (padding rows must have cache_seqlens 0).",
        ],
    )


@rule("swa-slot-out-of-range")
def allocator_swa_slot(f: Facts) -> Finding | None:
    """The SWA allocator handed out a slot beyond the SWA pool: free-list corruption or double free."""
    if f.kind != Kind.SWA_SLOT_OUT_OF_RANGE:
        return None
    v = f.violation
    lo, hi = v.lower, v.bound
    evidence = [
        f"violation kind is {Kind.SWA_SLOT_OUT_OF_RANGE} in {v.where or f.context.hook or '?'}:"
        f" slot {v.value} at position {v.row if v.row is not None else v.column}"
        f" is outside [{lo}, {hi})"
    ]
    ctx = f.context
    if ctx.size_swa is not None:
        evidence.append(
            f"allocator sizes: size_swa={ctx.size_swa} tokens, size_full={ctx.size_full} tokens,"
            f" page_size={f.page_size}: valid SWA slots are [page_size, size_swa + page_size)"
        )
    vec = f.vector(str(v.table or "out_swa_indices")) or f.vector("out_swa_indices")
    double = False
    if vec is not None:
        evidence.append(
            f"`{vec.name}`: {vec.bad} of {vec.size} returned slot(s) out of range (min {vec.min}, max {vec.max});"
            f" first at index(es) {_rows(list(vec.first_bad), 4)}"
        )
        arr = np.asarray(f.dump.tensors[vec.name]).astype(np.int64).reshape(-1)
        pages = arr // max(f.page_size, 1)
        uniq, counts = np.unique(arr, return_counts=True)
        dup_slots = uniq[counts > 1]
        if dup_slots.size:
            double = True
            evidence.append(f"{dup_slots.size} SWA slot(s) handed out twice in one call (e.g. {int(dup_slots[0])}): a page is on the free list twice")
        bad_pages = sorted({int(p) for p in pages[(arr < (lo or 0)) | (arr >= (hi if hi is not None else np.iinfo(np.int64).max))]})
        if bad_pages:
            evidence.append(f"out-of-range SWA page(s): {_rows(bad_pages, 6)} (the SWA pool has {(f.pools.get('swa') or '?')} pages incl. page 0)")
    full = f.vector("out_full_indices")
    if full is not None:
        evidence.append(f"`out_full_indices` (full pool) look sane: min {full.min}, max {full.max}, {full.size} slot(s)")
    free = ctx.free_pages or {}
    if free:
        evidence.append(f"free pages after the call: full {free.get('full')}, swa {free.get('swa')}")
    return Finding(
        rule="swa-slot-out-of-range",
        title="The allocator handed out an SWA slot beyond the SWA pool: free-list corruption or double free",
        confidence="high",
        cause=(
            "The SWA sub-allocator's free list held a page id that is not in the pool"
            + (" and pages were handed out twice (double free)" if double else "")
            + ": something freed a bad or already-free page, or wrote into free_pages directly."
        ),
        evidence=evidence,
        next_steps=[
            "Re-run with SGLANG_DEBUG_MEMORY_POOL=1 (SGLang's allocator uniqueness/alignment asserts) to catch the bad free.",
            "Audit SWA free paths: free_swa / eviction of out-of-window pages, release of retracted or aborted requests,"
            " and any code that edits swa_attn_allocator.free_pages directly.",
            "Check full_to_swa_index_mapping: a freed mapping entry must go back to 0, not be freed a second time.",
        ],
    )


@dataclass(frozen=True)
class SpecOverflow:
    """Rows of a speculative forward that run past the context length the page table was sized for."""

    table: TableSummary
    rows: list[int]
    longest: int  # longest cache_seqlens among them
    context_len: int | None  # backend.max_context_len (None: dump from before it was recorded)
    draft_tokens: int | None  # backend.speculative_num_draft_tokens
    mode_known: bool  # the dump says the forward is speculative (device-guard dumps carry no mode)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def spec_margin(draft_tokens: int) -> int:
    """How far past the context length a speculative row can reach in SGLang 0.5.23, rounded up to
    ``2 x num_draft_tokens``. Why (read from its code): max_new_tokens is clipped so input + max_new <=
    context_len - 2; a verify row is seq_lens + num_draft_tokens; under the default overlap scheduler one
    more step is scheduled before the previous result finishes the request, and that step's seq_lens already
    includes up to num_draft_tokens accepted tokens: rows up to context_len + 2 x num_draft_tokens - 5
    (draft-decode rows, seq_lens + step + 1, stay below that)."""
    return 2 * draft_tokens


def _spec_overflow(f: Facts) -> SpecOverflow | None:
    """An overflow on a speculative forward (TARGET_VERIFY / DRAFT_*, or DECODE of a batch carrying
    spec_info, i.e. the draft's decode steps) that lies within :func:`spec_margin` of the context length,
    on the table sized from it (``ceil(context_len / page_size)`` columns)."""
    mode = str(f.context.forward_mode or "")
    backend = f.context.backend
    ctx = _int(backend.max_context_len) if backend is not None else None
    draft = _int(backend.speculative_num_draft_tokens) if backend is not None else None
    mode_known = "VERIFY" in mode or "DRAFT" in mode or f.context.speculative is True
    # no forward mode (device-guard dumps): only when the backend runs speculative decoding at all
    if not mode_known and (mode or not draft or draft < 2 or ctx is None):
        return None
    p = f.page_size
    for t in f.tables:
        over = [r for r in t.overflowing_rows if r.seqlen is not None]
        if not over or t.handed_to_layer is False or p <= 0:
            continue
        longest = max(int(r.seqlen) for r in over)  # type: ignore[arg-type]
        if ctx is not None:
            if -(-ctx // p) != t.width or any(int(r.seqlen) <= ctx for r in over):  # type: ignore[arg-type]
                continue
            if draft is not None and longest > ctx + spec_margin(draft):
                continue
        elif longest - t.width * p > p:  # older dump: only a one-page overflow is plausible
            continue
        return SpecOverflow(t, [r.row for r in over], longest, ctx, draft, mode_known)
    return None


@rule("spec-rows-past-context")
def spec_rows_past_context(f: Facts) -> Finding | None:
    """Speculative rows near the context limit need more pages than the backend's table has (trtllm_mha, fa3)."""
    backend_cls = f.context.backend.class_ if f.context.backend is not None else None
    fa3 = backend_cls == "FlashAttentionBackend"
    backend = "fa3" if fa3 else "trtllm_mha"
    sizing = (
        "fa3 sizes its CUDA-graph page table at ceil(context_len / page_size) columns and its eager one at the"
        " req_to_token width" if fa3 else "trtllm_mha sizes its page table at ceil(context_len / page_size) columns"
    )
    so = _spec_overflow(f)
    if so is None:
        return None
    t, p = so.table, f.page_size
    width = t.width
    mode = f.context.forward_mode or "not recorded (device guard)"
    if f.context.speculative is True and "VERIFY" not in str(mode) and "DRAFT" not in str(mode):
        mode = f"{mode} of a speculative batch (spec_info set: a draft decode step)"
    evidence = [
        f"forward mode {mode}; `{t.name}` is {width} pages x {p} tokens = {width * p} tokens wide;"
        f" row(s) {_rows(so.rows)} need more (longest cache_seqlens {so.longest})",
    ]
    if so.context_len is not None:
        evidence.append(
            f"backend.max_context_len = {so.context_len} (the table width is ceil({so.context_len} / {p}) = {width});"
            f" the longest row is {so.longest - so.context_len} token(s) past it"
            + (f", within 2 x {so.draft_tokens} draft tokens" if so.draft_tokens else "")
        )
    steps = []
    margin = spec_margin(so.draft_tokens) if so.draft_tokens else None
    if margin is not None and margin < p:
        steps.append(
            f"Workaround: serve with --context-length {width * p - margin} (= {width * p} - 2 x {so.draft_tokens}"
            f" draft tokens): requests stop earlier, and the rows of their last speculative steps still fit the"
            f" {width}-page table."
        )
    elif margin is not None:
        steps.append(
            f"No --context-length avoids it at page size {p}: 2 x {so.draft_tokens} draft tokens is a page or more"
            " of overshoot. Use fewer draft tokens or a larger page size, or the upstream fix below."
        )
    else:
        steps.append(
            "Workaround: serve with --context-length lowered by 2 x num_draft_tokens from a page multiple, so the"
            " rows of a request's last speculative steps still fit the table."
        )
    steps += [
        "Or cap max_new_tokens so that input + max_new_tokens + 2 x num_draft_tokens stays within the table"
        f" ({width * p} tokens).",
        f"Upstream fix: size {backend}'s page table (max_num_pages) for context_len + 2 x num_draft_tokens, or stop"
        " scheduling a speculative step for a request that the step in flight may finish.",
    ]
    confident = so.context_len is not None and so.draft_tokens is not None and so.mode_known
    return Finding(
        rule="spec-rows-past-context",  # sizing / backend: the backend whose table is too narrow
        title="speculative rows run past the context length: the page table is too narrow for them",
        confidence="high" if confident else "medium",
        cause=(
            "Near the length limit SGLang still runs speculative steps whose rows (seq_lens + draft tokens) reach"
            " past context_len: up to about 2 x num_draft_tokens under the default overlap scheduler, which"
            " schedules one more step before the previous one finishes the request (req_to_token keeps"
            f" 4 + num_draft_tokens spare columns). {sizing}, so those rows have no column for their last page:"
            " the attention kernel would read page ids from the next row or past the table"
            + ("" if fa3 else ", and in eager mode SGLang's table builder writes the missing page id into the next"
               " row's first column (a live neighbour request) or past the buffer") + "."
            " Reachable in SGLang 0.5.23 when the context length is a page multiple or just below one (read from"
            " its code; not seen on a server)."
        ),
        evidence=evidence,
        next_steps=steps,
    )


@rule("seqlens-exceed-table")
def seqlens_exceed_table(f: Facts) -> Finding | None:
    """cache_seqlens needs more pages than the page table is wide."""
    evidence: list[str] = []
    for t in f.tables:
        over = t.overflowing_rows
        if not over:
            continue
        worst = max(over, key=lambda r: r.needed)
        evidence.append(
            f"`{t.name}` is {t.width} page(s) wide; {len(over)} row(s) ({_rows([r.row for r in over])}) need more:"
            f" row {worst.row} has cache_seqlens {worst.seqlen} = {worst.needed} pages of {f.page_size} tokens"
        )
    if not evidence and f.kind != Kind.SEQLENS_EXCEED_TABLE:
        return None
    if not evidence:
        d = f.violation.details
        evidence.append(f"violation: {f.violation.get('summary', '')} {d if d else ''}".strip())
    return Finding(
        rule="seqlens-exceed-table",
        title="cache_seqlens needs more pages than the page table is wide",
        # the specific rule above names the cause when the rows are speculative ones at the context limit
        confidence="medium" if _spec_overflow(f) is not None else "high",
        cause=(
            "A row's length runs past the table's last column, so the kernel would read page ids from beyond the"
            " row (the next row or unallocated memory): the table was sized for a shorter context than the batch has."
        ),
        evidence=evidence,
        next_steps=[
            "Compare the table width (max_num_pages, from the model's context length) with the longest request,"
            " including speculative draft tokens added on top of seq_lens.",
            "Check cache_seqlens is not stale (a retracted or finished request keeping its old length) and that"
            " padding rows under CUDA graphs carry length 0.",
        ],
    )


# ------------------------------------------------------------------------ page 0 for real requests
def _padding_page_hits(f: Facts) -> tuple[list[int], int, np.ndarray, np.ndarray] | None:
    """(rows, entries, req slots, seqlens) of the full table's live page-0 entries in rows of real request
    slots, from the dump's tensors; ``None`` when the dump lacks them."""
    t = f.dump.tensors
    table, slots, lens = t.get("page_table"), t.get("req_pool_indices"), t.get("cache_seqlens")
    if table is None or slots is None or lens is None or np.asarray(table).ndim != 2:
        return None
    table, slots, lens = np.asarray(table), np.asarray(slots).reshape(-1), np.asarray(lens).reshape(-1)
    rows = min(table.shape[0], slots.shape[0], lens.shape[0])
    live = (np.asarray(lens[:rows], dtype=np.int64) + f.page_size - 1) // f.page_size
    mask = (np.arange(table.shape[1])[None, :] < live[:, None]) & (table[:rows] == 0) & (slots[:rows, None] != 0)
    hit_rows = [int(r) for r in np.flatnonzero(mask.any(axis=1))]
    return hit_rows, int(mask.sum()), slots, lens


@rule("padding-page-for-real-request")
def padding_page_for_real_request(f: Facts) -> Finding | None:
    """A real request's live page-table row reads the reserved padding page 0."""
    hits = _padding_page_hits(f)
    evidence: list[str] = []
    if hits is not None and hits[0]:
        rows, entries, slots, lens = hits
        first = rows[0]
        evidence.append(
            f"`page_table`: {entries} live entr(ies) equal to page 0 in {len(rows)} row(s) of real request slots:"
            f" {_rows(rows)}; row {first} is request slot {int(slots[first])} with cache_seqlens {int(lens[first])}"
            f" ({(int(lens[first]) + f.page_size - 1) // f.page_size} live pages)"
        )
        pads = int(((slots == 0)).sum())
        if pads:
            evidence.append(f"{pads} row(s) of request slot 0 (CUDA-graph padding) are not counted: they may read page 0")
    elif f.kind == Kind.PADDING_PAGE_FOR_REAL_REQUEST:
        v = f.violation
        d = v.details or {}
        evidence.append(
            f"violation: row {v.row} (request slot {d.get('req_pool_index', '?')}), column {v.column} is page 0;"
            " the tables are not in the dump"
        )
    else:
        return None
    return Finding(
        rule="padding-page-for-real-request",
        title="A real request reads the reserved padding page 0",
        confidence="high",
        cause=(
            "Page 0 is reserved: CUDA-graph padding rows (request slot 0) read it and padded tokens write their"
            " dummy K/V there. A real request's row holding it means its req_to_token entries at those positions"
            " were never written or were cleared (0 is their fill value), e.g. a request freed, retracted or"
            " reused while still in the batch, or a prefix-cache hit whose slots were not copied in. The kernel"
            " does not fault: it attends over garbage and the output is silently wrong."
        ),
        evidence=evidence,
        next_steps=[
            "Check req_to_token[req_pool_index, :cache_seqlens] for the row (the dump has req_pool_indices): which"
            " positions are 0, and who should have written them (alloc_extend / the prefix match / the retract path).",
            "Check the request slot is still owned by that request (not freed and reused between scheduling and"
            " the forward).",
        ],
    )


# ---------------------------------------------------------------------------------- KV write path
@rule("kv-write-out-of-range")
def kv_write_out_of_range(f: Facts) -> Finding | None:
    """A layer's K/V store was about to write outside the pool it writes."""
    if f.kind != Kind.KV_WRITE_OUT_OF_RANGE:
        return None
    v = f.violation
    d = v.details or {}
    name = str(v.table or "out_cache_loc")
    evidence = [
        f"{f.layer} would store K/V at `{name}`[{v.row}] = {v.value}, outside [0, {v.bound}) of the {v.pool} pool"
        f" ({v.count} bad location(s) of {f.context.num_tokens if f.context.has('num_tokens') else '?'})"
    ]
    locs = f.dump.tensors.get(name)
    if locs is not None:
        arr = np.asarray(locs).reshape(-1)
        bad = (arr < 0) | (arr >= int(v.bound))
        evidence.append(f"`{name}` in the dump: {int(bad.sum())} of {arr.size} location(s) out of range,"
                        f" at positions {_rows([int(i) for i in np.flatnonzero(bad)])}")
    full_loc = d.get("out_cache_loc")
    swa_pages = f.pools.get("swa")
    untranslated = name == "swa_out_cache_loc" and full_loc is not None and full_loc == v.value
    if name == "swa_out_cache_loc" and full_loc is not None:
        evidence.append(
            f"the full-pool location at that position is {full_loc}"
            + (": the SWA location equals it (never translated)" if untranslated else "")
        )
    if name == "swa_out_cache_loc":
        cause = (
            "The SWA write location is not a slot of the SWA pool: the full->SWA translation of out_cache_loc"
            " (swa_out_cache_loc, built once per forward by init_forward_metadata) was skipped, read a stale or"
            " foreign full_to_swa_index_mapping, or the mapping holds garbage for those slots."
        )
        steps = [
            "Compare swa_out_cache_loc with full_to_swa_index_mapping[out_cache_loc] for this batch; check the"
            " backend's cached SWA pool/mapping is the live pool's (kvtrap's drift check) and that the CUDA-graph"
            " buffer was refreshed for this batch size.",
        ]
        if swa_pages:
            steps.append(f"The SWA pool has {swa_pages} pages; a value below the full pool's rows but above the SWA"
                         " pool's is a full-pool id written into the SWA pool.")
    else:
        cause = (
            "out_cache_loc holds a slot outside the KV pool: the allocator handed out a bad slot (a corrupt free"
            " list, a double free), or out_cache_loc is stale or uninitialised for this batch (a retracted request,"
            " a padded batch whose locations were not filled). A negative location would silently write the pool's"
            " last rows."
        )
        steps = [
            "Check where out_cache_loc came from for this batch (alloc_extend / alloc_decode results) and whether"
            " the allocator trap or free checks fired earlier (kvtrap dump ls).",
            "Run with SGLANG_DEBUG_MEMORY_POOL=1 to catch the allocator state going bad.",
        ]
    return Finding(
        rule="kv-write-out-of-range",
        title="A K/V store would write outside the pool it writes",
        confidence="high",
        cause=cause,
        evidence=evidence,
        next_steps=steps,
    )


# ----------------------------------------------------------------------------- ragged KV ids (triton)
_RAGGED = ("kv_indices", "window_kv_indices", "aligned_window_kv_indices")


def _ragged(f: Facts) -> bool:
    """A dump of a ragged (CSR) KV read: the triton backend's kv_indices / window rails."""
    return any(name in (f.context.tables or {}) for name in _RAGGED)


def _rows_of(f: Facts, pool: str) -> int | None:
    info = (f.context.pools or {}).get(pool)
    return None if info is None or info.rows in (None, ABSENT) else int(info.rows)


@rule("sglang-24394")
def untranslated_unified_extend(f: Facts) -> Finding | None:
    """An SWA layer's unified (deterministic) extend appends full-pool ids (SGLang #24394)."""
    d = f.violation.details or {}
    if not (f.kind == Kind.INDEX_SPACE_MISMATCH and f.layer_type == "swa" and d.get("extend_ids") == "out_cache_loc"):
        return None
    evidence = [f"{f.layer} in {f.violation.where}: the ids appended to its window rail for the current tokens are"
                " `out_cache_loc` (full-pool slots), not `swa_out_cache_loc`"]
    injected = _injected(f, "sglang-24394", evidence)
    swa_rows, full_rows = _rows_of(f, "swa"), _rows_of(f, "full")
    out = f.dump.tensors.get("out_cache_loc")
    if out is not None and swa_rows is not None:
        arr = np.asarray(out).astype(np.int64).reshape(-1)
        past = int((arr >= swa_rows).sum())
        evidence.append(f"{past} of {arr.size} of those ids are >= {swa_rows} (SWA pool rows)"
                        + (f" and < {full_rows} (full pool rows): reads past the SWA pool" if past and full_rows else
                           ": not faulting yet, but reading other tokens' SWA K/V"))
    return Finding(
        rule="sglang-24394",
        title="Deterministic (unified) extend hands an SWA layer untranslated full-pool ids (SGLang #24394)",
        confidence="high",
        cause=(
            "The triton backend's unified extend merges each request's prefix (the translated window rail) with its"
            " current tokens' ids; for an SWA layer those must be the full->SWA translated `swa_out_cache_loc`."
            " Using `out_cache_loc` reads the SWA pool at full-pool slots: wrong keys, then an illegal address once"
            " the ids pass the SWA pool's rows (fixed upstream by PR #24395)."
            + ("" if injected else " Any code path that picks the current tokens' ids by layer must do the same.")
        ),
        evidence=evidence,
        next_steps=[
            "Translate the current tokens' ids for SWA layers before build_unified_kv_indices (the metadata's"
            " swa_out_cache_loc, as the K/V store uses).",
            "Until then, run without --enable-deterministic-inference on hybrid-SWA models with the triton backend.",
        ],
    )


def _flashinfer_stale_pool(f: Facts) -> bool:
    """A flashinfer dump whose backend resolved no (or another) SWA pool while the live pool is one."""
    drift = (f.violation.details or {}).get("drift") or {}
    backend = f.context.backend
    return (backend is not None and backend.class_ == "FlashInferAttnBackend" and "_swa_kv_pool" in drift
            and f.kind in (Kind.INDEX_SPACE_MISMATCH, Kind.SWA_STATE_DRIFT))


@rule("sglang-27737")
def flashinfer_swa_pool_from_allocator(f: Facts) -> Finding | None:
    """flashinfer's SWA pool resolved from the allocator, not the active pool (SGLang #27737)."""
    if not _flashinfer_stale_pool(f):
        return None
    drift = f.violation.details["drift"]
    evidence = ["backend (FlashInferAttnBackend) cached state vs the live pool: "
                + "; ".join(f"{k} is {v}" for k, v in drift.items())]
    window = (f.context.tables or {}).get("window_kv_indices")
    if window is not None and window.pool == "full" and "swa" in f.pools:
        evidence.append("the window wrapper (wrapper 0) was planned with full-pool ids: the indices updater had no"
                        " SWA pool to translate with")
    if f.kind == Kind.INDEX_SPACE_MISMATCH:
        evidence.append(f"{f.layer} runs on it: {f.violation.summary}")
    injected = _injected(f, "sglang-27737", evidence)
    return Finding(
        rule="sglang-27737",
        title="flashinfer resolved its SWA pool from the allocator, not the active pool (SGLang #27737)",
        confidence="high" if injected or f.kind == Kind.INDEX_SPACE_MISMATCH else "medium",
        cause=(
            "FlashInferAttnBackend decides at init whether it serves an SWA pool, and its indices updaters copy that"
            " decision. Decided from the allocator (its type and kvcache) instead of the runner's active pool, a"
            " runner whose active pool is an SWA pool (DFlash drafts of Gemma 4) gets none: window layers read"
            " untranslated full-pool slots from the SWA pool and SWA write locations are not built (fixed by PR"
            " #27737, aligned with trtllm_mha's #27491)."
        ),
        evidence=evidence,
        next_steps=[
            "Resolve the SWA pool from model_runner.token_to_kv_pool first (FlashInferAttnBackend._resolve_swa_kv_pool"
            " in 0.5.23 does), and refresh the indices updaters' _swa_kv_pool with the backend's.",
            "If the backend's pool is swapped at forward time (speculative views), update that state in the same place.",
        ],
    )


@rule("ragged-kv-ids")
def ragged_kv_ids(f: Facts) -> Finding | None:
    """A ragged kv_indptr / kv_indices set that is malformed or holds ids outside the pool the layer reads."""
    if not _ragged(f) or f.kind not in (Kind.KV_INDICES_OUT_OF_RANGE, Kind.KV_INDPTR_MALFORMED,
                                        Kind.INDEX_SPACE_MISMATCH, Kind.SWA_STATE_DRIFT):
        return None
    v = f.violation
    d = v.details or {}
    if (f.kind == Kind.INDEX_SPACE_MISMATCH and d.get("extend_ids") == "out_cache_loc") or _flashinfer_stale_pool(f):
        return None  # sglang-24394 / sglang-27737
    evidence = [f"violation kind is {f.kind} on {f.layer} in {v.where}: {v.summary}"]
    if f.kind == Kind.KV_INDPTR_MALFORMED:
        cause = ("The CSR offsets the kernel walks are broken, so the ranges it reads are not the requests':"
                 " indptr was built from lengths that do not match the ids (a stale seq_lens_sum sizing kv_indices,"
                 " SGLang #26750), or a CUDA-graph buffer was not refreshed for this batch.")
        steps = ["Compare kv_indptr with cumsum(seq_lens) (prefix lens for an extend) of this batch.",
                 "Check which lengths sized kv_indices (seq_lens_sum) and whether they were refreshed this step."]
    elif f.kind == Kind.KV_INDICES_OUT_OF_RANGE:
        rows = _rows_of(f, str(v.pool))
        cause = (f"A live id is not a slot of the {v.pool} pool the layer reads: the ids were gathered from a stale"
                 " or corrupt req_to_token row, or (SWA layer) not translated from full-pool slots.")
        ids = f.dump.tensors.get(str(v.table))
        if ids is not None and rows is not None:
            arr = np.asarray(ids).astype(np.int64).reshape(-1)
            evidence.append(f"`{v.table}`: {int(((arr < 0) | (arr >= rows)).sum())} of {arr.size} entries outside"
                            f" [0, {rows}) (the tail past the last offset included)")
        full_rows = _rows_of(f, "full")
        if f.layer_type == "swa" and rows is not None and full_rows and isinstance(v.value, int) and rows <= v.value < full_rows:
            evidence.append(f"first bad id {v.value} is >= {rows} (SWA rows) and < {full_rows} (full rows): a full-pool"
                            " slot on an SWA layer (translation skipped?)")
        steps = ["Check req_to_token for the request (row) named, and full_to_swa_index_mapping for SWA layers."]
    elif f.kind == Kind.SWA_STATE_DRIFT:
        cause = ("The backend decided at init (from the model runner's pool) that it serves no SWA pool, but the live"
                 " pool is one: SWA write locations are not translated and window rails may not be.")
        steps = ["Check which pool the backend was built with (draft workers, speculative pool views)."]
    else:
        cause = ("The layer is handed the index set of the other pool: its ids address the wrong pool (the model's"
                 " sliding-window config disagrees with the pool's layers_mapping, or a path picked the wrong rail).")
        steps = ["Compare the layer's sliding_window_size with the live pool's layers_mapping for that layer."]
    return Finding(rule="ragged-kv-ids", title="Ragged KV ids the kernel would read are not sound",
                   confidence="high", cause=cause, evidence=evidence, next_steps=steps)


# --------------------------------------------------------------------------------- SWA free path
def _free_evidence(f: Facts) -> list[str]:
    """What every free-path dump holds: the call, the pages it was about to release, kvtrap's record."""
    v = f.violation
    d = v.details or {}
    out = [f"violation kind is {f.kind} in {v.where or f.context.hook or '?'}: {v.count} bad SWA page(s), first {v.value}"
           f" at position {v.row} of `released_swa_pages`"]
    released = f.dump.tensors.get("released_swa_pages")
    if released is not None:
        pages = np.asarray(released).astype(np.int64).reshape(-1)
        out.append(f"`released_swa_pages`: {pages.size} page id(s) about to enter the SWA free list:"
                   f" {_rows(pages.tolist())}")
    owner = d.get("owner_full_page")
    if owner is not None:
        out.append("kvtrap's record: SWA page " + str(v.value)
                   + (" is not handed out (already free)" if owner < 0 else f" was handed out with full page {owner}"))
    freed = d.get("freed_full_pages")
    if freed:
        out.append(f"the call releases full page(s) {_rows(list(freed))}")
    return out


def _injected(f: Facts, name: str, evidence: list[str] | None = None) -> bool:
    """Whether the dump's config re-introduced ``name`` on purpose; said in ``evidence`` when given."""
    cfg = f.record.config
    injected = cfg is not None and name in (cfg.inject or [])
    if injected and evidence is not None:
        evidence.append(f"the dump's config injects {name} (KVTRAP_INJECT)")
    return injected


@rule("sglang-38269")
def swa_page0_freed(f: Facts) -> Finding | None:
    """The reserved SWA page 0 about to be freed: a free path without the `> 0` filter (SGLang #38269)."""
    if f.kind != Kind.SWA_FREE_RESERVED_PAGE:
        return None
    evidence = _free_evidence(f)
    idx = f.dump.tensors.get("free_index")
    if idx is not None:
        # not "all of them": a request's release passes its whole row, mapped slots and window-evicted ones
        evidence.append(f"the call was given {np.asarray(idx).size} token slot(s); {f.violation.count} of the pages"
                        " it releases read SWA slot 0 (no SWA pair: already evicted from the window, or never given one)")
    _injected(f, "sglang-38269", evidence)
    return Finding(
        rule="sglang-38269",
        title="The reserved SWA page 0 was about to enter the SWA free list (SGLang #38269)",
        confidence="high",
        cause=(
            "A free reached the SWA sub-allocator with slots that have no SWA peer: their mapping reads 0, so"
            " 0 // page_size = page 0, the padding page, would be freed and later handed to a real request."
            " Upstream this was free_swa_segment (no `> 0` filter) called with a node's full indices (PR #38159);"
            " fixed by #38269 / #38519."
        ),
        evidence=evidence,
        next_steps=[
            "Filter unmapped slots (mapping == 0) before releasing SWA pages in every free path"
            " (free_swa_segment / _free_swa_pages in 0.5.23 has no filter).",
            "Find the caller in the traceback: a segment free of a node or range whose SWA side is already gone"
            " should release the full side only (free_full_segment; a request's release does this for its"
            " window-evicted range in free_kv_row_segments).",
        ],
    )


@rule("sglang-27779")
def swa_double_free(f: Facts) -> Finding | None:
    """An SWA page freed a second time through a stale mapping left by a partial-page free (SGLang #27779)."""
    if f.kind != Kind.SWA_DOUBLE_FREE:
        return None
    evidence = _free_evidence(f)
    injected = _injected(f, "sglang-27779", evidence)
    return Finding(
        rule="sglang-27779",
        title="An SWA page was about to be freed twice (SGLang #27779)",
        confidence="high" if injected else "medium",
        cause=(
            "The mapping still pointed at an SWA page that is already free. With page_size > 1 the SWA page is"
            " freed whole, so clearing the mapping only for the freed tokens (not the whole page) leaves the"
            " other tokens of the page mapped; freeing them frees the page again (fixed by #27779)."
            + ("" if injected else " A stale mapping on recycled full pages (#25805) is the other known cause.")
        ),
        evidence=evidence,
        next_steps=[
            "Clear full_to_swa_index_mapping for whole pages wherever SWA pages are freed (#27779's page expansion).",
            "Check for frees of token ranges that split a page (speculative rollback, partial window eviction).",
        ],
    )


@rule("sglang-25805")
def swa_free_not_owned(f: Facts) -> Finding | None:
    """A free about to release an SWA page paired with another full page: a stale mapping (SGLang #25805)."""
    if f.kind != Kind.SWA_FREE_NOT_OWNED:
        return None
    evidence = _free_evidence(f)
    injected = _injected(f, "sglang-25805", evidence)
    return Finding(
        rule="sglang-25805",
        title="A free was about to release another request's SWA page through a stale mapping (SGLang #25805)",
        confidence="high" if injected else "medium",
        cause=(
            "Full slots being freed still map to an SWA page that was handed out with a different full page:"
            " recycled full pages kept a previous request's mapping. Upstream: alloc_extend_swa_tail wrote the"
            " mapping for the tail only and left the head's old entries (disaggregated decode + MTP; fixed by"
            " #25805)."
        ),
        evidence=evidence,
        next_steps=[
            "Clear the mapping of every full slot handed out without an SWA peer (alloc_extend_swa_tail's head,"
            " including swa_tail_len == 0).",
            "Audit code that frees full pages while their mapping is still set (free_full with a live peer).",
        ],
    )


@rule("sglang-24402")
def spec_swa_table_untranslated(f: Facts) -> Finding | None:
    """fa3's speculative SWA table holds full-pool ids: built without the SWA translation (SGLang #24402)."""
    if f.violation.table != SPEC_SWA_TABLE or f.kind not in (Kind.INDEX_SPACE_MISMATCH, Kind.PAGE_TABLE_OUT_OF_RANGE):
        return None
    evidence = [f"{f.layer} of a {f.context.forward_mode or '?'} forward was handed `{SPEC_SWA_TABLE}`"
                " (fa3's table for SWA layers under EAGLE tree speculation, topk > 1)"]
    swa = f.pools.get("swa")
    spec, full = f.dump.tensors.get(SPEC_SWA_TABLE), f.dump.tensors.get(SPEC_SWA_FULL)
    copied = False
    if spec is not None and full is not None and np.shape(spec) == np.shape(full):
        from kvtrap.report.tables import live_mask, live_pages

        s = f.dump.tensors.get("cache_seqlens")
        mask = live_mask(np.asarray(spec), live_pages(s, f.page_size) if s is not None else None)
        n = int(mask.sum())
        same = int((mask & (np.asarray(spec).astype(np.int64) == np.asarray(full).astype(np.int64))).sum())
        if n:
            evidence.append(f"{same} of {n} live entries equal the untranslated full-pool id at the same position")
            copied = same * 2 >= n
        if swa is not None and n:
            over = int((mask & (np.asarray(spec).astype(np.int64) >= swa)).sum())
            if over:
                evidence.append(f"{over} live entries are >= {swa} (SWA pages): they read past the SWA k-cache")
    if f.kind == Kind.INDEX_SPACE_MISMATCH:
        evidence.append(f"violation: {f.violation.summary}")
    injected = _injected(f, "sglang-24402", evidence)
    return Finding(
        rule="sglang-24402",
        title="fa3's speculative SWA page table holds full-pool ids: SWA translation skipped (SGLang #24402)",
        confidence="high" if injected or copied else "medium",
        cause=(
            "With fa3, EAGLE tree speculation (topk > 1) and an SWA pool, target verify hands SWA layers"
            " swa_spec_metadata.page_table, concatenated from page_table's prefix rows and the draft rows."
            " Built from untranslated full-pool ids, it indexes the SWA pool with full-pool slots: wrong KV,"
            " then an illegal address once ids exceed the SWA pool (issue #24402, fixed by PR #24617)."
        ),
        evidence=evidence,
        next_steps=[
            "Translate both inputs of prepare_swa_spec_page_table_triton through full_to_swa_index_mapping"
            " (FlashAttentionBackend._init_sliding_window_attn_spec_metadata; PR #24617 does this).",
            "Until then: --speculative-eagle-topk 1 (no speculative SWA table), or another attention backend.",
        ],
    )


# ------------------------------------------------------------------------------------------------ run
def explain(dump: Dump) -> list[Finding]:
    """Every matching finding, most certain first. An empty list: no rule matched."""
    facts = Facts.of(dump)
    found = [fd for _, fn in RULES if (fd := fn(facts)) is not None]
    return sorted(found, key=lambda fd: CONFIDENCE.index(fd.confidence))


def rule_ids() -> list[str]:
    return [rid for rid, _ in RULES]
