"""A triton decode step prepared the way SGLang's decode CUDA-graph runner prepares it, on real 0.5.23 objects.

The backend is :func:`sglang_world.make_triton_backend`'s partially constructed real ``TritonAttnBackend``
plus what its ``__init__`` sets for CUDA graphs (``kv_indptr`` / ``window_kv_indptr`` / ``qo_indptr`` /
``mask_indptr`` buffers, the runner's ``ReqToTokenPool`` and ``KVIndexTranslator``). Then SGLang's own
``init_cuda_graph_state`` (static buffers), ``init_forward_metadata_out_graph(fb, in_capture=True)`` (the runner
binds the buffers before capturing) and ``init_forward_metadata_out_graph(fb)`` (before each replay) run; the
index gathers are SGLang's Triton kernels (interpreted on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from helpers import fa3_world as fw
from helpers import sglang_world as w


@dataclass
class TritonGraphWorld:
    pool: Any
    alloc: Any
    layers: list[Any]
    batch: w.Batch
    translator: Any
    backend: Any
    fb: Any
    max_bs: int
    window: int


WINDOW = 48  # smaller than the requests, so the window sets really are each request's last tokens


def graph_backend(pool, r2t, translator, *, max_bs: int, device: str = "cpu", window: int = WINDOW):
    backend = w.make_triton_backend(pool)
    backend.sliding_window_size = window
    backend.device = device
    backend.req_to_token_pool = r2t
    backend.req_to_token = r2t.req_to_token
    backend.kv_index_translator = translator
    backend.skip_prefill = False
    backend.num_head = 2
    backend.num_kv_head = 1
    backend.v_head_dim = 8
    backend.lean_total_programs = 1
    backend.lean_block_m = 16
    backend.static_kv_splits = True  # num_kv_splits filled with max_kv_splits (no device-count schedule)
    backend.num_draft_tokens = None
    backend.speculative_num_steps = 0
    backend.topk = 0
    backend.target_verify_num_tokens_per_req = 1
    backend.max_context_len = fw.MAX_CONTEXT
    backend.kv_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=device)
    backend.window_kv_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=device)
    backend.qo_indptr = torch.zeros(max_bs + 1, dtype=torch.int64, device=device)
    backend.mask_indptr = torch.zeros(max_bs + 1, dtype=torch.int64, device=device)
    return backend


def plain_pool(pages: int = w.FULL_PAGES, device: str = "cpu"):
    """SGLang's plain MHA pool (no SWA sub-pool): a sliding-window model's window layers read full-pool ids."""
    return w.sglang()["MHATokenToKVPool"](
        size=pages * w.PAGE_SIZE, page_size=w.PAGE_SIZE, dtype=torch.bfloat16, head_num=1, head_dim=8,
        layer_num=len(w.SWA_LAYERS) + len(w.FULL_LAYERS), device=device, enable_memory_saver=False,
    )


def graph_world(seq_lens=(40, 100, 17), *, fill_pages: int = 0, max_bs: int = 4, device: str = "cpu",
                replay: bool = True, window: int = WINDOW, plain: bool = False) -> TritonGraphWorld:  # fmt: skip
    """Requests allocated for real (``fill_pages``: older requests first, so full ids are large and differ from
    SWA ids), one decode token each (SGLang's ``alloc_decode``), the runner's buffers bound as for capture and,
    with ``replay``, refilled for the replay by SGLang's ``init_forward_metadata_out_graph(fb)``. ``plain``: a
    plain pool and SGLang's plain paged allocator (window ids untranslated)."""
    pool = plain_pool(device=device) if plain else w.make_pool(device=device)
    alloc = w.make_plain_allocator(pool) if plain else w.make_allocator(pool, device=device)
    for _ in range(fill_pages // 8):  # older requests whose tokens left the window: SWA pages released
        older = w.allocate_requests(alloc, [8 * w.PAGE_SIZE])
        alloc.free_swa(older.token_slots[0])
    layers = w.make_layers(window=window)
    batch = w.allocate_requests(alloc, list(seq_lens))
    seq = torch.tensor(batch.seq_lens, dtype=torch.int64)
    last = torch.stack([s[-1] for s in batch.token_slots])
    new = alloc.alloc_decode((seq + 1).to(device), seq + 1, last)
    assert new is not None
    batch = w.Batch([n + 1 for n in batch.seq_lens],
                    [torch.cat([s, new[i: i + 1]]) for i, s in enumerate(batch.token_slots)])
    r2t, translator = fw._runner_side(pool, alloc, batch, w.PAGE_SIZE, device)
    fb = w.make_forward_batch(batch, out_cache_loc=new, device=device)
    fb.seq_lens_cpu = fb.seq_lens.cpu()
    fb.positions = fb.seq_lens - 1
    fw._bind_plan(translator, fb, new, 0)
    backend = graph_backend(pool, r2t, translator, max_bs=max_bs, device=device, window=window)
    backend.init_cuda_graph_state(max_bs, max_bs)
    backend.init_forward_metadata_out_graph(fb, in_capture=True)
    if replay:
        backend.init_forward_metadata_out_graph(fb)
    return TritonGraphWorld(pool, alloc, layers, batch, translator, backend, fb, max_bs, window)


def expected_rails(world: TritonGraphWorld) -> tuple[list[list[int]], list[list[int]]]:
    """Each request's full-pool ids (its token slots) and its window ids (the last ``window`` of them,
    translated through the live pool's ``full_to_swa_index_mapping``): what the replay's sets must hold."""
    mapping = getattr(world.pool, "full_to_swa_index_mapping", None)
    full = [s.tolist() for s in world.batch.token_slots]
    tails = [s[max(0, s.numel() - world.window):] for s in world.batch.token_slots]
    window = [(t if mapping is None else mapping[t]).tolist() for t in tails]
    return full, window


def ragged(indptr: torch.Tensor, indices: torch.Tensor) -> list[list[int]]:
    ptr = indptr.tolist()
    return [indices[ptr[r]: ptr[r + 1]].tolist() for r in range(len(ptr) - 1)]


@dataclass
class TritonDraftWorld:
    pool: Any
    alloc: Any
    batch: w.Batch  # each request's prefix + its draft tokens' slots
    draft: Any  # the real TritonMultiStepDraftBackend
    fb: Any
    steps: int
    window: int


def draft_world(seq_lens=(40, 100, 17), *, steps: int = 3, max_bs: int = 4, window: int = WINDOW,
                replay: bool = True) -> TritonDraftWorld:  # fmt: skip
    """EAGLE multi-step draft decode (topk 1) prepared as SGLang's draft CUDA-graph runner prepares it: a real
    ``TritonMultiStepDraftBackend`` (partially constructed, its per-step backends from :func:`graph_backend`
    sharing its ``kv_indptr`` rows, as its ``__init__`` builds them), its own ``init_cuda_graph_state``, and
    ``init_forward_metadata_out_graph(fb)`` before a replay: SGLang's ``generate_draft_decode_kv_indices`` and
    window gather (interpreted on CPU) fill every step's ragged sets. Each request's ``req_to_token`` row
    holds its prefix and then its ``steps`` draft slots. The batch carries no write locations (``out_cache_loc``
    None: the per-step SWA write buffers are not refilled; not what the guard checks)."""
    from sglang.srt.layers.attention.triton_backend import TritonMultiStepDraftBackend

    pool = w.make_pool()
    alloc = w.make_allocator(pool)
    full = w.allocate_requests(alloc, [n + steps for n in seq_lens])
    r2t, translator = fw._runner_side(pool, alloc, full, w.PAGE_SIZE, "cpu")
    prefix = w.Batch(list(seq_lens), [s[:n] for s, n in zip(full.token_slots, seq_lens, strict=True)])
    fb = w.make_forward_batch(prefix)
    fb.out_cache_loc = None
    fb.positions = fb.seq_lens.clone()
    fb.seq_lens_cpu = fb.seq_lens.cpu()
    drafts = torch.cat([s[n:] for s, n in zip(full.token_slots, seq_lens, strict=True)])
    fw._bind_plan(translator, fb, drafts, steps)
    draft = object.__new__(TritonMultiStepDraftBackend)
    draft.topk, draft.speculative_num_steps = 1, steps
    draft.kv_indptr = torch.zeros(steps, max_bs + 1, dtype=torch.int32)
    draft.attn_backends = []
    for i in range(steps - 1):
        inner = graph_backend(pool, r2t, translator, max_bs=max_bs, window=window)
        inner.kv_indptr = draft.kv_indptr[i]
        draft.attn_backends.append(inner)
    draft.max_context_len = fw.MAX_CONTEXT
    draft.num_head = 2
    draft.device = "cpu"
    draft.req_to_token_pool = r2t
    draft.pool_len = r2t.req_to_token.shape[1]
    draft.page_size = w.PAGE_SIZE
    draft.draft_window_size, draft.draft_sink_size = 0, 0
    draft.kv_index_translator = translator
    draft.token_to_kv_pool = pool
    draft.sliding_window_size = window
    draft.window_rail = True
    draft.window_kv_indptr = torch.zeros(steps, max_bs + 1, dtype=torch.int32)
    draft.cuda_graph_window_kv_indices = None
    draft.init_cuda_graph_state(max_bs, max_bs)
    if replay:
        draft.init_forward_metadata_out_graph(fb)
    return TritonDraftWorld(pool, alloc, full, draft, fb, steps, window)


def expected_draft_rails(world: TritonDraftWorld, step: int) -> tuple[list[list[int]], list[list[int]]]:
    """Draft step ``step``'s sets: each request's prefix plus its first ``step + 1`` draft slots, and the last
    ``window`` of those, SWA-translated."""
    mapping = world.pool.full_to_swa_index_mapping
    lens = world.fb.seq_lens.tolist()
    full = [s[: n + step + 1] for s, n in zip(world.batch.token_slots, lens, strict=True)]
    return [f.tolist() for f in full], [mapping[f[max(0, f.numel() - world.window):]].tolist() for f in full]
