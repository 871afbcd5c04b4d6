"""Real sglang==0.5.23 fa3 objects: ``FlashAttentionBackend`` with real pools, built on CPU or CUDA.

On CPU the fa3 module imports through the ``common_ops`` stand-in (``standins/sgl_kernel_ops.py``); on a
GPU machine with SGLang's full runtime it imports as is. The backend is a *partially constructed* real
``FlashAttentionBackend`` (``object.__new__`` plus the attributes its ``__init__`` sets from a model
runner: that ``__init__`` needs SGLang's server context); its metadata is built by its own
``init_forward_metadata`` from a real ``ReqToTokenPool``, a real ``KVIndexTranslator`` and a
``ForwardBatch`` bound to a real ``KVLocPlan``, exactly as SGLang builds it for an eager forward.

``KernelRecorder`` replaces the module-level ``flash_attn_with_kvcache`` that fa3's forwards call: it
records what each launch was handed (page table, cache_seqlens) and, with ``real`` given (GPU), runs the
real kernel; on CPU it returns zeros instead (the kernel cannot run there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from helpers import sglang_world as w

PAGE_SIZE = w.PAGE_SIZE
MAX_CONTEXT = w.MAX_PAGES * w.PAGE_SIZE


def fa3_module():
    """SGLang's fa3 backend module, importable on CPU through the op-library stand-in."""
    from helpers.srt import import_srt
    from helpers.standins import sgl_kernel_ops

    import_srt("sglang.srt.mem_cache.swa_memory_pool")  # skips on a GPU machine without sgl_kernel
    try:
        sgl_kernel_ops.install()
    except ImportError as err:  # a CUDA machine whose sgl_kernel cannot load its ops (a slimmed wheel)
        pytest.skip(f"sgl_kernel's op library does not load here: {str(err).strip().splitlines()[0]}",
                    allow_module_level=True)
    import sglang.srt.layers.attention.flashattention_backend as fa

    return fa


@dataclass
class KernelRecorder:
    """Stands where fa3 launches ``flash_attn_with_kvcache``; ``calls`` holds what each launch got."""

    real: Any = None
    calls: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        table = kwargs.get("page_table")
        seqlens = kwargs.get("cache_seqlens")
        self.calls.append({
            "page_table": None if table is None else table.clone(),
            "cache_seqlens": None if seqlens is None else seqlens.clone(),
            "window_size": kwargs.get("window_size"),
        })
        if self.real is not None:
            return self.real(*args, **kwargs)
        q = kwargs["q"]
        out = torch.zeros(q.shape[0], q.shape[1], kwargs["v_cache"].shape[-1], dtype=q.dtype, device=q.device)
        if kwargs.get("return_softmax_lse"):
            return out, torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        return out


@dataclass
class Fa3World:
    pool: Any
    alloc: Any
    layers: list[Any]
    batch: w.Batch
    req_to_token_pool: Any
    translator: Any
    backend: Any
    fb: Any
    device: str = "cpu"
    head_dim: int = 8


def make_backend(fa, pool, r2t, translator, *, device: str = "cpu", swa: bool = True, topk: int = 0,
                 draft_tokens: int | None = None):  # fmt: skip
    """A real FlashAttentionBackend with what ``__init__`` sets for an MHA model with an SWA pool."""
    b = object.__new__(fa.FlashAttentionBackend)
    attrs = dict(
        page_size=PAGE_SIZE if topk <= 1 else 1, device=device, max_context_len=MAX_CONTEXT,
        req_to_token_pool=r2t, req_to_token=r2t.req_to_token, token_to_kv_pool=pool,
        kv_index_translator=translator, use_sliding_window_kv_pool=swa, topk=topk, speculative_num_steps=0,
        speculative_step_id=0, speculative_num_draft_tokens=draft_tokens, is_prefill_aware_swa=False,
        has_swa=True, sliding_window_size=w.WINDOW, local_attn_builder=None, has_local_attention=False,
        _get_scheduler_metadata=None, use_mla=False, _disable_scheduler_metadata_precompute=True,
        forward_metadata=None, forward_metadata_spec_decode_expand=None, kv_cache_dtype=torch.bfloat16,
        kv_cache_dtype_str="auto", kv_cache_is_mxfp8=False, fa_impl_ver=3, num_splits=0, decode_num_splits=0,
        _decode_uses_static_max_seqlen_k=False, full_cg_prefill_metadata=None, fa_skip_kv_cache=False,
        is_encoder_decoder=False, skip_prefill=False, _kv_shard_pool=None, attn_cp_size=1,
        is_draft_runner=False, _verify_mask=None,
    )
    attrs["max_num_pages"] = (MAX_CONTEXT + attrs["page_size"] - 1) // attrs["page_size"]
    for k, v in attrs.items():
        setattr(b, k, v)
    return b


def _runner_side(pool, alloc, batch: w.Batch, page_size: int, device: str):
    """What a model runner owns besides the pools: a real ``ReqToTokenPool`` holding the batch's rows
    (request slot 0 stays the padding slot) and SGLang's ``KVIndexTranslator`` for the pool."""
    from sglang.srt.mem_cache.kv_index_translator import KVIndexTranslator
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    r2t = ReqToTokenPool(size=8, max_context_len=MAX_CONTEXT, device=device, enable_memory_saver=False)
    for r, slots in enumerate(batch.token_slots):
        r2t.req_to_token[r + 1, : slots.numel()] = slots.to(torch.int32)
    translator = KVIndexTranslator(req_to_token=r2t.req_to_token, token_to_kv_pool_allocator=alloc,
                                   token_to_kv_pool=pool, page_size=page_size, device=device)
    return r2t, translator


def _bind_plan(translator, fb, writes, read_extent: int) -> None:
    """The iteration's ``KVLocPlan`` bound to the batch, as SGLang's scheduler binds it (write ids, reads)."""
    plan = translator.plan(req_pool_indices=fb.req_pool_indices, seq_lens=fb.seq_lens, seq_lens_cpu=fb.seq_lens_cpu,
                           write_virtual=writes, read_extent=read_extent)  # fmt: skip
    plan.bind(fb, translator)


def decode_world(seq_lens=(40, 100, 17), *, device: str = "cpu", swa: bool = True, fill_pages: int = 0,
                 seed: int | None = None, stale_cpu_lens: int = 0, head_dim: int = 8,
                 frozen_kv_draft: bool = False, draft_step: int | None = None) -> Fa3World:  # fmt: skip
    """Requests allocated for real, one decode step's metadata built by fa3's own ``init_forward_metadata``.

    ``fill_pages``: allocate (and keep, SWA side released) that many pages first (in requests of 8), so the batch's full ids
    are large and differ from its SWA ids.
    ``swa=False``: the backend cached "no SWA pool" at init while its live pool is an SWA pool (the
    #26957 state, here on fa3). ``stale_cpu_lens``: the host mirror ``seq_lens_cpu`` lags the device
    lengths by that many tokens (fa3 sizes its eager table from it: SGLang's own comment warns that a
    stale mirror under-sizes the table). ``draft_step``: a draft model's decode step of EAGLE topk 1
    (``spec_info`` set, the backend's ``speculative_step_id``): fa3 reads ``seq_lens + step + 1`` tokens per
    row, through a table cut at the ``req_to_token`` width (the SWA pool is sized for long rows then)."""
    fa = fa3_module()

    pool = w.make_pool(swa_pages=40 if draft_step is not None else w.SWA_PAGES, head_dim=head_dim, device=device)
    alloc = w.make_allocator(pool, device=device)
    for _ in range(fill_pages // 8):  # older requests whose tokens left the window: SWA pages released
        older = w.allocate_requests(alloc, [8 * PAGE_SIZE])
        alloc.free_swa(older.token_slots[0])
    if seed is not None:  # a few other requests come and go first, so ids are not in allocation order
        g = torch.Generator().manual_seed(seed)
        for _ in range(int(torch.randint(0, 3, (1,), generator=g))):
            other = w.allocate_requests_or_none(alloc, [int(torch.randint(1, 40, (1,), generator=g))])
            if other is not None:
                alloc.free(other.token_slots[0])
    layers = w.make_layers(head_dim)
    batch = w.allocate_requests(alloc, list(seq_lens))
    # the decode step's new token: one more slot per request, allocated by the real alloc_decode
    seq = torch.tensor(batch.seq_lens, dtype=torch.int64)
    last = torch.stack([s[-1] for s in batch.token_slots])
    new = alloc.alloc_decode((seq + 1).to(device), seq + 1, last)
    assert new is not None
    batch = w.Batch([n + 1 for n in batch.seq_lens], [torch.cat([s, new[i : i + 1]]) for i, s in enumerate(batch.token_slots)])
    r2t, translator = _runner_side(pool, alloc, batch, PAGE_SIZE, device)
    fb = w.make_forward_batch(batch, out_cache_loc=new, device=device)
    fb.seq_lens_cpu = fb.seq_lens.cpu() - stale_cpu_lens
    fb.positions = fb.seq_lens - 1  # the decoded token's position, as SGLang sets it
    _bind_plan(translator, fb, new, 0)
    if frozen_kv_draft:
        # SGLang's frozen-KV MTP draft (topk 1): its fa3 backend is built by the draft runner against the
        # draft's own plain pool; __init__ derives use_sliding_window_kv_pool from it, as below. SGLang's own
        # frozen_kv_target_view then swaps the target's SWA pool in for the metadata build.
        from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool
        from sglang.srt.speculative.frozen_kv_mtp_utils import frozen_kv_target_view

        draft_pool = w.make_draft_pool()
        own_swa = isinstance(draft_pool, SWAKVPool) and draft_pool.swa_layer_nums > 0  # fa3 __init__'s test
        backend = make_backend(fa, draft_pool, r2t, translator, device=device, swa=own_swa)
        with frozen_kv_target_view(fb, w.frozen_kv_context(pool), backend):
            backend.init_forward_metadata(fb)
        backend.token_to_kv_pool = pool  # what target_kv_pool_view does around the draft forward
    else:
        backend = make_backend(fa, pool, r2t, translator, device=device, swa=swa)
        if draft_step is not None:
            from sglang.srt.speculative.eagle_info import EagleDraftInput

            fb.spec_info = EagleDraftInput()
            backend.topk, backend.speculative_step_id, backend.speculative_num_steps = 1, draft_step, 1
        backend.init_forward_metadata(fb)
    return Fa3World(pool, alloc, layers, batch, r2t, translator, backend, fb, device, head_dim)


def run_layer(world: Fa3World, layer, recorder: KernelRecorder, monkeypatch, *, method: str = "forward_decode",
              seed: int = 0):  # fmt: skip
    """One real fa3 ``forward_decode`` (or ``forward_extend``) for ``layer``, the kernel launch recorded."""
    fa = fa3_module()
    monkeypatch.setattr(fa, "flash_attn_with_kvcache", recorder)
    bs = len(world.batch.seq_lens)
    q, k, v = w.qkv(bs, seed=seed, head_dim=world.head_dim, device=world.device)
    return getattr(world.backend, method)(q, k, v, layer, world.fb)


def verify_world(seq_lens=(40, 100, 17), *, draft_tokens: int = 4, topk: int = 2, history: str = "fresh") -> Fa3World:
    """A target-verify step with an EAGLE tree (topk > 1, page size 1), its metadata built by fa3's own
    ``init_forward_metadata``: the path that builds ``swa_spec_metadata`` for SWA layers (SGLang #24402).

    ``history`` (what the real allocators went through before this step; page size 1 allocates tokens):

    * ``fresh``: nothing; full and SWA slots are handed out in lockstep, so full id == SWA id;
    * ``wrapped``: an older request's 200 tokens left the window (``free_swa``): the SWA pool (256 tokens,
      full 1024) hands out low slots again while full ids grow past the SWA pool;
    * ``diverged``: full and SWA pools of 256 tokens; an old request's first 30 tokens left the window
      and a finished 226-token request was freed: both allocators re-sort their free lists, the full one
      from 31, the SWA one from 1, so every full id is in range of the SWA pool but names another slot.

    The tree is a chain (draft token i sees the prefix and draft tokens 0..i), a valid EAGLE mask.
    """
    fa = fa3_module()
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
    from sglang.srt.speculative.eagle_info import EagleVerifyInput

    pool = w.make_pool(page_size=1, full_pages=256 if history == "diverged" else 1024, swa_pages=256)
    alloc = w.make_allocator(pool, page_size=1)
    if history == "wrapped":  # page size 1: SGLang allocates tokens with the allocator's alloc()
        alloc.free_swa(alloc.alloc(200))
    elif history == "diverged":
        alloc.free_swa(alloc.alloc(30))
        alloc.free(alloc.alloc(226))
    layers = w.make_layers()
    prefix = w.Batch(list(seq_lens), [alloc.alloc(length) for length in seq_lens])
    n = len(seq_lens)
    seq = torch.tensor(seq_lens, dtype=torch.int64)
    drafts = alloc.alloc(n * draft_tokens)
    assert drafts is not None and all(s is not None for s in prefix.token_slots)
    batch = w.Batch(list(seq_lens), [torch.cat([s, drafts[i * draft_tokens : (i + 1) * draft_tokens]])
                                     for i, s in enumerate(prefix.token_slots)])  # fmt: skip
    r2t, translator = _runner_side(pool, alloc, batch, 1, "cpu")  # CPU only (the Triton builder is interpreted)
    masks = []
    for length in seq_lens:
        tree = torch.tril(torch.ones(draft_tokens, draft_tokens, dtype=torch.bool))
        masks.append(torch.cat([torch.ones(draft_tokens, length, dtype=torch.bool), tree], dim=1).reshape(-1))
    spec = EagleVerifyInput(
        draft_token=torch.zeros(n * draft_tokens, dtype=torch.int64), custom_mask=torch.cat(masks),
        positions=torch.cat([torch.arange(s, s + draft_tokens) for s in seq_lens]),
        retrieve_index=torch.arange(n * draft_tokens).view(n, draft_tokens),
        retrieve_next_token=torch.full((n, draft_tokens), -1), retrieve_next_sibling=torch.full((n, draft_tokens), -1),
        retrieve_cum_len=None, spec_steps=draft_tokens - 1, topk=topk, draft_token_num=draft_tokens,
        capture_hidden_mode=CaptureHiddenMode.FULL, seq_lens_sum=int(seq.sum()), seq_lens_cpu=seq.clone(),
    )
    fb = w.make_forward_batch(prefix, out_cache_loc=drafts)
    fb.forward_mode = w.sglang()["ForwardMode"].TARGET_VERIFY
    fb.spec_info = spec
    fb.input_ids = torch.zeros(n * draft_tokens, dtype=torch.int64)
    fb.seq_lens_cpu = seq.clone()
    _bind_plan(translator, fb, drafts, draft_tokens)
    backend = make_backend(fa, pool, r2t, translator, topk=topk, draft_tokens=draft_tokens)
    backend.init_forward_metadata(fb)
    return Fa3World(pool, alloc, layers, batch, r2t, translator, backend, fb)


def checks_live(cache_seqlens, width: int, page_size: int = 1):
    """Boolean ``[rows, width]`` mask of each row's live prefix (numpy), for dumped tables."""
    import numpy as np

    pages = (np.asarray(cache_seqlens).astype(np.int64) + page_size - 1) // page_size
    return np.arange(width)[None, :] < np.minimum(pages, width)[:, None]


def graph_world(seq_lens=(40, 100, 17), *, device: str = "cpu", fill_pages: int = 0, max_bs: int = 4,
                head_dim: int = 8) -> Fa3World:  # fmt: skip
    """A decode step prepared the way SGLang's decode CUDA-graph runner prepares it for fa3: the backend's
    own ``init_cuda_graph_state`` (static buffers), ``init_forward_metadata_out_graph(fb, in_capture=True)``
    to bind them (the runner does this before capturing), then ``init_forward_metadata_out_graph(fb)``
    before each replay. The tables of the world are the static buffers; ``fb`` is the replay batch.
    On CPU the builder's Triton kernel (``normal_decode_set_metadata``) runs in Triton's interpreter."""
    world = decode_world(seq_lens, device=device, fill_pages=fill_pages, head_dim=head_dim)
    backend, fb = world.backend, world.fb
    backend.init_cuda_graph_state(max_bs, max_bs)
    backend.init_forward_metadata_out_graph(fb, in_capture=True)
    backend.init_forward_metadata_out_graph(fb)
    return world
