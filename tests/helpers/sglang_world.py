"""Real sglang==0.5.23 objects on the CPU, wired the way a Gemma-4-like model server wires them.

Everything here is SGLang's own class: ``SWAKVPool`` + ``SWATokenToKVPoolAllocator`` allocate for real,
``RadixAttention`` layers, ``ForwardBatch`` and ``TRTLLMMHAMetadata`` are SGLang's. The backend is a
*partially constructed* real ``TRTLLMHAAttnBackend`` (``object.__new__`` plus the attributes its
``__init__`` would set from a model runner), because its ``__init__`` needs a GPU model runner.
Its methods (``_get_layer_page_table``, ``forward_decode`` up to the FlashInfer launch) are SGLang's.

Page tables are built the way SGLang builds them: ``page_table[r, j] = req_to_token[r, j*ps] // ps``
and the SWA table is the same through ``full_to_swa_index_mapping`` (SGLang does this on device in
``build_trtllm_mha_page_table``; the result is identical for the live prefix).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PAGE_SIZE = 16
FULL_PAGES = 64
SWA_PAGES = 16
# Gemma-4-like layer pattern: sliding layers with a full layer every few (E4B: 35 sliding / 7 full).
SWA_LAYERS = [0, 1, 2, 4]
FULL_LAYERS = [3, 5]
WINDOW = 512
MAX_PAGES = 32  # table width (max_context_len // page_size)


def sglang():
    """Import the SGLang pieces lazily (importing takes seconds). On the GPU machine, where ``sglang.srt``
    cannot import (no ``sgl_kernel``), the calling test is skipped (see ``srt.py``)."""
    from helpers.srt import import_srt

    import_srt("sglang.srt.mem_cache.swa_memory_pool")
    from sglang.srt.layers.attention.trtllm_mha_backend import TRTLLMHAAttnBackend, TRTLLMMHAMetadata
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    return {
        "TRTLLMHAAttnBackend": TRTLLMHAAttnBackend,
        "TRTLLMMHAMetadata": TRTLLMMHAMetadata,
        "RadixAttention": RadixAttention,
        "SWATokenToKVPoolAllocator": SWATokenToKVPoolAllocator,
        "MHATokenToKVPool": MHATokenToKVPool,
        "SWAKVPool": SWAKVPool,
        "ForwardBatch": ForwardBatch,
        "ForwardMode": ForwardMode,
    }


def make_pool(page_size: int = PAGE_SIZE, full_pages: int = FULL_PAGES, swa_pages: int = SWA_PAGES, *,
              head_dim: int = 8, device: str = "cpu"):  # fmt: skip
    sg = sglang()
    return sg["SWAKVPool"](
        size=full_pages * page_size,
        size_swa=swa_pages * page_size,
        page_size=page_size,
        dtype=torch.bfloat16,
        head_num=1,
        head_dim=head_dim,
        swa_attention_layer_ids=SWA_LAYERS,
        full_attention_layer_ids=FULL_LAYERS,
        device=device,
    )


def make_allocator(pool, page_size: int = PAGE_SIZE, *, device: str = "cpu"):
    sg = sglang()
    return sg["SWATokenToKVPoolAllocator"](
        size=pool.size,
        size_swa=pool.size_swa,
        page_size=page_size,
        dtype=torch.bfloat16,
        device=device,
        kvcache=pool,
        need_sort=False,
    )


def make_layers(head_dim: int = 8, window: int = WINDOW):
    sg = sglang()
    layers = []
    for lid in sorted(SWA_LAYERS + FULL_LAYERS):
        swa = lid in SWA_LAYERS
        layers.append(
            sg["RadixAttention"](
                num_heads=2,
                head_dim=head_dim,
                scaling=head_dim**-0.5,
                num_kv_heads=1,
                layer_id=lid,
                sliding_window_size=window if swa else -1,
            )
        )
    return layers


@dataclass
class Batch:
    """Requests allocated for real; ``token_slots[r]`` are request r's full-pool slots in order."""

    seq_lens: list[int]
    token_slots: list[torch.Tensor] = field(default_factory=list)


def allocator_state(alloc) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copies of what a check must not change: the full-to-SWA mapping, the SWA and the full free lists."""
    return (
        alloc.full_to_swa_index_mapping.clone(),
        alloc.swa_attn_allocator.get_all_free_pages().clone(),
        alloc.full_attn_allocator.get_all_free_pages().clone(),
    )


def allocate_requests(alloc, seq_lens: list[int]) -> Batch:
    """Prefill ``len(seq_lens)`` fresh requests through the real ``alloc_extend``."""
    n = len(seq_lens)
    dev = getattr(alloc, "device", "cpu")  # the *_cpu arguments stay on the host, as SGLang passes them
    prefix = torch.zeros(n, dtype=torch.int64)
    seq = torch.tensor(seq_lens, dtype=torch.int64)
    last_loc = torch.full((n,), -1, dtype=torch.int64, device=dev)
    out = alloc.alloc_extend(prefix.to(dev), prefix.clone(), seq.to(dev), seq.clone(), last_loc, int(seq.sum()))
    assert out is not None, "allocator ran out of pages"
    batch = Batch(seq_lens=list(seq_lens))
    start = 0
    for length in seq_lens:
        batch.token_slots.append(out[start : start + length].clone())
        start += length
    return batch


def page_tables(alloc, batch: Batch, page_size: int = PAGE_SIZE, width: int = MAX_PAGES):
    """(page_table, swa_page_table, cache_seqlens) as SGLang builds them; the tail is garbage on purpose."""
    bs = len(batch.seq_lens)
    # torch.empty in SGLang: fill the tail with junk so tests prove it is ignored
    full = torch.full((bs, width), 987654, dtype=torch.int32)
    swa = torch.full((bs, width), -777, dtype=torch.int32)
    for r, slots in enumerate(batch.token_slots):
        # SGLang's builder has no column for pages past the width (a row longer than the table loses them)
        firsts = slots[::page_size][:width]
        full[r, : firsts.numel()] = (firsts // page_size).to(torch.int32)
        swa[r, : firsts.numel()] = (alloc.full_to_swa_index_mapping[firsts] // page_size).to(torch.int32)
    seqlens = torch.tensor(batch.seq_lens, dtype=torch.int32)
    return full, swa, seqlens


def make_backend(pool, alloc, *, stale_swa_state: bool = False, draft_pool=None):
    """A real TRTLLMHAAttnBackend with the attributes ``__init__`` sets from the model runner.

    ``stale_swa_state=True`` builds the SGLang #26957 draft backend: its SWA state was resolved at init
    from the draft's own plain pool (no SWA), while the frozen-KV views swap the target's SWAKVPool in.
    """
    sg = sglang()
    backend = object.__new__(sg["TRTLLMHAAttnBackend"])
    backend.page_size = PAGE_SIZE
    backend.device = "cpu"
    backend.data_type = torch.bfloat16
    backend.q_data_type = torch.bfloat16
    backend.max_context_len = MAX_PAGES * PAGE_SIZE
    backend.decode_uses_native_fp4 = False
    backend.is_nvfp4_kvcache = False
    backend.is_xqa_impl = True
    backend.workspace_buffer = torch.zeros(1024, dtype=torch.uint8)
    backend.decode_seq_len_splits = 1  # SGLang default: one FlashInfer launch per decode
    if stale_swa_state:
        backend.token_to_kv_pool = draft_pool if draft_pool is not None else pool
        backend._swa_kv_pool = None
        backend.use_sliding_window_kv_pool = False
        backend._swa_full_to_swa_mapping = None
    else:
        backend.token_to_kv_pool = pool
        backend._swa_kv_pool = pool
        backend.use_sliding_window_kv_pool = True
        backend._swa_full_to_swa_mapping = pool.full_to_swa_index_mapping
    backend.kv_cache_quant_method = pool.get_kv_cache_quant_method()
    backend.forward_metadata = None
    return backend


def make_draft_pool(page_size: int = PAGE_SIZE):
    """The frozen-KV draft's own small plain MHA pool (what #26957's backend resolved against)."""
    sg = sglang()
    return sg["MHATokenToKVPool"](
        size=8 * page_size,
        page_size=page_size,
        dtype=torch.bfloat16,
        head_num=1,
        head_dim=8,
        layer_num=len(SWA_LAYERS) + len(FULL_LAYERS),
        device="cpu",
        enable_memory_saver=False,
    )


def set_metadata(backend, full, swa, seqlens, *, with_swa_table: bool = True):
    sg = sglang()
    md = sg["TRTLLMMHAMetadata"]()
    md.page_table = full
    md.swa_page_table = swa if with_swa_table else None
    md.cache_seqlens_int32 = seqlens
    backend.forward_metadata = md
    return md


def set_write_locs(backend, alloc, fb):
    """The SWA write targets ``init_forward_metadata`` translates once per forward (swa_out_cache_loc)."""
    backend.forward_metadata.swa_out_cache_loc = alloc.full_to_swa_index_mapping[fb.out_cache_loc]


def make_forward_batch(batch: Batch, out_cache_loc: torch.Tensor | None = None, *, device: str = "cpu"):
    sg = sglang()
    bs = len(batch.seq_lens)
    seq = torch.tensor(batch.seq_lens, dtype=torch.int64, device=device)
    if out_cache_loc is None:
        out_cache_loc = torch.stack([s[-1] for s in batch.token_slots])
    return sg["ForwardBatch"](
        forward_mode=sg["ForwardMode"].DECODE,
        batch_size=bs,
        input_ids=torch.zeros(bs, dtype=torch.int64, device=device),
        # real request slots: SGLang's ReqToTokenPool reserves slot 0 for CUDA-graph padding rows
        req_pool_indices=torch.arange(1, bs + 1, dtype=torch.int64, device=device),
        seq_lens=seq,
        out_cache_loc=out_cache_loc,
        seq_lens_sum=int(seq.sum()),
    )


def qkv(bs: int, seed: int = 0, *, head_dim: int = 8, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bs, 2 * head_dim, generator=g).to(torch.bfloat16)
    k = torch.randn(bs, 1, head_dim, generator=g).to(torch.bfloat16)
    v = torch.randn(bs, 1, head_dim, generator=g).to(torch.bfloat16)
    return q.to(device), k.to(device), v.to(device)


def allocate_requests_or_none(alloc, seq_lens: list[int]) -> Batch | None:
    """Like :func:`allocate_requests`, but ``None`` when SGLang's allocator is out of pages."""
    try:
        return allocate_requests(alloc, seq_lens)
    except AssertionError:
        return None


def make_draft_runner(target_pool, alloc):
    """A real ``ModelRunner`` (partially constructed) for a frozen-KV MTP draft worker.

    It has what ``TRTLLMHAAttnBackend._resolve_swa_kv_pool`` reads: its own small plain pool, the
    target's allocator (shared, as SGLang shares it), ``is_draft_worker`` and the speculative algorithm.
    """
    from sglang.srt.model_executor.model_runner import ModelRunner
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    runner = object.__new__(ModelRunner)
    runner.token_to_kv_pool = make_draft_pool()
    runner.token_to_kv_pool_allocator = alloc
    runner.is_draft_worker = True
    runner.spec_algorithm = SpeculativeAlgorithm.FROZEN_KV_MTP
    return runner


def make_draft_backend(runner, target_pool):
    """The draft's TRTLLMHAAttnBackend, its SWA state set by SGLang's own resolver, as ``__init__`` does."""
    sg = sglang()
    backend = make_backend(target_pool, None)
    backend.token_to_kv_pool = runner.token_to_kv_pool  # __init__: the runner's own pool
    swa = sg["TRTLLMHAAttnBackend"]._resolve_swa_kv_pool(runner)
    backend._swa_kv_pool = swa
    backend.use_sliding_window_kv_pool = swa is not None
    backend._swa_full_to_swa_mapping = None if swa is None else swa.full_to_swa_index_mapping
    return backend


def frozen_kv_context(target_pool):
    from sglang.srt.speculative.frozen_kv_mtp_info import FrozenKVMTPContext

    layer_ids = SWA_LAYERS + FULL_LAYERS
    return FrozenKVMTPContext(target_token_to_kv_pool=target_pool, physical_layer_ids={i: i for i in layer_ids})


def init_metadata_like_sglang(backend, alloc, batch, fb):
    """What ``init_forward_metadata`` leaves behind: an SWA table only when the backend has an SWA pool."""
    full, swa, seqlens = page_tables(alloc, batch)
    md = set_metadata(backend, full, swa, seqlens, with_swa_table=backend._swa_kv_pool is not None)
    if backend._swa_kv_pool is not None:
        set_write_locs(backend, alloc, fb)
    return md


# ------------------------------------------------------------------------------------ triton backend
class KernelRecorder:
    """Stands where a real Triton kernel launch is (it cannot run on a CPU machine): records each call's
    arguments (cloned tensors) and returns. ``real`` is SGLang's kernel function it replaces, kept so a
    test can assert which launch was reached."""

    def __init__(self, real, result=None):
        self.real = real
        self.result = result  # what computes the launch's return value, if the caller needs one
        self.calls: list[tuple] = []

    def __call__(self, *args, **kwargs):
        self.calls.append(tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
        return None if self.result is None else self.result(*args)


def triton_classes():
    from helpers.srt import import_srt

    mod = import_srt("sglang.srt.layers.attention.triton_backend")
    return mod.TritonAttnBackend, mod.ForwardMetadata


def make_triton_backend(pool, *, deterministic: bool = False, device: str = "cpu"):
    """A real ``TritonAttnBackend`` with the attributes its ``__init__`` sets from a model runner (which
    needs a GPU); its kernel launches are :class:`KernelRecorder` s wrapping SGLang's real kernel functions.
    ``forward_decode`` / ``forward_extend`` / ``_forward_extend_unified`` are SGLang's and run on CPU up to
    the launch (the K/V store into the real pool included)."""
    from sglang.kernels.ops.attention import decode_attention, extend_attention

    cls, _ = triton_classes()
    backend = object.__new__(cls)
    backend.device = device
    backend.page_size = PAGE_SIZE
    backend.token_to_kv_pool = pool
    backend.use_sliding_window_kv_pool = is_swa(pool)
    backend.sliding_window_size = WINDOW
    backend.use_mla = False
    backend.is_draft_runner = False
    backend.dcp_size = 1
    backend.swa_v_head_dim = None
    backend.max_kv_splits = 8
    backend.use_pdl = False
    backend.enable_deterministic = deterministic
    backend.enable_lean_attention = False
    backend.use_dense_fp8_chunked_prefill = False
    backend.allow_bidirectional_attention_in_extend = False
    backend.use_verify_shared_kv = False
    backend.use_verify_splitkv = False
    backend.dllm_attention = None
    backend.max_context_len = MAX_PAGES * PAGE_SIZE
    backend.decode_attention_fwd = KernelRecorder(decode_attention.decode_attention_fwd)
    backend.extend_attention_fwd = KernelRecorder(extend_attention.extend_attention_fwd)
    backend.extend_attention_fwd_unified = KernelRecorder(extend_attention.extend_attention_fwd_unified)
    # an index gather, not attention: it runs for real (in Triton's interpreter on a CPU machine)
    real_build = extend_attention.build_unified_kv_indices
    backend.build_unified_kv_indices = KernelRecorder(real_build, real_build)
    backend.forward_metadata = None
    return backend


def is_swa(pool) -> bool:
    return hasattr(pool, "swa_kv_pool")


def kv_snapshot(pool) -> dict:
    """Every layer's K and V buffers, cloned (to show a trapped call stored nothing)."""
    return {lid: (pool.get_key_buffer(lid).clone(), pool.get_value_buffer(lid).clone())
            for lid in SWA_LAYERS + FULL_LAYERS}


def same_kv(a: dict, b: dict, skip=()) -> bool:
    return all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a if k not in skip)


def kernel_calls(backend) -> int:
    return sum(len(getattr(backend, n).calls) for n in (
        "decode_attention_fwd", "extend_attention_fwd", "extend_attention_fwd_unified", "build_unified_kv_indices"))


def _ragged(slot_lists, translate=None):
    """(indptr, flat ids) of ``slot_lists``, on the slots' device."""
    lens = [int(s.numel()) for s in slot_lists]
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0).to(torch.int32)
    flat = torch.cat(slot_lists) if slot_lists else torch.zeros(0, dtype=torch.int64)
    return indptr.to(flat.device), (flat if translate is None else translate[flat]).to(torch.int64)


def set_triton_metadata(backend, alloc, batch: Batch, fb, *, prefix_lens=None, window: int = WINDOW):
    """``ForwardMetadata`` as ``init_forward_metadata`` builds it (SGLang builds the ids with Triton gathers,
    which cannot run here): ``kv_indptr`` / ``kv_indices`` = the requests' token slots (the prefix only for
    an extend), the window rail = the last ``min(len, window)`` of them, translated through
    ``full_to_swa_index_mapping`` on an SWA pool, ``swa_out_cache_loc`` = the translated ``out_cache_loc``."""
    _, fm = triton_classes()
    pool = backend.token_to_kv_pool
    lens = prefix_lens if prefix_lens is not None else batch.seq_lens
    slots = [s[:n] for s, n in zip(batch.token_slots, lens, strict=True)]
    kv_indptr, kv_indices = _ragged(slots)
    mapping = alloc.full_to_swa_index_mapping if is_swa(pool) else None
    win_indptr, win_indices = _ragged([s[max(0, s.numel() - window):] for s in slots], mapping)
    bs = len(batch.seq_lens)
    decode = prefix_lens is None
    dev = kv_indices.device
    splits = torch.full((bs,), backend.max_kv_splits, dtype=torch.int32, device=dev) if decode else None
    md = fm(
        attn_logits=torch.zeros(bs, 2, backend.max_kv_splits, 8, device=dev) if decode else None,
        attn_lse=torch.zeros(bs, 2, backend.max_kv_splits, device=dev) if decode else None,
        max_extend_len=None if decode else max(n - p for n, p in zip(batch.seq_lens, lens, strict=True)),
        num_kv_splits=splits,
        kv_indptr=kv_indptr,
        kv_indices=kv_indices,
        qo_indptr=None if decode else _ragged([s[p:] for s, p in zip(batch.token_slots, lens, strict=True)])[0],
        custom_mask=None,
        mask_indptr=None,
        window_kv_indptr=win_indptr,
        window_kv_indices=win_indices,
        window_num_kv_splits=None if splits is None else splits.clone(),
        window_kv_offsets=None if decode else torch.tensor(
            [max(0, p - window) for p in lens], dtype=torch.int64),
        swa_out_cache_loc=alloc.full_to_swa_index_mapping[fb.out_cache_loc] if is_swa(pool) else None,
    )
    backend.forward_metadata = md
    return md


def make_extend_batch(batch: Batch, prefix_lens: list[int]):
    """An EXTEND ``ForwardBatch`` for requests whose first ``prefix_lens`` tokens are cached: the new tokens'
    slots (the rest of each request's slots) are ``out_cache_loc``."""
    sg = sglang()
    bs = len(batch.seq_lens)
    ext = [n - p for n, p in zip(batch.seq_lens, prefix_lens, strict=True)]
    out = torch.cat([s[p:] for s, p in zip(batch.token_slots, prefix_lens, strict=True)])
    starts = torch.zeros(bs, dtype=torch.int32)
    starts[1:] = torch.cumsum(torch.tensor(ext[:-1]), 0).to(torch.int32)
    return sg["ForwardBatch"](
        forward_mode=sg["ForwardMode"].EXTEND,
        batch_size=bs,
        input_ids=torch.zeros(int(sum(ext)), dtype=torch.int64),
        req_pool_indices=torch.arange(1, bs + 1, dtype=torch.int64),
        seq_lens=torch.tensor(batch.seq_lens, dtype=torch.int64),
        out_cache_loc=out,
        seq_lens_sum=int(sum(batch.seq_lens)),
        extend_prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32),
        extend_prefix_lens_cpu=list(prefix_lens),
        extend_seq_lens=torch.tensor(ext, dtype=torch.int32),
        extend_seq_lens_cpu=ext,
        extend_start_loc=starts,
    )


# -------------------------------------------------------------------------------- flashinfer backend
def flashinfer_classes():
    from helpers.srt import import_srt

    mod = import_srt("sglang.srt.layers.attention.flashinfer_backend")
    return mod


def make_runner(pool, alloc, *, draft: bool = False, algorithm: str = "NONE"):
    """A real ``ModelRunner`` (partially constructed) with what the backends' ``_resolve_swa_kv_pool`` reads."""
    from sglang.srt.model_executor.model_runner import ModelRunner
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    runner = object.__new__(ModelRunner)
    runner.token_to_kv_pool = pool
    runner.token_to_kv_pool_allocator = alloc
    runner.is_draft_worker = draft
    runner.spec_algorithm = getattr(SpeculativeAlgorithm, algorithm)
    return runner


def make_plain_allocator(pool, page_size: int = PAGE_SIZE):
    """SGLang's plain paged allocator over ``pool`` (not an SWA allocator type)."""
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator

    return PagedTokenToKVPoolAllocator(pool.size, page_size, torch.bfloat16, "cpu", kvcache=pool, need_sort=False)


def _planned_wrapper(cls, indptr, indices):
    """A real FlashInfer paged wrapper in the state its ``plan`` leaves (outside CUDA graphs): the index
    buffers it keeps for ``run``. Its constructor pins host memory and ``plan`` / ``run`` launch CUDA work,
    which a CPU machine cannot do, so the planned state is set the way ``plan`` sets it and ``forward`` is a
    :class:`KernelRecorder` of the real method."""
    wrapper = object.__new__(cls)
    wrapper._paged_kv_indptr_buf = indptr
    wrapper._paged_kv_indices_buf = indices
    wrapper._paged_kv_last_page_len_buf = torch.ones(indptr.numel() - 1, dtype=torch.int32).to(indptr.device)
    wrapper.forward = KernelRecorder(cls.forward, lambda q, *_: torch.zeros_like(q))  # the output's shape
    return wrapper


def make_flashinfer_backend(runner, window: int = WINDOW):
    """A real ``FlashInferAttnBackend`` (and its real decode / prefill indices updaters) with the attributes
    their ``__init__`` set from ``runner``; the SWA pool is resolved by SGLang's own ``_resolve_swa_kv_pool``
    (as ``__init__`` does), so an injected resolver shows up here."""
    fi = flashinfer_classes()
    backend = object.__new__(fi.FlashInferAttnBackend)
    backend.token_to_kv_pool = runner.token_to_kv_pool
    backend.req_to_token_pool = None
    backend._swa_kv_pool = fi.FlashInferAttnBackend._resolve_swa_kv_pool(runner)
    backend.use_sliding_window_kv_pool = backend._swa_kv_pool is not None
    backend.kv_cache_quant_method = runner.token_to_kv_pool.get_kv_cache_quant_method()
    backend.decode_uses_dequant_workspace = False
    backend.prefill_uses_dequant_workspace = False
    backend.page_size = PAGE_SIZE
    backend.max_context_len = MAX_PAGES * PAGE_SIZE
    backend.num_wrappers = 2
    backend.dispatch_reason = fi.WrapperDispatch.SLIDING_WINDOW
    backend.sliding_window_size = window
    backend.forward_metadata = None
    for name, cls in (("indices_updater_decode", fi.FlashInferIndicesUpdaterDecode),
                      ("indices_updater_prefill", fi.FlashInferIndicesUpdaterPrefill)):
        updater = object.__new__(cls)
        updater.attn_backend = backend
        updater.sliding_window_size = window
        updater._swa_kv_pool = backend._swa_kv_pool  # as its __init__ copies it
        setattr(backend, name, updater)
    return backend


def set_flashinfer_metadata(backend, alloc, batch: Batch, fb, *, prefix_lens=None):
    """The wrappers' planned ids as ``update_sliding_window`` + ``call_begin_forward`` build them (that
    gather runs on CUDA in SGLang): wrapper 0 (window layers) the last ``min(len, window + 1)`` tokens of
    each request, translated by the updater's ``_swa_kv_pool`` when it has one (SGLang's own
    ``translate_loc_from_full_to_swa``); wrapper 1 every token (an extend: the prefix only)."""
    fi = flashinfer_classes()
    lens = prefix_lens if prefix_lens is not None else batch.seq_lens
    slots = [s[:n] for s, n in zip(batch.token_slots, lens, strict=True)]
    window = backend.sliding_window_size
    decode = prefix_lens is None
    updater = backend.indices_updater_decode if decode else backend.indices_updater_prefill
    win_indptr, win_ids = _ragged([s[max(0, s.numel() - (window + 1)) :] for s in slots])
    if updater._swa_kv_pool is not None:
        win_ids = updater._swa_kv_pool.translate_loc_from_full_to_swa(win_ids).to(torch.int64)
    full_indptr, full_ids = _ragged(slots)
    import flashinfer

    cls = flashinfer.BatchDecodeWithPagedKVCacheWrapper if decode else flashinfer.BatchPrefillWithPagedKVCacheWrapper
    wrappers = [_planned_wrapper(cls, win_indptr, win_ids.to(torch.int32)),
                _planned_wrapper(cls, full_indptr, full_ids.to(torch.int32))]
    swa_loc = alloc.full_to_swa_index_mapping[fb.out_cache_loc] if backend.use_sliding_window_kv_pool else None
    if decode:
        md = fi.DecodeMetadata(decode_wrappers=wrappers, swa_out_cache_loc=swa_loc)
    else:
        md = fi.PrefillMetadata(prefill_wrappers=wrappers, use_ragged=False, extend_no_prefix=False,
                                swa_out_cache_loc=swa_loc)
    backend.forward_metadata = md
    return md


# ------------------------------------------------------------------ requests through SGLang's own cache
# The release path a server takes for a finished request: a real ``UnifiedRadixCache`` (what 0.5.23 builds for
# a hybrid-SWA model; ``disable=True`` is ``--disable-radix-cache``), real ``Req`` objects with rows in a real
# ``ReqToTokenPool``, window eviction through ``evict_sliding_windows`` and the release through
# ``release_kv_cache``, each inside the allocator's free group as the scheduler calls them.
def make_unified_cache(alloc, window: int, *, disable: bool = True):
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.mem_cache.unified_cache.components import ComponentType
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    r2t = ReqToTokenPool(size=4, max_context_len=MAX_PAGES * PAGE_SIZE, device="cpu", enable_memory_saver=False)
    params = CacheInitParams(disable=disable, req_to_token_pool=r2t, token_to_kv_pool_allocator=alloc,
                             page_size=alloc.page_size, sliding_window_size=window,
                             tree_components=(ComponentType.FULL, ComponentType.SWA))  # fmt: skip
    return UnifiedRadixCache(params)


def admit_request(cache, alloc, n: int, rid: str):
    """A real ``Req`` of ``n`` prompt tokens, prefilled: a row in the cache's ReqToTokenPool holding slots from
    the real ``alloc_extend``, committed. Returns (req, its full-pool slots)."""
    from array import array

    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    req = Req(rid=rid, origin_input_text="", origin_input_ids=array("q", range(1, n + 1)),
              sampling_params=SamplingParams(temperature=0, max_new_tokens=1))  # fmt: skip
    cache.req_to_token_pool.alloc([req])
    slots = allocate_requests(alloc, [n]).token_slots[0]
    cache.req_to_token_pool.write((req.kv.req_pool_idx, slice(0, n)), slots)
    req.kv.kv_committed_len = req.kv.kv_allocated_len = n
    return req, slots


def evict_window(cache, req, pre_len: int) -> None:
    """``ScheduleBatch.maybe_evict_swa`` for one request: SGLang's ``evict_sliding_windows`` in a free group."""
    alloc = cache.token_to_kv_pool_allocator
    alloc.free_group_begin()
    cache.evict_sliding_windows(req, pre_len)
    alloc.free_group_end()


def release_finished(cache, req, *, group: bool = True) -> None:
    """A finished request's KV given back as the batch result processor does: ``release_kv_cache`` in a free
    group (``group=False``: a release outside one), under a published server config (``release_kv_cache``
    reads it; published with SGLang's own test helper, the caller's context put back after)."""
    from sglang.srt.managers.schedule_batch import FINISH_LENGTH
    from sglang.srt.mem_cache.common import release_kv_cache
    from sglang.srt.runtime_context import restore_context, snapshot_context
    from sglang.test.test_utils import published_topology

    req.finished_reason = FINISH_LENGTH(length=0)
    alloc = cache.token_to_kv_pool_allocator
    saved = snapshot_context()
    try:
        with published_topology():
            if group:
                alloc.free_group_begin()
            release_kv_cache(req, cache, checkpoint=True)
            if group:
                alloc.free_group_end()
    finally:
        restore_context(saved)
