"""A real paged-attention victim for the guard: SGLang's Triton decode attention over a paged KV pool.

The page table is built the way SGLang's trtllm_mha backend builds it inside its decode CUDA graph
(``update_trtllm_mha_graph_metadata`` from ``req_to_token``); it is expanded to the token slots the
Triton decode kernel reads (``kv_indices = page * page_size + offset``), so a page id far past the
pool makes the kernel read unmapped memory: an illegal-address fault.

``python tests/helpers/victim.py --crash`` runs the unguarded faulting launch (for a child process).
A test and benchmark helper (tests/capture/test_guard_gpu.py, benchmarks/guard_bench.py), not library code.
Needs CUDA and ``sglang.kernels.ops.attention`` (the SGLang wheel; the full server stack is not needed).
"""

from __future__ import annotations

import argparse
import sys

import torch

from kvtrap.capture.guard.kernel import guard_page_table_
from kvtrap.capture.guard.record import GuardRecord

#: far past any pool: page * page_size * kv_heads * head_dim * 2 bytes is hundreds of GB out
BAD_PAGE_OFFSET = 5_000_000


class PagedDecode:
    """One request batch of paged decode: ``req_to_token`` -> page table -> kv_indices -> attention."""

    def __init__(
        self,
        bs: int,
        seq_len: int,
        *,
        page_size: int = 64,
        q_heads: int = 8,
        kv_heads: int = 2,
        head_dim: int = 256,
        layers: int = 1,
        max_kv_splits: int = 8,
        dtype: torch.dtype = torch.bfloat16,
        device: str = "cuda",
        seed: int = 0,
    ) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.bs, self.seq_len, self.page_size, self.layers = bs, seq_len, page_size, layers
        self.pages_per_req = (seq_len + page_size - 1) // page_size
        self.width = self.pages_per_req
        self.num_pages = bs * self.pages_per_req + 1  # page 0 reserved, as in SGLang
        slots = self.num_pages * page_size
        gd = torch.Generator(device=device).manual_seed(seed)
        self.k = torch.randn(slots, kv_heads, head_dim, generator=gd, device=device, dtype=dtype)
        self.v = torch.randn(slots, kv_heads, head_dim, generator=gd, device=device, dtype=dtype)
        self.q = torch.randn(bs, q_heads, head_dim, generator=gd, device=device, dtype=dtype)
        self.o = torch.zeros(bs, q_heads, head_dim, dtype=dtype, device=device)
        perm = torch.randperm(self.num_pages - 1, generator=g) + 1
        r2t = torch.zeros(bs + 1, self.pages_per_req * page_size, dtype=torch.int32)
        offs = torch.arange(page_size, dtype=torch.int32)
        for r in range(bs):
            pages = perm[r * self.pages_per_req : (r + 1) * self.pages_per_req].to(torch.int32)
            r2t[r + 1] = (pages[:, None] * page_size + offs).reshape(-1)
        self.req_to_token = r2t.to(device)
        self.req_pool_indices = torch.arange(1, bs + 1, dtype=torch.int64, device=device)
        self.seq_lens = torch.full((bs,), seq_len, dtype=torch.int64, device=device)
        self.cache_seqlens = torch.zeros(bs, dtype=torch.int32, device=device)
        self.cu_seqlens_k = torch.zeros(bs + 1, dtype=torch.int32, device=device)
        self.page_table = torch.zeros(bs, self.width, dtype=torch.int32, device=device)
        self.kv_indptr = (torch.arange(bs + 1, dtype=torch.int32) * seq_len).to(device)
        self.kv_indices = torch.zeros(bs * seq_len, dtype=torch.int64, device=device)
        self.tok_offs = torch.arange(page_size, dtype=torch.int64, device=device)
        self.max_kv_splits = max_kv_splits
        self.attn_logits = torch.empty(bs, q_heads, max_kv_splits, head_dim, dtype=torch.float32, device=device)
        self.attn_lse = torch.empty(bs, q_heads, max_kv_splits, dtype=torch.float32, device=device)
        self.num_kv_splits = torch.full((bs,), max_kv_splits, dtype=torch.int32, device=device)
        self.sm_scale = head_dim**-0.5

    # the three stages of one decode step
    def build_(self) -> None:
        """SGLang's in-graph metadata kernel: cache_seqlens, cu_seqlens_k and the page table."""
        from sglang.kernels.ops.attention.trtllm_mha_graph_metadata import update_trtllm_mha_graph_metadata

        update_trtllm_mha_graph_metadata(
            req_pool_indices=self.req_pool_indices,
            seq_lens=self.seq_lens,
            req_to_token=self.req_to_token,
            cache_seqlens=self.cache_seqlens,
            cu_seqlens_k=self.cu_seqlens_k,
            page_table=self.page_table,
            bs=self.bs,
            seqlen_offset=0,
            max_seq_pages=self.width,
            page_size=self.page_size,
        )

    def guard_(self, record: GuardRecord, table_id: int = 0, layer_id: int = -1) -> None:
        guard_page_table_(
            self.page_table, self.cache_seqlens, self.page_size, self.num_pages, record, table_id, layer_id
        )

    def expand_(self) -> None:
        """Page table -> token slots for the Triton kernel (device ops only)."""
        pages = self.page_table[:, : self.pages_per_req].to(torch.int64)
        slots = (pages[:, :, None] * self.page_size + self.tok_offs).reshape(self.bs, -1)[:, : self.seq_len]
        self.kv_indices.copy_(slots.reshape(-1))

    def attend(self) -> None:
        from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

        for _ in range(self.layers):
            decode_attention_fwd(
                self.q, self.k, self.v, self.o, self.kv_indptr, self.kv_indices, self.attn_logits,
                self.attn_lse, self.num_kv_splits, self.max_kv_splits, self.sm_scale, 1.0, 1.0,
                page_size=self.page_size,
            )

    def step(self, record: GuardRecord | None = None) -> None:
        self.build_()
        if record is not None:
            self.guard_(record)
            record.publish_()
        self.expand_()
        self.attend()

    def corrupt_(self, row: int, column: int, page: int) -> None:
        """Make req_to_token hand out ``page`` at (row, column) of the next built table."""
        r = int(self.req_pool_indices[row])
        self.req_to_token[r, column * self.page_size] = page * self.page_size

    def bad_page(self) -> int:
        return self.num_pages + BAD_PAGE_OFFSET


def _crash_main() -> int:
    """Unguarded: an out-of-range page id reaches SGLang's Triton decode kernel. Expected to die."""
    torch.cuda.init()
    dec = PagedDecode(4, 1024)
    dec.step()
    torch.cuda.synchronize()
    print("clean step ok", flush=True)
    dec.corrupt_(2, 5, dec.bad_page())
    dec.step()  # no guard
    torch.cuda.synchronize()
    print("UNEXPECTED: the faulting launch completed", flush=True)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--crash", action="store_true")
    args = ap.parse_args()
    if args.crash:
        sys.exit(_crash_main())
    ap.print_help()
