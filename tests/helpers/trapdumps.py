"""Dumps produced by real kvtrap traps firing on real sglang==0.5.23 objects (CPU).

Each ``make_*`` arms kvtrap, injects one real fault into real SGLang objects, calls the real (hooked)
SGLang method, and returns ``(dump_path, error)``. Used by the trap tests, the post-mortem CLI tests
and ``dumps/make_samples.py``. Importing SGLang takes a few seconds: import this module lazily.
"""

from __future__ import annotations

from pathlib import Path

import torch

import kvtrap
from helpers import sglang_world as w


def _fire(dump_dir: Path, call, inject: tuple[str, ...] = ()) -> tuple[Path, kvtrap.KVTrapError]:
    """Arm (with ``inject``), make ``call()``: the trap must fire. ``call`` may build its world (armed)."""
    with kvtrap.armed(mode="raise", dump_dir=str(dump_dir), inject=inject):
        try:
            call()
        except kvtrap.KVTrapError as err:
            assert err.dump_path is not None, err.dump_error
            return err.dump_path, err
    raise AssertionError("the trap did not fire")


def _filled(fill_pages: int, device: str = "cpu"):
    """A real pool and allocator with ``fill_pages`` full pages held by older requests whose tokens left the
    sliding window (SGLang released their SWA pages, the full ones stay): new full-pool ids start high."""
    pool = w.make_pool(device=device)
    alloc = w.make_allocator(pool, device=device)
    for _ in range(fill_pages // 8):
        older = w.allocate_requests(alloc, [8 * w.PAGE_SIZE])
        alloc.free_swa(older.token_slots[0])
    return pool, alloc


def decode_world(seq_lens=(40, 100, 17), *, stale=False, fill_pages: int = 0):
    """Pool, allocator, layers, a batch and a backend with its metadata set, ready for forward_decode.

    ``fill_pages`` first allocates (and keeps) that many pages of other requests, so the batch's
    full-pool page ids start high: how #26957's ids outgrow the SWA pool at high fill.
    """
    pool, alloc = _filled(fill_pages)
    batch = w.allocate_requests(alloc, list(seq_lens))
    full, swa, seqlens = w.page_tables(alloc, batch)
    layers = w.make_layers()
    if stale:
        backend = w.make_backend(pool, alloc, stale_swa_state=True, draft_pool=w.make_draft_pool())
        backend.token_to_kv_pool = pool  # what frozen_kv_target_view does at forward time
        w.set_metadata(backend, full, swa, seqlens, with_swa_table=False)
    else:
        backend = w.make_backend(pool, alloc)
        w.set_metadata(backend, full, swa, seqlens)
    fb = w.make_forward_batch(batch)
    return pool, alloc, layers, batch, backend, fb


def _decode(backend, layer, fb, bs):
    q, k, v = w.qkv(bs)
    backend.forward_decode(q, k, v, layer, fb)


def make_swa_slot_dump(dump_dir: Path, bad_page: int = 500):
    """Corrupted SWA free list: the allocator hands out an SWA slot beyond the SWA pool."""
    pool = w.make_pool()
    alloc = w.make_allocator(pool)
    alloc.swa_attn_allocator.free_pages[0] = bad_page
    return _fire(dump_dir, lambda: w.allocate_requests(alloc, [40]))


def make_26957_dump(dump_dir: Path, *, high_fill: bool = False):
    """Stale frozen-KV draft backend (SGLang #26957): an SWA layer is handed the full-pool table.

    ``high_fill=False``: ids are still below the SWA page count (caught on the first step anyway).
    ``high_fill=True``: ids are >= the SWA page count but < the full page count (where it faulted).
    """
    _, _, layers, batch, backend, fb = decode_world(stale=True, fill_pages=32 if high_fill else 0)
    swa_layer = next(layer for layer in layers if layer.layer_id in w.SWA_LAYERS)
    return _fire(dump_dir, lambda: _decode(backend, swa_layer, fb, len(batch.seq_lens)))


def make_drift_dump(dump_dir: Path):
    """Backend caches a full->SWA mapping that is not the live pool's (state drifted, tables still SWA)."""
    _, _, layers, batch, backend, fb = decode_world()
    backend._swa_full_to_swa_mapping = backend._swa_full_to_swa_mapping.clone()
    full_layer = next(layer for layer in layers if layer.layer_id in w.FULL_LAYERS)
    return _fire(dump_dir, lambda: _decode(backend, full_layer, fb, len(batch.seq_lens)))


def make_out_of_range_dump(dump_dir: Path, value: int | None = None, *, row: int = 1, column: int = 3):
    """One SWA-table id at (row, column) set to ``value`` (default: the SWA page count itself)."""
    _, _, layers, batch, backend, fb = decode_world()
    md = backend.forward_metadata
    swa_pages = w.SWA_PAGES + 1
    md.swa_page_table[row, column] = swa_pages if value is None else value
    swa_layer = next(layer for layer in layers if layer.layer_id in w.SWA_LAYERS)
    return _fire(dump_dir, lambda: _decode(backend, swa_layer, fb, len(batch.seq_lens)))


def make_negative_id_dump(dump_dir: Path):
    """A -1 sentinel inside a row's live prefix of the full table, read by a full layer."""
    _, _, layers, batch, backend, fb = decode_world()
    backend.forward_metadata.page_table[0, 1] = -1
    full_layer = next(layer for layer in layers if layer.layer_id in w.FULL_LAYERS)
    return _fire(dump_dir, lambda: _decode(backend, full_layer, fb, len(batch.seq_lens)))


def make_stale_row_dump(dump_dir: Path):
    """``cache_seqlens`` longer than the written prefix: the unwritten tail (garbage) is read as ids."""
    _, _, layers, batch, backend, fb = decode_world()
    backend.forward_metadata.cache_seqlens_int32[2] = 17 + 5 * w.PAGE_SIZE  # 2 pages written, 7 claimed
    full_layer = next(layer for layer in layers if layer.layer_id in w.FULL_LAYERS)
    return _fire(dump_dir, lambda: _decode(backend, full_layer, fb, len(batch.seq_lens)))


def make_seqlens_exceed_dump(dump_dir: Path):
    """``cache_seqlens`` needing more pages than the page table has columns."""
    _, _, layers, batch, backend, fb = decode_world()
    md = backend.forward_metadata
    width = md.page_table.shape[1]
    # keep every live id valid so only the width is wrong: a narrower view of the same table
    md.page_table = md.page_table[:, :2].contiguous()
    md.swa_page_table = md.swa_page_table[:, :2].contiguous()
    assert width > 2
    full_layer = next(layer for layer in layers if layer.layer_id in w.FULL_LAYERS)
    return _fire(dump_dir, lambda: _decode(backend, full_layer, fb, len(batch.seq_lens)))


def make_padding_page_dump(dump_dir: Path, *, row: int = 1, column: int = 2):
    """A real request's full-table row holds the reserved padding page 0 inside its live prefix (what a
    table built from an unwritten or cleared ``req_to_token`` row reads), handed to a full layer."""
    _, _, layers, batch, backend, fb = decode_world()
    backend.forward_metadata.page_table[row, column] = 0
    full_layer = next(layer for layer in layers if layer.layer_id in w.FULL_LAYERS)
    return _fire(dump_dir, lambda: _decode(backend, full_layer, fb, len(batch.seq_lens)))


def make_kv_write_dump(dump_dir: Path, *, swa: bool = False, value: int | None = None):
    """A K/V store about to write past its pool: ``out_cache_loc[1]`` past the full pool (a full layer), or,
    with ``swa``, ``swa_out_cache_loc[2]`` left untranslated (its full-pool slot; an SWA layer). The SWA case
    fills the full pool first so the batch's full slots lie past the SWA pool (an in-range one is not seen)."""
    _, alloc, layers, batch, backend, fb = decode_world(fill_pages=32 if swa else 0)
    w.set_write_locs(backend, alloc, fb)
    if swa:
        backend.forward_metadata.swa_out_cache_loc[2] = fb.out_cache_loc[2] if value is None else value
        layer = next(layer for layer in layers if layer.layer_id in w.SWA_LAYERS)
    else:
        fb.out_cache_loc[1] = (w.FULL_PAGES + 1) * w.PAGE_SIZE if value is None else value
        layer = next(layer for layer in layers if layer.layer_id in w.FULL_LAYERS)
    return _fire(dump_dir, lambda: _decode(backend, layer, fb, len(batch.seq_lens)))


def make_spec_context_limit_dump(dump_dir: Path, draft_tokens: int = 4, *, draft_decode: bool = False):
    """The last speculative step of a request at SGLang's length limit, built from real SGLang objects.

    SGLang 0.5.23 clips max_new_tokens so input + max_new <= context_len - 2; under the overlap scheduler one
    more step runs after the step that finishes the request, with up to ``draft_tokens`` more tokens already
    in seq_lens: seq_lens up to context_len + draft_tokens - 5 (context_len - 1 for 4 draft tokens). Its
    verify rows are seq_lens + draft_tokens long (TARGET_VERIFY through ``forward_extend``), its draft decode
    steps seq_lens + step + 1 (``draft_decode``: DECODE with spec_info through ``forward_decode``). The table
    has ceil(context_len / page_size) columns, as trtllm_mha sizes it.
    """
    pool = w.make_pool(full_pages=64, swa_pages=40)  # first: skips on a machine without SGLang's runtime
    from sglang.srt.speculative.eagle_info import EagleDraftInput

    alloc = w.make_allocator(pool)
    context_len = w.MAX_PAGES * w.PAGE_SIZE
    seq_len = context_len + draft_tokens - 5
    row = draft_tokens if not draft_decode else draft_tokens - 1  # verify: + draft; last draft step: + step + 1
    batch = w.allocate_requests(alloc, [seq_len + row])
    full, swa, seqlens = w.page_tables(alloc, batch)
    backend = w.make_backend(pool, alloc)
    assert backend.max_context_len == context_len
    backend.speculative_num_draft_tokens = draft_tokens
    w.set_metadata(backend, full, swa, seqlens)
    new = 1 if draft_decode else draft_tokens
    fb = w.make_forward_batch(batch, out_cache_loc=batch.token_slots[0][-new:])
    sg = w.sglang()
    fb.forward_mode = sg["ForwardMode"].DECODE if draft_decode else sg["ForwardMode"].TARGET_VERIFY
    fb.spec_info = EagleDraftInput()
    fb.seq_lens = torch.tensor([seq_len])
    fb.input_ids = torch.zeros(new, dtype=torch.int64)
    w.set_write_locs(backend, alloc, fb)
    full_layer = next(layer for layer in w.make_layers() if layer.layer_id in w.FULL_LAYERS)
    q, k, v = w.qkv(new)
    method = "forward_decode" if draft_decode else "forward_extend"  # looked up once armed (hooked)
    return _fire(dump_dir, lambda: getattr(backend, method)(q, k, v, full_layer, fb))


# ------------------------------------------------------------------------------------- free path
# Each *_world is called armed (the allocations fill kvtrap's ownership record through the alloc hook, as
# in a server): it builds real objects, injects the fault, and returns (alloc, batch, the bad call).
def _armed_batch(dump_dir: Path, seq_lens=(40, 20)):
    alloc = w.make_allocator(w.make_pool())
    batch = w.allocate_requests(alloc, list(seq_lens))
    return alloc, batch


def fire_world(dump_dir: Path, world, inject: tuple[str, ...] = ()) -> tuple[Path, kvtrap.KVTrapError]:
    """Arm (with ``inject``), build ``world(dump_dir)``, make its bad call; the trap must fire."""
    return _fire(dump_dir, lambda: world(dump_dir)[2](), inject)


def swa_page0_free_world(dump_dir: Path):
    """Tokens whose SWA side is already gone (mapping 0) freed through the segment path, which in 0.5.23
    does not filter unmapped slots (SGLang PR #38519): page 0 would enter the SWA free list."""
    alloc, batch = _armed_batch(dump_dir)
    a = batch.token_slots[0]
    alloc.free_swa(a[: 2 * w.PAGE_SIZE])  # window eviction: SWA pages gone, mapping cleared
    return alloc, batch, lambda: alloc.free_segment(a[: 2 * w.PAGE_SIZE], start_pos=0)


def swa_double_free_world(dump_dir: Path):
    """A stale mapping left after a free (restored by hand): freeing again would free the SWA pages twice."""
    alloc, batch = _armed_batch(dump_dir)
    a = batch.token_slots[0]
    stale = alloc.full_to_swa_index_mapping[a].clone()
    alloc.free_swa(a)
    alloc.full_to_swa_index_mapping[a] = stale
    return alloc, batch, lambda: alloc.free_swa(a)


def swa_not_owned_world(dump_dir: Path):
    """Request A's first page maps to request B's SWA page: freeing A would free B's live page."""
    alloc, batch = _armed_batch(dump_dir)
    a, b = batch.token_slots
    first = slice(0, w.PAGE_SIZE)
    alloc.full_to_swa_index_mapping[a[first]] = alloc.full_to_swa_index_mapping[b[first]]
    return alloc, batch, lambda: alloc.free(a)


def make_swa_page0_free_dump(dump_dir: Path):
    return fire_world(dump_dir, swa_page0_free_world)


def make_swa_double_free_dump(dump_dir: Path):
    return fire_world(dump_dir, swa_double_free_world)


def make_swa_not_owned_dump(dump_dir: Path):
    return fire_world(dump_dir, swa_not_owned_world)


# ------------------------------------------------------------------------ the SWA free-path bug zoo
# Called armed with the bug injected (KVTRAP_INJECT); the same steps without it are clean (see the tests).
BUG_38269_WINDOW = 2 * w.PAGE_SIZE


def bug_38269_world(dump_dir: Path, *, group: bool = True):
    """SGLang #38269 on the path a server takes: request A (100 tokens) runs past its window, SGLang's window
    eviction releases the SWA side of its first 4 pages and clears their mapping; A finishes and
    ``release_kv_cache`` frees its row. Request B (4 pages) is still running, so the SWA free list has room
    for what a wrong release adds (SGLang's own ``available_size() <= size`` assert stays quiet, as under
    load). ``--disable-radix-cache``: a disabled UnifiedRadixCache, as 0.5.23 builds it."""
    alloc = w.make_allocator(w.make_pool())
    cache = w.make_unified_cache(alloc, BUG_38269_WINDOW)
    req_a, a = w.admit_request(cache, alloc, 100, "A")
    _, b = w.admit_request(cache, alloc, 4 * w.PAGE_SIZE, "B")
    w.evict_window(cache, req_a, 100)
    assert req_a.kv.component_evicted_seqlens and max(req_a.kv.component_evicted_seqlens.values()) == 64
    batch = w.Batch(seq_lens=[100, 4 * w.PAGE_SIZE], token_slots=[a, b])
    return alloc, batch, lambda: w.release_finished(cache, req_a, group=group)


def bug_27779_world(dump_dir: Path):
    """SGLang #27779: a free of part of a page (here the first 5 tokens) releases the whole SWA page; the
    rest of the page stays mapped, and freeing the request frees that SWA page again."""
    alloc, batch = _armed_batch(dump_dir)
    a = batch.token_slots[0]
    alloc.free_swa(a[:5])
    return alloc, batch, lambda: alloc.free(a)


def swa_tail_alloc(alloc, n: int, tail: int) -> torch.Tensor:
    """One request through the real ``alloc_extend_swa_tail`` the way PD decode preallocates it."""
    zero = torch.zeros(1, dtype=torch.int64)
    seq = torch.tensor([n], dtype=torch.int64)
    out = alloc.alloc_extend_swa_tail(prefix_lens=zero, prefix_lens_cpu=zero.clone(), seq_lens=seq,
                                      seq_lens_cpu=seq.clone(), last_loc=torch.tensor([-1]),
                                      extend_num_tokens=n, swa_tail_len=tail)
    assert out is not None
    return out


def bug_25805_world(dump_dir: Path):
    """SGLang #25805: recycled full pages still hold a previous request's mapping (the upstream precondition,
    written back here after R0's free); R1 gets them through ``alloc_extend_swa_tail`` with SWA for its tail
    only; R2 gets R0's old SWA pages; freeing R1 reads the head's stale entries and frees R2's SWA page."""
    alloc = w.make_allocator(w.make_pool())
    r0 = w.allocate_requests(alloc, [3 * w.PAGE_SIZE]).token_slots[0]
    stale = alloc.full_to_swa_index_mapping[r0].clone()
    alloc.free(r0)
    alloc.full_to_swa_index_mapping[r0] = stale  # R0's entries left on its recycled full slots
    r1 = swa_tail_alloc(alloc, 3 * w.PAGE_SIZE, w.PAGE_SIZE)
    assert torch.equal(r1, r0)  # the recycled full pages (freed pages go to the front of the free list)
    batch = w.allocate_requests(alloc, [3 * w.PAGE_SIZE])  # R2
    batch.token_slots.insert(0, r1)
    batch.seq_lens.insert(0, 3 * w.PAGE_SIZE)
    return alloc, batch, lambda: alloc.free(r1)


def make_38269_dump(dump_dir: Path):
    return fire_world(dump_dir, bug_38269_world, inject=("sglang-38269",))


def make_27779_dump(dump_dir: Path):
    return fire_world(dump_dir, bug_27779_world, inject=("sglang-27779",))


def make_25805_dump(dump_dir: Path):
    return fire_world(dump_dir, bug_25805_world, inject=("sglang-25805",))


# ------------------------------------------------------------------------------------ triton backend
TRITON_WINDOW = 48  # smaller than the requests, so window rails really are the last tokens of each


def triton_world(seq_lens=(40, 100, 17), *, prefix_lens=None, deterministic=False, fill_pages: int = 0,
                 device: str = "cpu"):  # fmt: skip
    """Pool, allocator, layers, a batch, a real TritonAttnBackend with its metadata set, and the batch:
    decode (``prefix_lens`` None) or extend (the first ``prefix_lens`` tokens cached). ``fill_pages`` as in
    :func:`decode_world` (full-pool ids start high). ``device="cuda"``: pool, allocator, decode batch and
    metadata on the GPU (SGLang's allocator kernels compiled)."""
    pool, alloc = _filled(fill_pages, device)
    batch = w.allocate_requests(alloc, list(seq_lens))
    layers = w.make_layers(window=TRITON_WINDOW)
    backend = w.make_triton_backend(pool, deterministic=deterministic, device=device)
    if prefix_lens is None:
        fb = w.make_forward_batch(batch, device=device)
    else:
        fb = w.make_extend_batch(batch, list(prefix_lens))
    w.set_triton_metadata(backend, alloc, batch, fb, prefix_lens=prefix_lens, window=TRITON_WINDOW)
    return pool, alloc, layers, batch, backend, fb


def triton_qkv(fb, seed: int = 0):
    n = int(fb.out_cache_loc.numel())
    return w.qkv(n, seed)


def attend(backend, layer, fb, seed: int = 0):
    """One layer's real ``forward_decode`` / ``forward_extend`` (by the batch's mode); flashinfer's too."""
    q, k, v = triton_qkv(fb, seed)
    method = backend.forward_decode if fb.forward_mode.is_decode() else backend.forward_extend
    return method(q, k, v, layer, fb)


def make_triton_out_of_range_dump(dump_dir: Path, value: int | None = None):
    """A window id past the SWA pool's rows, handed to the first SWA layer's decode kernel."""
    _, _, layers, _, backend, fb = triton_world()
    backend.forward_metadata.window_kv_indices[5] = w.SWA_PAGES * w.PAGE_SIZE + w.PAGE_SIZE if value is None else value
    return _fire(dump_dir, lambda: attend(backend, layers[0], fb))


def make_triton_indptr_dump(dump_dir: Path):
    """kv_indptr that decreases (request 1's range ends before it starts), handed to a full layer."""
    _, _, layers, _, backend, fb = triton_world()
    backend.forward_metadata.kv_indptr[2] = 3
    full = next(layer for layer in layers if layer.layer_id in w.FULL_LAYERS)
    return _fire(dump_dir, lambda: attend(backend, full, fb))


def make_24394_dump(dump_dir: Path, *, high_fill: bool = True):
    """SGLang #24394 injected: deterministic extend appends full-pool ids for an SWA layer. ``high_fill``:
    the batch's full-pool ids are past the SWA pool's rows (where it faulted upstream)."""
    _, _, layers, _, backend, fb = triton_world(prefix_lens=(30, 90, 10), deterministic=True,
                                                fill_pages=32 if high_fill else 0)
    return _fire(dump_dir, lambda: attend(backend, layers[0], fb), inject=("sglang-24394",))


# -------------------------------------------------------------------------------- flashinfer backend
def flashinfer_world(seq_lens=(40, 100, 17), *, prefix_lens=None, dflash_draft=False, device: str = "cpu"):
    """Pool, allocator, layers, a batch, a real FlashInferAttnBackend built from a real ModelRunner (its SWA
    pool resolved by SGLang's own ``_resolve_swa_kv_pool``) with its wrappers planned, and the batch.

    ``dflash_draft``: the runner is a DFlash draft worker whose active pool is the SWA pool but whose allocator
    is SGLang's plain paged allocator (not an SWA allocator type): the state SGLang #27737 mis-resolved.
    ``device="cuda"`` (decode, not ``dflash_draft``): pool, allocator, batch and planned ids on the GPU.
    """
    pool = w.make_pool(device=device)
    alloc = w.make_allocator(pool, device=device)
    batch = w.allocate_requests(alloc, list(seq_lens))
    layers = w.make_layers(window=TRITON_WINDOW)
    if dflash_draft:
        runner = w.make_runner(pool, w.make_plain_allocator(pool), draft=True, algorithm="DFLASH")
    else:
        runner = w.make_runner(pool, alloc)
    backend = w.make_flashinfer_backend(runner, window=TRITON_WINDOW)
    if prefix_lens is None:
        fb = w.make_forward_batch(batch, device=device)
    else:
        fb = w.make_extend_batch(batch, list(prefix_lens))
    w.set_flashinfer_metadata(backend, alloc, batch, fb, prefix_lens=prefix_lens)
    return pool, alloc, layers, batch, backend, fb


def make_flashinfer_out_of_range_dump(dump_dir: Path, value: int | None = None):
    """A window id past the SWA pool's rows in the ids wrapper 0 was planned with."""
    _, _, layers, _, backend, fb = flashinfer_world()
    ids = backend.forward_metadata.decode_wrappers[0]._paged_kv_indices_buf
    ids[5] = w.SWA_PAGES * w.PAGE_SIZE + w.PAGE_SIZE if value is None else value
    return _fire(dump_dir, lambda: attend(backend, layers[0], fb))


def make_27737_dump(dump_dir: Path):
    """SGLang #27737 injected: a DFlash draft's flashinfer backend resolves no SWA pool (allocator-based)."""
    def call():  # the backend is built armed: its __init__-time resolver is the injected one
        _, _, layers, _, backend, fb = flashinfer_world(dflash_draft=True)
        attend(backend, layers[0], fb)

    return _fire(dump_dir, call, inject=("sglang-27737",))


# ------------------------------------------------------------------------------------------------ fa3
def bug_24402_world(dump_dir: Path, history: str = "diverged"):
    """SGLang #24402 on real fa3 objects (built armed with the injection: it acts in init_forward_metadata):
    an EAGLE-tree target verify whose speculative SWA table fa3 builds from untranslated full-pool ids,
    then the first SWA layer's ``forward_extend``, the kernel launch replaced by a recorder (CPU)."""
    from helpers import fa3_world as fw

    world = fw.verify_world(history=history)
    recorder = fw.KernelRecorder()
    fa = fw.fa3_module()
    layer = next(layer for layer in world.layers if layer.layer_id in w.SWA_LAYERS)
    n = int(world.fb.input_ids.shape[0])
    q, k, v = w.qkv(n)

    def call():
        saved = fa.flash_attn_with_kvcache
        fa.flash_attn_with_kvcache = recorder
        try:
            world.backend.forward_extend(q, k, v, layer, world.fb)
        finally:
            fa.flash_attn_with_kvcache = saved
        assert recorder.calls == [], "the kernel was launched before the trap"

    return world, recorder, call


def make_24402_dump(dump_dir: Path, *, wrapped: bool = False):
    """#24402: in range of the SWA pool but untranslated (``diverged``), or past it (``wrapped``)."""
    history = "wrapped" if wrapped else "diverged"
    return fire_world(dump_dir, lambda d: bug_24402_world(d, history), inject=("sglang-24402",))


ALL = {
    "swa-slot": make_swa_slot_dump,
    "26957": make_26957_dump,
    "26957-high-fill": lambda d: make_26957_dump(d, high_fill=True),
    "drift": make_drift_dump,
    "out-of-range": make_out_of_range_dump,
    "negative-id": make_negative_id_dump,
    "stale-row": make_stale_row_dump,
    "seqlens-exceed": make_seqlens_exceed_dump,
    "spec-context-limit": make_spec_context_limit_dump,
    "spec-context-limit-draft-decode": lambda d: make_spec_context_limit_dump(d, draft_decode=True),
    "padding-page": make_padding_page_dump,
    "kv-write": make_kv_write_dump,
    "kv-write-swa": lambda d: make_kv_write_dump(d, swa=True),
    "swa-page0-free": make_swa_page0_free_dump,
    "swa-double-free": make_swa_double_free_dump,
    "swa-not-owned": make_swa_not_owned_dump,
    "38269": make_38269_dump,
    "27779": make_27779_dump,
    "25805": make_25805_dump,
    "triton-out-of-range": make_triton_out_of_range_dump,
    "triton-indptr": make_triton_indptr_dump,
    "24394": make_24394_dump,
    "flashinfer-out-of-range": make_flashinfer_out_of_range_dump,
    "27737": make_27737_dump,
    "24402": make_24402_dump,
    "24402-wrapped": lambda d: make_24402_dump(d, wrapped=True),
}


def check_full_write_trap(err: kvtrap.KVTrapError, locs, value: int, full_rows: int, hook: str) -> None:
    """A full layer's write location ``value`` at position 1 of ``locs`` trapped as ``kv_write_out_of_range``,
    with the dump saying so (shared by the ragged backends' KV-write tests)."""
    v = err.violation
    assert (v.kind, v.table, v.pool, v.layer_type) == ("kv_write_out_of_range", "out_cache_loc", "full", "full")
    assert (v.row, v.value, v.lower, v.bound, v.count, v.fatal) == (1, value, 0, full_rows, 1, True)
    dump = kvtrap.load_dump(err.dump_path)
    assert dump.kind == "kv_write_out_of_range"
    assert dump.tensors["out_cache_loc"].tolist() == locs.tolist()
    ctx = dump.manifest["context"]
    assert ctx["hook"] == hook
    assert ctx["layer"]["type"] == "full" and ctx["pools"]["full"]["rows"] == full_rows
