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


def make_layers(head_dim: int = 8):
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
                sliding_window_size=WINDOW if swa else -1,
            )
        )
    return layers


@dataclass
class Batch:
    """Requests allocated for real; ``token_slots[r]`` are request r's full-pool slots in order."""

    seq_lens: list[int]
    token_slots: list[torch.Tensor] = field(default_factory=list)


def allocate_requests(alloc, seq_lens: list[int]) -> Batch:
    """Prefill ``len(seq_lens)`` fresh requests through the real ``alloc_extend``."""
    n = len(seq_lens)
    dev = alloc.device  # device tensors for the allocator's kernels, host copies for its *_cpu arguments
    prefix = torch.zeros(n, dtype=torch.int64)
    seq = torch.tensor(seq_lens, dtype=torch.int64)
    last_loc = torch.full((n,), -1, dtype=torch.int64, device=dev)
    out = alloc.alloc_extend(prefix.to(dev), prefix, seq.to(dev), seq, last_loc, int(seq.sum()))
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
