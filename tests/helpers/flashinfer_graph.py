"""A flashinfer decode step prepared the way SGLang's decode CUDA-graph runner prepares it, on real 0.5.23 objects.

The backend and its indices updaters are :func:`sglang_world.make_flashinfer_backend`'s (real classes, partially
constructed) plus what ``__init__`` / ``init_cuda_graph_state`` set for CUDA graphs (``kv_indptr`` /
``kv_last_page_len`` buffers, the runner's ``KVIndexTranslator``). The cuda-graph wrappers are real FlashInfer
``BatchDecodeWithPagedKVCacheWrapper`` objects in cuda-graph mode (their constructor pins host memory, which a CPU
machine cannot) whose ``begin_forward`` (``plan``, CUDA work) is :class:`PlanStandIn`: it does to the wrapper's
buffers what FlashInfer's cuda-graph ``plan`` does (copies the offsets, ids and last-page lengths in) and records
its arguments. Then SGLang's own ``init_forward_metadata_out_graph(fb)`` runs: the updater gathers the ids into the
wrappers' buffers (SGLang's Triton gather, interpreted on CPU) and translates wrapper 0's to SWA-pool ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from helpers import fa3_world as fw
from helpers import sglang_world as w


@dataclass
class PlanStandIn:
    """Stands where FlashInfer's ``plan`` is (it launches CUDA work): its cuda-graph buffer copies, recorded."""

    wrapper: Any
    calls: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, indptr, indices, last_page_len, *args: Any, **kwargs: Any) -> None:
        self.calls.append({"indptr": indptr.clone(), "indices": indices[: int(indptr[-1])].clone()})
        self.wrapper._paged_kv_indptr_buf.copy_(indptr)
        self.wrapper._paged_kv_indices_buf[: len(indices)].copy_(indices)
        self.wrapper._paged_kv_last_page_len_buf.copy_(last_page_len)


@dataclass
class FlashInferGraphWorld:
    pool: Any
    alloc: Any
    batch: w.Batch
    backend: Any
    fb: Any
    wrappers: list[Any]


WINDOW = 48  # smaller than the requests: wrapper 0's ids are each request's last WINDOW + 1 tokens


def graph_world(seq_lens=(40, 100, 17), *, max_bs: int = 4, window: int = WINDOW) -> FlashInferGraphWorld:
    import flashinfer

    pool = w.make_pool()
    alloc = w.make_allocator(pool)
    batch = w.allocate_requests(alloc, list(seq_lens))
    seq = torch.tensor(batch.seq_lens, dtype=torch.int64)
    last = torch.stack([s[-1] for s in batch.token_slots])
    new = alloc.alloc_decode(seq + 1, seq + 1, last)
    assert new is not None
    batch = w.Batch([n + 1 for n in batch.seq_lens],
                    [torch.cat([s, new[i: i + 1]]) for i, s in enumerate(batch.token_slots)])
    r2t, translator = fw._runner_side(pool, alloc, batch, 1, "cpu")
    fb = w.make_forward_batch(batch, out_cache_loc=new)
    fb.seq_lens_cpu = fb.seq_lens.cpu()
    fb.positions = fb.seq_lens - 1
    fw._bind_plan(translator, fb, new, 0)
    backend = w.make_flashinfer_backend(w.make_runner(pool, alloc), window=window)
    backend.kv_index_translator = translator
    backend.kv_indptr = [torch.zeros(max_bs + 1, dtype=torch.int32) for _ in range(2)]
    backend.kv_last_page_len = torch.ones(max_bs, dtype=torch.int32)
    backend.disable_cuda_graph_kv_split = False
    backend.cuda_graph_swa_out_cache_loc = torch.zeros(max_bs, dtype=torch.int64)
    updater = backend.indices_updater_decode
    updater.kv_indptr, updater.kv_last_page_len = backend.kv_indptr, backend.kv_last_page_len
    updater.num_qo_heads, updater.num_kv_heads, updater.head_dim = 2, 1, 8
    updater.data_type = updater.q_data_type = torch.bfloat16
    updater.update = updater.update_sliding_window  # what __init__ dispatches to for SLIDING_WINDOW
    bs = len(seq_lens)
    wrappers = []
    for i in range(2):
        wrapper = object.__new__(flashinfer.BatchDecodeWithPagedKVCacheWrapper)
        wrapper._use_cuda_graph = True
        wrapper._paged_kv_indptr_buf = backend.kv_indptr[i][: bs + 1]
        wrapper._paged_kv_indices_buf = torch.zeros(max_bs * fw.MAX_CONTEXT, dtype=torch.int32)
        wrapper._paged_kv_last_page_len_buf = backend.kv_last_page_len[:bs]
        wrapper.begin_forward = PlanStandIn(wrapper)
        wrappers.append(wrapper)
    backend.decode_cuda_graph_metadata = {bs: wrappers}
    return FlashInferGraphWorld(pool, alloc, batch, backend, fb, wrappers)
