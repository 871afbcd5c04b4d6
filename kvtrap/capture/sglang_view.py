"""The one view kvtrap has of SGLang's state: backend + layer + batch -> :class:`LayerSnapshot`,
allocator call -> :class:`AllocationSnapshot`, backend -> the context a device-guard drain dumps.

Everything here reads SGLang objects by attribute (never by importing SGLang), so one module knows the
0.5.x attribute names. The hooks (:mod:`kvtrap.capture.hooks`) build snapshots with it; the weight-free
repro builds a :class:`LayerSnapshot` directly (SGLang's pools do not import where ``sgl_kernel`` is
missing). :func:`kvtrap.capture.verdict.judge_layer` decides what a snapshot means.

The pool a layer reads is resolved from the *live* ``backend.token_to_kv_pool`` and its
``layers_mapping``, not from the backend's cached SWA flags: those are what goes stale in SGLang #26957.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvtrap.record.context import BackendState, Context, LivePool, PoolPages, TableInfo

FULL, SWA = "full", "swa"
_MISSING = object()


def layer_pool(live: Any, layer_id: int) -> tuple[str, int | None]:
    """(``"swa"`` or ``"full"``, index inside that sub-pool) from the live pool's ``layers_mapping``."""
    mapping = getattr(live, "layers_mapping", None)
    if mapping is not None and layer_id in mapping:
        index, is_swa = mapping[layer_id]
        return (SWA if is_swa else FULL), int(index)
    return FULL, None


def is_swa_pool(pool: Any) -> bool:
    return getattr(pool, "swa_kv_pool", None) is not None and getattr(pool, "layers_mapping", None) is not None


def layer_pages(live: Any, layer_type: str, page_size: int) -> int | None:
    """Pages of the pool a layer of ``layer_type`` reads: ``size + page_size`` token rows (page 0 padding).

    From the (sub-)pool's ``size``, not from ``get_key_buffer``: that is not a pure accessor (FP4 pools
    dequantize a whole layer there, HiCache waits for a layer load) and its shape is token-major only in
    the NHD layout (``SGLANG_USE_HND_KVCACHE=1`` gives ``[pages, H, page, D]``). ``None``: no size known.
    """
    sub = (live.swa_kv_pool if layer_type == SWA else live.full_kv_pool) if is_swa_pool(live) else live
    info = _sub_pool_pages(sub, page_size)
    return None if info is None else info.pages


def sharded_kv(backend: Any) -> bool:
    """Decode context parallelism (``dcp_size > 1``): each rank reads its own shard of the ids, in a space
    kvtrap does not bound; the ragged checks stand aside."""
    return int(getattr(backend, "dcp_size", 1) or 1) > 1


def translating(backend: Any) -> bool:
    """Unified KV pools address pages through virtual ids (``kv_index_translator``): other bounds apply."""
    return bool(getattr(getattr(backend, "kv_index_translator", None), "is_translating", False))


def _sub_pool_pages(pool: Any, page_size: int) -> PoolPages | None:
    size = getattr(pool, "size", None)
    if size is None:
        return None
    return PoolPages(pages=(int(size) + page_size) // page_size, rows=int(size) + page_size)


def pool_summary(live: Any, page_size: int) -> dict[str, PoolPages | None]:
    if is_swa_pool(live):
        return {
            FULL: _sub_pool_pages(live.full_kv_pool, page_size),
            SWA: _sub_pool_pages(live.swa_kv_pool, page_size),
        }
    return {FULL: _sub_pool_pages(live, page_size)}


def find_drift(backend: Any, live: Any) -> dict[str, str]:
    """Fields of the backend's cached SWA state that disagree with the live pool (empty when in sync)."""
    if not is_swa_pool(live):
        return {}
    problems: dict[str, str] = {}
    # flashinfer's indices updaters copy the backend's pool at init and decide the translation from it
    for owner, prefix in ((backend, ""), (getattr(backend, "indices_updater_decode", None), "indices_updater_decode."),
                          (getattr(backend, "indices_updater_prefill", None), "indices_updater_prefill.")):
        problem = _stale_pool(getattr(owner, "_swa_kv_pool", _MISSING), live)
        if problem:
            problems[prefix + "_swa_kv_pool"] = problem
    # an SWA pool without SWA layers is served as a plain one (fa3 / trtllm_mha __init__ test swa_layer_nums too)
    if getattr(backend, "use_sliding_window_kv_pool", True) is False and getattr(live, "swa_layer_nums", 1) > 0:
        problems["use_sliding_window_kv_pool"] = "False, but the live pool is an SWA pool"
    mapping = getattr(backend, "_swa_full_to_swa_mapping", _MISSING)  # read in-graph since 0.5.15
    translator = getattr(backend, "kv_index_translator", None)
    if mapping is not _MISSING and not getattr(translator, "is_translating", False):
        live_mapping = getattr(live, "full_to_swa_index_mapping", None)
        if mapping is None:
            problems["_swa_full_to_swa_mapping"] = "None, but the live pool has a full->SWA mapping"
        elif live_mapping is not None and mapping is not live_mapping:
            problems["_swa_full_to_swa_mapping"] = "a different tensor than the live pool's mapping"
    return problems


def _stale_pool(cached: Any, live: Any) -> str | None:
    """Why a cached SWA pool is not the live one, or ``None`` (also when nothing is cached)."""
    if cached is _MISSING or cached is live:
        return None  # the common case, on every pool swap of a frozen-KV draft: no description built
    live_desc = f"{type(live).__name__}@{id(live):#x}"
    if cached is None:
        return f"None, but the live pool is {live_desc}"
    # Equivalent when it shares the live pool's SWA buffers and mapping (a different wrapper object).
    same = getattr(cached, "swa_kv_pool", None) is live.swa_kv_pool and getattr(
        cached, "full_to_swa_index_mapping", None
    ) is getattr(live, "full_to_swa_index_mapping", None)
    return None if same else f"{type(cached).__name__}@{id(cached):#x}, not the live {live_desc}"


def live_pool(live: Any) -> LivePool:
    return LivePool(class_=type(live).__name__, id=f"{id(live):#x}")


def backend_state(backend: Any, live: Any) -> BackendState:
    # fa3 caches only use_sliding_window_kv_pool: the trtllm_mha fields stay None (not "stale") there
    has_pool = hasattr(backend, "_swa_kv_pool")
    has_mapping = hasattr(backend, "_swa_full_to_swa_mapping")
    cached = getattr(backend, "_swa_kv_pool", None)
    mapping = getattr(backend, "_swa_full_to_swa_mapping", None)
    return BackendState(
        class_=type(backend).__name__,
        use_sliding_window_kv_pool=getattr(backend, "use_sliding_window_kv_pool", None),
        swa_kv_pool=None if cached is None else f"{type(cached).__name__}@{id(cached):#x}",
        swa_kv_pool_is_live=cached is live if has_pool else None,
        has_swa_full_to_swa_mapping=mapping is not None if has_mapping else None,
        swa_mapping_is_live=(mapping is not None and mapping is getattr(live, "full_to_swa_index_mapping", None))
        if has_mapping else None,
        max_context_len=_int_or_none(getattr(backend, "max_context_len", None)),
        speculative_num_draft_tokens=_int_or_none(getattr(backend, "speculative_num_draft_tokens", None)),
    )


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def table_infos(md: Any, handed_name: str, live: Any, page_size: int,
                extra: dict[str, tuple[Any, str]] | None = None) -> dict[str, TableInfo]:  # fmt: skip
    """The metadata's tables (``page_table``, ``swa_page_table``, and ``extra``: name -> (table, pool)) with
    the page count of the pool each indexes and whether it is the one handed to the layer."""
    out: dict[str, TableInfo] = {}
    swa = is_swa_pool(live)
    named = {name: (getattr(md, name, None), SWA if name == "swa_page_table" else FULL)
             for name in ("page_table", "swa_page_table")} if md is not None else {}  # fmt: skip
    named.update(extra or {})
    for name, (table, pool) in named.items():
        if table is None or not hasattr(table, "shape"):
            continue
        sub = (live.swa_kv_pool if pool == SWA else live.full_kv_pool) if swa else live
        info = _sub_pool_pages(sub, page_size)
        out[name] = TableInfo(
            pool=pool,
            bound=None if info is None else info.pages,
            handed_to_layer=name == handed_name,
            shape=list(table.shape),
        )
    return out


def forward_mode(forward_batch: Any) -> str | None:
    mode = getattr(forward_batch, "forward_mode", None)
    return getattr(mode, "name", None) if mode is not None else None


@dataclass
class LayerCall:
    """Which layer call a snapshot describes (the header :func:`_layer_call` fills for every snapshot)."""

    where: str
    layer_id: int
    layer_type: str
    window: int | None
    index_in_pool: int | None
    page_size: int


@dataclass
class LayerSnapshot(LayerCall):
    """Everything the checks need about one layer's attention call, gathered from live objects.

    The trtllm_mha hook fills it from SGLang's backend (:func:`layer_snapshot`); the weight-free repro
    fills it directly. Either way :func:`kvtrap.capture.verdict.judge_layer` decides.
    """

    bound: int | None  # pages of the pool this layer reads (None: unknown, values not checked)
    handed_name: str
    tables: dict[str, Any]  # "page_table", "swa_page_table" (None when absent)
    cache_seqlens: Any
    drift: dict[str, str]
    pools: dict[str, PoolPages | None]
    backend: BackendState
    live_pool: LivePool
    table_bounds: dict[str, TableInfo]
    forward_mode: str | None = None
    speculative: bool | None = None  # the batch carries spec_info (draft decode steps run as DECODE)
    req_pool_indices: Any = None
    capturing: bool = False
    # index space of the handed table ("swa", "full", "other"); None: judged by its name (page_table /
    # swa_page_table), as the weight-free repro builds it
    handed_pool: str | None = None

    @property
    def expected_name(self) -> str:
        return "swa_page_table" if self.layer_type == SWA else "page_table"

    @property
    def mismatch(self) -> bool:
        """The handed table indexes another pool than the one this layer reads."""
        if self.handed_pool is not None:
            return self.handed_pool != self.layer_type
        return self.handed_name != self.expected_name


@dataclass(slots=True)  # built on every layer call: slots, not frozen (a frozen init costs ~1 us more)
class HandedTable:
    """The paged table a backend is about to hand one layer's kernel, as an adapter resolves it.

    ``pool``: the index space its ids are in (``"swa"``, ``"full"``, ``"other"``: not one of the
    metadata's tables). ``full_ids``: for a table of SWA ids, the full-pool table it was translated from
    (same shape, same live prefix), so the scan can check ``swa == mapping[full * page_size] //
    page_size``; ``None`` where there is none to compare with. ``extra``: tables to list in the dump's
    context beside ``page_table`` / ``swa_page_table`` (name -> (table, pool)).
    """

    name: str
    table: Any
    cache_seqlens: Any
    pool: str
    full_ids: Any = None  # a tensor, or a zero-argument callable building it (called once per forward)
    extra: dict[str, tuple[Any, str]] | None = None


def trtllm_handed_table(backend: Any, layer: Any, forward_batch: Any) -> HandedTable:
    """trtllm_mha: the table its own ``_get_layer_page_table`` picks (no SWA-translation check: which
    metadata table it is says the index space)."""
    md = backend.forward_metadata
    handed = backend._get_layer_page_table(layer, forward_batch)
    name = handed_table_name(md, handed)
    pool = SWA if name == "swa_page_table" else FULL if name == "page_table" else "other"
    return HandedTable(name, handed, md.cache_seqlens_int32, pool)


def fa3_handed_table(backend: Any, layer: Any, method: str, spec_full_rows: Any) -> HandedTable | None:
    """fa3 (``FlashAttentionBackend``, SGLang 0.5.23): the paged table ``forward_decode`` /
    ``forward_extend`` hand this layer's kernel, chosen as they choose it (fa3 has no method for it).

    * an SWA layer (``layer.sliding_window_size > -1``) in ``forward_extend`` whose metadata carries
      ``swa_spec_metadata`` (target verify, topk > 1): ``swa_spec_metadata.page_table`` with its own
      ``cache_seqlens``, SWA ids when the backend believes it serves an SWA pool (it translates only then);
      its full-pool counterpart is rebuilt by ``spec_full_rows`` (checks.spec_full_rows) for the
      translation check (SGLang #24402: this table was built from untranslated full ids);
    * an SWA layer with ``use_sliding_window_kv_pool`` (cached at ``__init__``): ``swa_page_table`` (or the
      per-call translation of ``page_table`` when it is missing);
    * otherwise ``page_table`` (full-pool ids), also for SWA layers of a backend that cached "no SWA pool".

    ``None`` (not checked here): cross attention (encoder table), chunked local attention (its own block
    table), prefill-aware SWA decode (``pa_swa_page_table``, page size 1 only), logical-page KV sharding
    (``_kv_shard_pool``: ``page_table`` then names scratch rows, not pool pages). The second table of the
    topk > 1 cascade (``forward_metadata_spec_decode_expand``) is not checked either.
    """
    md = backend.forward_metadata
    if getattr(layer, "is_cross_attention", False) or getattr(backend, "_kv_shard_pool", None) is not None:
        return None
    builder = getattr(backend, "local_attn_builder", None)
    if builder is not None and builder.applies(layer, md):
        return None
    window = getattr(layer, "sliding_window_size", None)
    swa_layer = window is not None and window > -1 and not getattr(backend, "use_mla", False)
    cached_swa = bool(getattr(backend, "use_sliding_window_kv_pool", False))
    seqlens = md.cache_seqlens_int32
    spec = getattr(md, "swa_spec_metadata", None)
    if method == "forward_extend" and swa_layer and spec is not None:
        expand = getattr(backend, "forward_metadata_spec_decode_expand", None)
        full_ids = None
        if cached_swa and expand is not None:
            def full_ids() -> Any:
                return spec_full_rows(md.page_table, seqlens, expand.page_table, expand.cache_seqlens_int32,
                                      int(backend.speculative_num_draft_tokens), int(spec.page_table.shape[1]))
        return HandedTable("swa_spec_page_table", spec.page_table, spec.cache_seqlens_int32,
                           SWA if cached_swa else FULL, full_ids, {"swa_spec_page_table": (spec.page_table, SWA)})
    if method == "forward_decode" and getattr(backend, "is_prefill_aware_swa", False) and getattr(
        md, "pa_swa_page_table", None
    ) is not None:
        return None
    if swa_layer and cached_swa:
        swa = getattr(md, "swa_page_table", None)
        if swa is None:  # fa3 translates per call then (ids of page_table read as token slots)
            swa = backend.token_to_kv_pool.translate_loc_from_full_to_swa(md.page_table)
            return HandedTable("page_table (translated per call)", swa, seqlens, SWA,
                               extra={"page_table (translated per call)": (swa, SWA)})
        return HandedTable("swa_page_table", swa, seqlens, SWA, md.page_table)
    return HandedTable("page_table", md.page_table, seqlens, FULL)


def padding_page_slots(table_name: str, forward_batch: Any) -> Any:
    """The request slot of every row (``forward_batch.req_pool_indices``) when ``table_name`` is a table
    whose page 0 no real request may read, else ``None`` (no padding-page check).

    SGLang reserves request slot 0 (``ReqToTokenPool.free_slots`` starts at 1) and page 0 of every pool:
    CUDA-graph padding rows are slot 0 with length 1 and read page 0 on purpose. A real slot reading
    page 0 reads the padding page's garbage (padded-token writes land there): a silent wrong answer.
    Only the full ``page_table``: the SWA table legally holds page 0 for pages that left the window
    (``free_swa`` clears their mapping to 0), and the window edge is not known here per row.

    Host only. The device guard does not check this: its separate kernel is handed only the tables
    and ``cache_seqlens`` (not ``req_pool_indices``), its entry layout has no flag for it, and a change
    to the in-graph kernels cannot be verified on CPU. So this covers eager forwards (every extend and
    prefill, and decode with CUDA graphs off), not decode steps replayed from a CUDA graph.
    """
    if table_name != "page_table" or forward_batch is None:
        return None
    slots = getattr(forward_batch, "req_pool_indices", None)
    return slots if hasattr(slots, "shape") else None


def call_arg(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, name: str) -> Any:
    """An argument of a hooked SGLang call, passed by position or by name (``None`` if absent). Attention
    backends' ``forward_decode`` / ``forward_extend`` take ``(q, k, v, layer, forward_batch, save_kv_cache)``."""
    return args[position] if len(args) > position else kwargs.get(name)


def handed_table_name(md: Any, handed: Any) -> str:
    """Which of the metadata's tables the backend hands this layer: ``page_table``, ``swa_page_table``
    or ``other``."""
    swa_t = getattr(md, "swa_page_table", None)
    if swa_t is not None and handed is swa_t:
        return "swa_page_table"
    if handed is md.page_table:
        return "page_table"
    return "other"


def _layer_call(backend: Any, layer: Any, forward_batch: Any, where: str, layer_type: str,
                index_in_pool: int | None, capturing: bool) -> dict[str, Any]:  # fmt: skip
    """The fields every snapshot of one layer's attention call shares: the layer, the batch, the pools."""
    live = backend.token_to_kv_pool
    page_size = int(backend.page_size)
    window = getattr(layer, "sliding_window_size", None)
    return {
        "where": where,
        "layer_id": int(layer.layer_id),
        "layer_type": layer_type,
        "window": None if window is None else int(window),
        "index_in_pool": index_in_pool,
        "page_size": page_size,
        "pools": pool_summary(live, page_size),
        "backend": backend_state(backend, live),
        "live_pool": live_pool(live),
        "forward_mode": forward_mode(forward_batch),
        "speculative": None if forward_batch is None else getattr(forward_batch, "spec_info", None) is not None,
        "req_pool_indices": getattr(forward_batch, "req_pool_indices", None),
        "capturing": capturing,
    }


def layer_snapshot(
    backend: Any, layer: Any, forward_batch: Any, where: str, *, handed: HandedTable, layer_type: str,
    index_in_pool: int | None, bound: int | None, drift: dict[str, str], capturing: bool,
) -> LayerSnapshot:
    """The full snapshot of one layer's attention call (built only once something looks wrong)."""
    md = backend.forward_metadata
    extra = dict(handed.extra or {})
    if handed.cache_seqlens is md.cache_seqlens_int32:
        tables = {"page_table": md.page_table, "swa_page_table": getattr(md, "swa_page_table", None)}
        names = md
    else:  # a table with rows of its own (fa3's speculative SWA table): only it, with its full-pool rows
        tables, names = {}, None
        full = handed.full_ids() if callable(handed.full_ids) else handed.full_ids
        if full is not None:
            extra[f"{handed.name}_full_ids"] = (full, FULL)
    for name, (table, _pool) in extra.items():
        tables[name] = table
    return LayerSnapshot(
        **_layer_call(backend, layer, forward_batch, where, layer_type, index_in_pool, capturing),
        bound=bound,
        handed_name=handed.name,
        handed_pool=handed.pool,
        tables=tables,
        cache_seqlens=handed.cache_seqlens,
        drift=drift,
        table_bounds=table_infos(names, handed.name, backend.token_to_kv_pool, int(backend.page_size), extra),
    )


# ------------------------------------------------------------------------------------- allocator
@dataclass
class AllocationSnapshot:
    """One ``SWATokenToKVPoolAllocator.alloc_*`` call: what it returned and the SWA slots behind it.

    Valid SWA slots are ``[page_size, bound)``: page 0 is the reserved padding page.
    """

    where: str
    page_size: int
    bound: int  # exclusive upper bound of valid SWA slots
    out: Any  # full-pool token indices the call returned
    swa_slots: Any  # full_to_swa_index_mapping[out]
    size_full: int
    size_swa: int
    full_pages: int | None  # pages of the full sub-allocator (page 0 not counted)
    free_full: int | None
    free_swa: int | None
    args: dict[str, Any]


def full_page_bound(alloc: Any) -> int:
    """More than any full-pool page id of ``alloc`` (pages 1..size_full // page_size, plus slack for padding)."""
    return int(alloc.size_full) // int(alloc.page_size) + 2


def swa_slot_bound(alloc: Any) -> int:
    """Exclusive upper bound of valid SWA slots: pages handed out are 1..num_pages."""
    page_size = int(alloc.page_size)
    sub = getattr(alloc, "swa_attn_allocator", None)
    num_pages = getattr(sub, "num_pages", None)
    if num_pages is None:
        num_pages = int(alloc.size_swa) // page_size
    return (int(num_pages) + 1) * page_size


def _free_pages(sub: Any, page_size: int) -> int | None:
    try:
        return int(sub.available_size()) // page_size
    except Exception:  # a broken free list is what we are reporting; don't die describing it
        return None


def allocation_snapshot(alloc: Any, out: Any, swa_slots: Any, where: str, args: dict[str, Any]) -> AllocationSnapshot:
    page_size = int(alloc.page_size)
    full_sub = getattr(alloc, "full_attn_allocator", None)
    full_pages = getattr(full_sub, "num_pages", None)
    return AllocationSnapshot(
        where=where,
        page_size=page_size,
        bound=swa_slot_bound(alloc),
        out=out,
        swa_slots=swa_slots,
        size_full=int(alloc.size_full),
        size_swa=int(alloc.size_swa),
        full_pages=None if full_pages is None else int(full_pages),
        free_full=_free_pages(full_sub, page_size),
        free_swa=_free_pages(getattr(alloc, "swa_attn_allocator", None), page_size),
        args=args,
    )


@dataclass
class FreeSnapshot:
    """SWA pages about to enter the SWA sub-allocator's free list, and the free call behind them."""

    where: str  # the SGLang call that frees (e.g. "SWATokenToKVPoolAllocator.free_swa")
    page_size: int
    swa_pages: int  # pages of the SWA sub-allocator (page 0 not counted)
    released: Any  # SWA page ids passed to the sub-allocator's release
    freeing: Any  # full pages the free call releases, or None (unknown caller)
    free_index: Any  # the token indices the free call was given, or None
    owner: Any  # kvtrap's ownership record (full page per SWA page, -1 free)
    size_full: int
    size_swa: int
    free_full: int | None
    free_swa: int | None


def free_snapshot(alloc: Any, released: Any, freeing: Any, free_index: Any, where: str, owner: Any) -> FreeSnapshot:
    page_size = int(alloc.page_size)
    sub = alloc.swa_attn_allocator
    pages = getattr(sub, "num_pages", None)
    return FreeSnapshot(
        where=where,
        page_size=page_size,
        swa_pages=int(pages) if pages is not None else int(alloc.size_swa) // page_size,
        released=released,
        freeing=freeing,
        free_index=free_index,
        owner=owner,
        size_full=int(alloc.size_full),
        size_swa=int(alloc.size_swa),
        free_full=_free_pages(getattr(alloc, "full_attn_allocator", None), page_size),
        free_swa=_free_pages(sub, page_size),
    )


# ------------------------------------------------------------------------------------ device guard
def _guard_context(backend: Any, live: Any, page_size: int) -> Context:
    """What every device-guard dump says of the backend and its live pool (no layer: whole tables)."""
    return Context(page_size=page_size, pools=pool_summary(live, page_size), live_pool=live_pool(live),
                   backend=backend_state(backend, live), capturing=False)  # fmt: skip


def backend_context(backend: Any) -> tuple[Context, dict[str, Any]]:
    """The context and tensors a device-guard drain dumps for ``backend`` (no layer: the guard checks
    whole tables once per forward)."""
    live = backend.token_to_kv_pool
    page_size = int(backend.page_size)
    context = _guard_context(backend, live, page_size)
    tensors: dict[str, Any] = {}
    md = getattr(backend, "forward_metadata", None)
    if md is not None:
        context = context.with_(batch_size=int(md.cache_seqlens_int32.shape[0]))
        tensors = {
            "page_table": md.page_table,
            "swa_page_table": getattr(md, "swa_page_table", None),
            "cache_seqlens": md.cache_seqlens_int32,
        }
    return context, tensors


# ------------------------------------------------------------------------------------ KV write path
@dataclass
class WriteSnapshot(LayerCall):
    """Where one layer's K/V store is about to write: the locations and the pool rows they must fit.

    An SWA layer (per the *live* pool's ``layers_mapping``) writes ``forward_metadata.swa_out_cache_loc``
    (the full->SWA translation ``init_forward_metadata`` made once per forward) into the SWA sub-pool;
    every other layer writes ``forward_batch.out_cache_loc`` into the full (or only) pool. Slot 0 is the
    padding slot padded tokens write to: legal. Valid: ``[0, rows)``.
    """

    name: str  # "out_cache_loc" or "swa_out_cache_loc"
    locs: Any  # the write locations (narrowed to the batch's token count, as SGLang narrows them)
    rows: int  # token rows of the pool written
    out_cache_loc: Any
    swa_out_cache_loc: Any
    cache_seqlens: Any  # the metadata's cache_seqlens_int32; the batch's seq_lens where it has none
    req_pool_indices: Any
    pools: dict[str, PoolPages | None]
    backend: BackendState
    live_pool: LivePool
    forward_mode: str | None = None
    speculative: bool | None = None
    capturing: bool = False


def write_locs(backend: Any, layer: Any, forward_batch: Any, layer_type: str) -> tuple[str, Any] | None:
    """(name, locations) the layer's K/V store writes, by the live pool: what SGLang 0.5.23's
    ``KVWriteLoc`` hands ``set_kv_buffer`` in every backend kvtrap checks (trtllm_mha, fa3, triton,
    flashinfer): ``loc`` = ``out_cache_loc``, and for an SWA layer ``SWAKVPool.set_kv_buffer`` takes
    ``swa_loc`` = ``forward_metadata.swa_out_cache_loc`` narrowed to ``loc``'s length.

    ``None`` when there is nothing to check: no batch locations; an SWA layer whose translated locations
    are missing (SGLang's own assert reports that); a cross-attention layer (``KVWriteLoc.for_layer``
    writes ``encoder_out_cache_loc`` there, not checked); decode context parallelism (triton writes
    ``out_cache_loc // dcp_size`` into the rank's shard, a space kvtrap does not bound)."""
    if getattr(layer, "is_cross_attention", False) or sharded_kv(backend):
        return None
    loc = getattr(forward_batch, "out_cache_loc", None)
    if loc is None or not hasattr(loc, "shape"):
        return None
    if layer_type != SWA:
        return "out_cache_loc", loc
    swa = getattr(getattr(backend, "forward_metadata", None), "swa_out_cache_loc", None)
    if swa is None or not hasattr(swa, "shape"):
        return None
    return "swa_out_cache_loc", swa[: loc.shape[0]]


def layer_rows(live: Any, layer_type: str, page_size: int) -> int | None:
    """Token rows of the pool a layer of ``layer_type`` reads and writes (``size + page_size``: slot 0's
    page is the padding page): the bound of K/V write locations and of token-slot read ids (triton's and
    flashinfer's ragged ``kv_indices`` at page size 1); ``None``: no size known."""
    sub = (live.swa_kv_pool if layer_type == SWA else live.full_kv_pool) if is_swa_pool(live) else live
    info = _sub_pool_pages(sub, page_size)
    return None if info is None else info.rows


def write_snapshot(
    backend: Any, layer: Any, forward_batch: Any, where: str, *, layer_type: str, index_in_pool: int | None,
    name: str, locs: Any, rows: int, capturing: bool,
) -> WriteSnapshot:
    md = backend.forward_metadata
    return WriteSnapshot(
        **_layer_call(backend, layer, forward_batch, where, layer_type, index_in_pool, capturing),
        name=name,
        locs=locs,
        rows=rows,
        out_cache_loc=forward_batch.out_cache_loc,
        swa_out_cache_loc=getattr(md, "swa_out_cache_loc", None),
        cache_seqlens=_write_seqlens(md, forward_batch),
    )


def _write_seqlens(md: Any, forward_batch: Any) -> Any:
    # page-table backends keep the lengths their kernels read in the metadata; the ragged ones (triton,
    # flashinfer) have none there, and their ragged dumps carry the batch's seq_lens: the same here
    seqlens = getattr(md, "cache_seqlens_int32", None)
    return seqlens if seqlens is not None else getattr(forward_batch, "seq_lens", None)


# ------------------------------------------------------------------ ragged KV ids (triton, flashinfer)
@dataclass(frozen=True)
class Rail:
    """One ragged (CSR) index set a backend reads K/V through: offsets, ids, and the pool whose id space
    the backend built it for. Ids are token slots (the kernels split them into page and offset, or plan
    with page size 1), so they are bounded by the token rows of a pool."""

    name: str  # "kv_indices", "window_kv_indices", "aligned_window_kv_indices", "out_cache_loc", ...
    indptr: Any
    indices: Any
    space: str  # FULL or SWA


#: The id space of each index set (and of the ids the unified extend appends). Window rails hold SWA-pool
#: ids only when the live pool is an SWA pool (``update_sliding_window_buffer`` translates them then).
_RAIL_SPACE = {
    "kv_indices": FULL,
    "window_kv_indices": SWA,
    "aligned_window_kv_indices": SWA,
    "out_cache_loc": FULL,
    "swa_out_cache_loc": SWA,
}
#: What a layer of each pool type is expected to be handed, for the dump's ``expected_table``.
EXPECTED_RAIL = {(FULL, False): "kv_indices", (SWA, False): "window_kv_indices",
                 (FULL, True): "out_cache_loc", (SWA, True): "swa_out_cache_loc"}


def rail_space(name: str, live: Any, layer_type: str) -> str:
    """The pool whose ids the triton index set ``name`` holds; ``layer_type`` for an unknown tensor."""
    space = _RAIL_SPACE.get(name, layer_type)
    return FULL if space == SWA and not is_swa_pool(live) else space


def rail_name(md: Any, forward_batch: Any, tensor: Any) -> str:
    """Which of the metadata's (or batch's) ragged tensors ``tensor`` is, by identity; ``handed_kv_indices``
    (an id space not known, so not judged) if none."""
    if forward_batch is not None and tensor is getattr(forward_batch, "out_cache_loc", None):
        return "out_cache_loc"  # first: a swa_out_cache_loc that *is* out_cache_loc was never translated
    for name in ("kv_indices", "window_kv_indices", "aligned_window_kv_indices", "swa_out_cache_loc"):
        if tensor is not None and tensor is getattr(md, name, None):
            return name
    return "handed_kv_indices"


def triton_rails(md: Any, live: Any, layer_type: str) -> dict[str, Rail]:
    """The index sets of a ``TritonAttnBackend`` forward (``ForwardMetadata``) that exist."""
    out = {}
    for name in ("kv_indices", "window_kv_indices", "aligned_window_kv_indices"):
        indptr, indices = getattr(md, name.replace("indices", "indptr"), None), getattr(md, name, None)
        if indptr is not None and indices is not None:
            out[name] = Rail(name, indptr, indices, rail_space(name, live, layer_type))
    return out


def triton_handed(layer: Any) -> str:
    """The index set ``TritonAttnBackend`` hands ``layer``'s decode / extend kernel: the window rail for a
    layer with a sliding window (``sliding_window_size > -1``), else ``kv_indices``."""
    window = getattr(layer, "sliding_window_size", None)
    return "window_kv_indices" if window is not None and window > -1 else "kv_indices"


def flashinfer_rails(backend: Any, md: Any, live: Any) -> dict[str, Rail] | None:
    """The ids each FlashInfer wrapper of this forward was planned with (``_paged_kv_indptr_buf`` /
    ``_paged_kv_indices_buf``: what ``plan`` stores and ``run`` reads), by index-set name: with a sliding
    window, wrapper 0 (``window_kv_indices``) serves window layers and wrapper 1 (``kv_indices``) the rest.

    Wrapper 0's ids are SWA-pool ids only if the indices updater that planned them translated them: it
    does when its cached ``_swa_kv_pool`` (resolved at init) is set. ``None``: no paged wrappers planned.
    """
    wrappers = getattr(md, "decode_wrappers", None) or getattr(md, "prefill_wrappers", None)
    if not wrappers:
        return None
    updater = getattr(backend, "indices_updater_decode" if hasattr(md, "decode_wrappers")
                      else "indices_updater_prefill", None)  # fmt: skip
    return _wrapper_rails(backend, wrappers, updater, live, None)


def _wrapper_rails(backend: Any, wrappers: Any, updater: Any, live: Any, bs: int | None) -> dict[str, Rail]:
    """Name and id space of each paged wrapper's planned ids (wrapper 0 is the window wrapper with a sliding
    window; its ids are SWA ids when the updater that planned them had an SWA pool). ``bs``: cut the offsets
    to that many requests (a CUDA-graph wrapper's buffers are sized for the largest batch)."""
    window = getattr(getattr(backend, "dispatch_reason", None), "name", None) == "SLIDING_WINDOW"
    translated = is_swa_pool(live) and getattr(updater, "_swa_kv_pool", None) is not None
    out = {}
    for idx, wrapper in enumerate(wrappers[:2]):
        name = "window_kv_indices" if window and idx == 0 else "kv_indices"
        indptr = getattr(wrapper, "_paged_kv_indptr_buf", None)
        indices = getattr(wrapper, "_paged_kv_indices_buf", None)
        if indptr is None or indices is None or (bs is not None and indptr.numel() <= bs):
            continue
        space = SWA if name == "window_kv_indices" and translated else FULL
        out[name] = Rail(name, indptr if bs is None else indptr[: bs + 1], indices, space)
    return out


def flashinfer_handed(backend: Any, layer: Any) -> str:
    """The index set ``FlashInferAttnBackend`` runs ``layer`` on (its ``_get_wrapper_idx``)."""
    window = getattr(getattr(backend, "dispatch_reason", None), "name", None) == "SLIDING_WINDOW"
    return "window_kv_indices" if window and int(backend._get_wrapper_idx(layer)) == 0 else "kv_indices"


def triton_graph_rails(backend: Any, forward_batch: Any) -> dict[str, Rail] | None:
    """The index sets a ``TritonAttnBackend`` CUDA-graph replay reads, right after
    ``init_forward_metadata_out_graph(fb)`` refilled them (SGLang 0.5.23 builds them there, outside the graph,
    in the static buffers the graph captured: ``kv_indptr`` / ``cuda_graph_kv_indices`` and, with a sliding
    window, ``window_kv_indptr`` / ``cuda_graph_window_kv_indices``), cut to the batch's rows: decode, draft
    extend and dLLM fill ``batch_size`` rows, target verify ``len(req_pool_indices)``. ``None``: no graph
    buffers (``init_cuda_graph_state`` not run)."""
    indices = getattr(backend, "cuda_graph_kv_indices", None)
    indptr = getattr(backend, "kv_indptr", None)
    if indices is None or indptr is None:
        return None
    mode = getattr(forward_batch, "forward_mode", None)
    verify = mode is not None and mode.is_target_verify()
    bs = len(forward_batch.req_pool_indices) if verify else int(forward_batch.batch_size)
    live = backend.token_to_kv_pool
    out = {"kv_indices": Rail("kv_indices", indptr[: bs + 1], indices, FULL)}
    window = getattr(backend, "sliding_window_size", None)
    window_indices = getattr(backend, "cuda_graph_window_kv_indices", None)
    window_indptr = getattr(backend, "window_kv_indptr", None)
    if window is not None and window > 0 and window_indices is not None and window_indptr is not None:
        out["window_kv_indices"] = Rail("window_kv_indices", window_indptr[: bs + 1], window_indices,
                                        rail_space("window_kv_indices", live, SWA))
    return out


def triton_draft_graph_rails(draft: Any, forward_batch: Any) -> list[dict[str, Rail]] | None:
    """Each captured draft step's index sets of a ``TritonMultiStepDraftBackend`` replay, right after its
    ``init_forward_metadata_out_graph(fb)`` refilled them (SGLang 0.5.23: ``common_template`` fills row ``i`` of
    its ``kv_indptr`` / ``cuda_graph_kv_indices`` and, with a sliding window, of ``window_kv_indptr`` /
    ``cuda_graph_window_kv_indices`` for every step; step ``i``'s backend, ``attn_backends[i]``, reads row ``i``),
    cut to ``topk * batch_size`` rows. One dict per backend in ``attn_backends``; ``None``: no graph buffers."""
    indices = getattr(draft, "cuda_graph_kv_indices", None)
    indptr = getattr(draft, "kv_indptr", None)
    backends = getattr(draft, "attn_backends", None)
    if indices is None or indptr is None or not backends:
        return None
    bs = int(draft.topk) * int(forward_batch.batch_size)
    live = draft.token_to_kv_pool
    window_indices = getattr(draft, "cuda_graph_window_kv_indices", None)
    window_indptr = getattr(draft, "window_kv_indptr", None)
    window = bool(getattr(draft, "window_rail", False)) and window_indices is not None and window_indptr is not None
    out = []
    for i in range(len(backends)):
        rails = {"kv_indices": Rail("kv_indices", indptr[i, : bs + 1], indices[i], FULL)}
        if window:
            rails["window_kv_indices"] = Rail("window_kv_indices", window_indptr[i, : bs + 1], window_indices[i],
                                              rail_space("window_kv_indices", live, SWA))
        out.append(rails)
    return out


def flashinfer_graph_rails(backend: Any, forward_batch: Any) -> dict[str, Rail] | None:
    """The ids the CUDA-graph wrappers of a ``FlashInferAttnBackend`` replay will run on, right after
    ``init_forward_metadata_out_graph(fb)`` planned them (SGLang 0.5.23: the indices updater gathers straight
    into each cuda-graph wrapper's ``_paged_kv_indices_buf`` and ``plan`` copies the offsets into its
    ``_paged_kv_indptr_buf``; the captured ``run`` reads both): the decode wrappers of ``batch_size`` (decode),
    the prefill wrappers (target verify) or the draft-extend wrappers (draft extend v2). Names and id spaces as
    :func:`flashinfer_rails`. ``None``: another mode (dLLM, prefill graphs) or nothing planned for this size."""
    mode = getattr(forward_batch, "forward_mode", None)
    if mode is None:
        return None
    bs = int(forward_batch.batch_size)
    if mode.is_decode_or_idle():
        wrappers = (getattr(backend, "decode_cuda_graph_metadata", None) or {}).get(bs)
        updater = getattr(backend, "indices_updater_decode", None)
    elif mode.is_target_verify():
        wrappers = (getattr(backend, "prefill_cuda_graph_metadata", None) or {}).get(bs)
        updater = getattr(backend, "indices_updater_prefill", None)
    elif mode.is_draft_extend_v2():
        wrappers = (getattr(backend, "draft_extend_cuda_graph_metadata", None) or {}).get(bs)
        updater = getattr(backend, "indices_updater_prefill", None)
    else:
        return None
    if not wrappers:
        return None
    return _wrapper_rails(backend, wrappers, updater, backend.token_to_kv_pool, bs) or None


def ragged_guard_context(backend: Any, rails: dict[str, Rail]) -> tuple[Context, dict[str, Any]]:
    """The context and tensors a device-guard drain dumps for the ragged sets it checked last (``rails``):
    each set's live ids (up to its last offset, within the buffer) and offsets. Reads the device: call at the
    drain, after the step's sync."""
    live = backend.token_to_kv_pool
    page_size = int(backend.page_size)
    tables: dict[str, TableInfo] = {}
    tensors: dict[str, Any] = {}
    rows = None
    for rail in rails.values():
        numel = int(rail.indices.numel())
        end = int(rail.indptr[-1]) if rail.indptr.numel() else 0
        tensors[rail.name] = rail.indices[: min(max(end, 0), numel)]
        tensors[rail.name.replace("indices", "indptr")] = rail.indptr
        tables[rail.name] = TableInfo(pool=rail.space, bound=layer_rows(live, rail.space, page_size),
                                      handed_to_layer=None, shape=[numel])
        rows = int(rail.indptr.numel()) - 1
    context = _guard_context(backend, live, page_size).with_(tables=tables)
    if rows is not None:
        context = context.with_(batch_size=rows)
    return context, tensors


@dataclass
class RaggedSnapshot(LayerCall):
    """One layer's ragged KV read: the index set handed (``handed``), and for triton's unified
    (deterministic) extend the current tokens' ids appended to it (``extend``, a :class:`Rail` without
    offsets). Valid ids: ``[0, bound)``, ``bound`` the token rows of the pool this layer reads."""

    bound: int | None
    handed: Rail
    extend: Rail | None
    drift: dict[str, str]
    cache_seqlens: Any  # the batch's seq_lens (context batch size, and the dump)
    tensors: dict[str, Any]
    table_bounds: dict[str, TableInfo]
    pools: dict[str, PoolPages | None]
    backend: BackendState
    live_pool: LivePool
    forward_mode: str | None = None
    speculative: bool | None = None
    req_pool_indices: Any = None
    capturing: bool = False

    @property
    def handed_name(self) -> str:
        return self.handed.name

    @property
    def mismatch(self) -> bool:
        return self.handed.space != self.layer_type or (self.extend is not None and self.extend.space != self.layer_type)


def ragged_snapshot(
    backend: Any, layer: Any, forward_batch: Any, where: str, *, layer_type: str, index_in_pool: int | None,
    rails: dict[str, Rail], handed: Rail, extend: Rail | None, bound: int | None, drift: dict[str, str],
    capturing: bool,
) -> RaggedSnapshot:
    """The full snapshot of one layer's ragged read (built only once something looks wrong)."""
    live = backend.token_to_kv_pool
    page_size = int(backend.page_size)
    tensors: dict[str, Any] = {}
    infos: dict[str, TableInfo] = {}
    for rail in {**rails, handed.name: handed}.values():
        tensors[rail.name] = rail.indices
        tensors[rail.name.replace("indices", "indptr")] = rail.indptr
        infos[rail.name] = TableInfo(pool=rail.space, bound=layer_rows(live, rail.space, page_size),
                                     handed_to_layer=rail.name == handed.name, shape=list(rail.indices.shape))
    tensors["out_cache_loc"] = getattr(forward_batch, "out_cache_loc", None)
    tensors["swa_out_cache_loc"] = getattr(backend.forward_metadata, "swa_out_cache_loc", None)
    tensors["seq_lens"] = getattr(forward_batch, "seq_lens", None)
    if extend is not None and extend.name not in tensors:
        tensors[extend.name] = extend.indices
    return RaggedSnapshot(
        **_layer_call(backend, layer, forward_batch, where, layer_type, index_in_pool, capturing),
        bound=bound,
        handed=handed,
        extend=extend,
        drift=drift,
        cache_seqlens=getattr(forward_batch, "seq_lens", None),
        tensors=tensors,
        table_bounds=infos,
    )
