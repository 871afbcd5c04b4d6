"""Gemma 4 MoE routing in one launch: top-k of E logits, fp32 softmax over the kept K, per-expert scale.

Same contract as SGLang 0.5.23's ``gemma4_fused_routing`` (``sglang/kernels/ops/moe/gemma4_routing.py``,
the algorithm of vLLM PR #39083): fp32 weights ``[M, K]``, int32 ids ``[M, K]``, ties broken towards the
lower expert id. The difference is how the top-k is found. Upstream runs one single-warp program per token
and fully sorts all E packed (key, id) words. Here each program takes ``BLOCK_M`` tokens and runs K
max-reductions over packed int64 words ``(monotone logit key << 32) | (BLOCK_E - 1 - id)``: the words are
unique per row, so each max names exactly one expert, and the inverted id makes the lower id win a tie.
For K = 8 of E = 128 that is 8 reductions (8 x 7 butterfly steps) instead of a 128-wide bitonic sort
(7 * 8 / 2 = 28 stages of E/2 compare-exchanges), and several tokens share a program at large M.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvtrap.kernels._validate import check_same_device, check_tensor

# A constexpr global: Triton kernels may only read globals declared this way.
_INT64_MIN = tl.constexpr(-(2**63))
_INT32_MIN = tl.constexpr(-(2**31))


@triton.jit
def _gemma4_routing_kernel(
    logits_ptr,
    scale_ptr,
    weights_ptr,
    ids_ptr,
    M,
    stride_lm,
    E: tl.constexpr,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PACK32: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    x = tl.load(
        logits_ptr + rows[:, None].to(tl.int64) * stride_lm + cols[None, :],
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    ).to(tl.float32)

    kcols = tl.arange(0, BLOCK_K)
    inv_id = (BLOCK_E - 1 - cols)[None, :]
    if PACK32:
        # 16-bit logits: a monotone 16-bit key and a <= 10-bit inverted id fit in one int32 word, so each
        # max-reduction step moves one 32-bit shuffle instead of two (the decode latency is this chain).
        # The key is taken from the fp32 value: bf16 -> fp32 only appends zero bits, and for fp16 the
        # fp32 value's order is the fp16 order; we need the 16-bit pattern, so re-cast to the input dtype.
        bits16 = x.to(logits_ptr.dtype.element_ty).to(tl.int16, bitcast=True).to(tl.int32)
        key16 = tl.where(bits16 >= 0, bits16, bits16 ^ 0x7FFF)
        packed32 = (key16 << 16) | inv_id
        packed32 = tl.where(col_ok[None, :], packed32, _INT32_MIN)
        top32 = tl.full((BLOCK_M, BLOCK_K), _INT32_MIN, tl.int32)
        for k in tl.static_range(K):
            best32 = tl.max(packed32, axis=1)
            top32 = tl.where(kcols[None, :] == k, best32[:, None], top32)
            packed32 = tl.where(packed32 == best32[:, None], _INT32_MIN, packed32)
        top_key16 = top32 >> 16
        ids = (BLOCK_E - 1) - (top32 & 0xFFFF)
        vbits = tl.where(top_key16 >= 0, top_key16, top_key16 ^ 0x7FFF).to(tl.int16)
        vals = vbits.to(logits_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
    else:
        # Monotone int32 key of an fp32 value: non-negative floats order like their bits; for negative
        # ones flipping the 31 magnitude bits reverses their order and keeps them below the non-negative.
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        packed = (key.to(tl.int64) << 32) | inv_id.to(tl.int64)
        packed = tl.where(col_ok[None, :], packed, _INT64_MIN)
        top = tl.full((BLOCK_M, BLOCK_K), _INT64_MIN, tl.int64)
        for k in tl.static_range(K):
            best = tl.max(packed, axis=1)
            top = tl.where(kcols[None, :] == k, best[:, None], top)
            packed = tl.where(packed == best[:, None], _INT64_MIN, packed)
        top_key = (top >> 32).to(tl.int32)
        ids = (BLOCK_E - 1) - (top & 0xFFFFFFFF).to(tl.int32)
        vals = tl.where(top_key >= 0, top_key, top_key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)

    k_ok = kcols < K
    out_ok = row_ok[:, None] & k_ok[None, :]
    # Column 0 holds the row maximum (the first reduction), so no further max is needed for stability.
    row_max = tl.sum(tl.where(kcols[None, :] == 0, vals, 0.0), axis=1)
    ex = tl.where(k_ok[None, :], tl.exp(vals - row_max[:, None]), 0.0)
    denom = tl.sum(ex, axis=1)
    scale = tl.load(scale_ptr + ids, mask=out_ok, other=1.0).to(tl.float32)
    w = ex / denom[:, None] * scale

    out_off = rows[:, None].to(tl.int64) * K + kcols[None, :]
    tl.store(weights_ptr + out_off, w, mask=out_ok)
    tl.store(ids_ptr + out_off, ids, mask=out_ok)


def _routing_config(M: int, block_e: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps). Decode sizes keep one token per single-warp program (the latency of one
    reduction chain is the cost); prefill packs 8 tokens into 4 warps (H200 sweep at M = 8192, E = 128:
    7.8 us vs 9.7 us for one token per program)."""
    if M <= 256:
        return 1, 1
    return max(1, min(8, 1024 // block_e)), 4


def gemma4_fused_routing(
    logits: torch.Tensor,
    per_expert_scale: torch.Tensor,
    topk: int,
    *,
    block_m: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route ``logits [M, E]`` (bf16/fp16/fp32, last dim contiguous, E <= 1024) to ``topk`` experts.

    Returns ``(weights fp32 [M, topk], ids int32 [M, topk])`` with
    ``weights = softmax_fp32(topk_logits) * per_expert_scale[ids]``, experts in descending logit order,
    ties to the lower id. ``block_m`` / ``num_warps`` override the tuned launch config (benchmarks only).
    """
    check_tensor("logits", logits, ndim=2)
    M, E = logits.shape
    check_tensor(
        "per_expert_scale",
        per_expert_scale,
        ndim=1,
        shape=(E,),
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        contiguous=True,
    )
    check_same_device(logits=logits, per_expert_scale=per_expert_scale)
    if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= E:
        raise ValueError(f"topk must be an int in [1, E={E}], got {topk!r}")
    if E > 1024:
        raise ValueError(f"gemma4_fused_routing supports E <= 1024 experts, got E={E}")
    weights = torch.empty((M, topk), dtype=torch.float32, device=logits.device)
    ids = torch.empty((M, topk), dtype=torch.int32, device=logits.device)
    if M == 0:
        return weights, ids
    block_e = triton.next_power_of_2(E)
    bm, nw = _routing_config(M, block_e)
    bm = block_m or bm
    nw = num_warps or nw
    _gemma4_routing_kernel[(triton.cdiv(M, bm),)](
        logits,
        per_expert_scale,
        weights,
        ids,
        M,
        logits.stride(0),
        E=E,
        K=topk,
        BLOCK_M=bm,
        BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(topk),
        PACK32=logits.element_size() == 2,
        num_warps=nw,
    )
    return weights, ids
