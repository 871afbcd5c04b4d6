"""Gemma 4 attention input: per-head q/k/v RMSNorm + NeoX RoPE of q and k in one launch (2-3 launches -> 1).

Replaces, in SGLang 0.5.23 ``Gemma4Attention.forward`` (``gemma4_causal.py`` ~L450-527)::

    gemma_qkv_rmsnorm(q, k, v, q_w, k_w, ...)       # Triton, in place: q,k *= rsqrt(ms + eps) * w; v without w
    k = k.reshape(...); v = v.reshape(...)           # copies (k, v are strided slices of the qkv buffer)
    q, k = rotary_emb(positions, q, k)               # JIT CUDA kernel (FusedRopeKernel), NeoX, fp32 cos/sin
    # KV-shared layers (E2B / E4B): only q is normalised, and RoPE runs on a freshly zeroed dummy K
    # (``torch.zeros_like(q[:, :kv_size])``) whose result is thrown away.

The rotary embedding is NeoX style over the whole head in both layer types (``get_rope(..., rotary_dim=
head_dim, is_neox_style=True)``): sliding layers ``RotaryEmbedding(256, 256, theta 1e4)``; full layers
``Gemma4RotaryEmbedding`` ("proportional", ``partial_rotary_factor`` 0.25, theta 1e6), which keeps
``rotary_dim = head_dim = 512`` and zero-pads the frequencies past ``rope_angles = 64`` (cos 1, sin 0: the
identity), with exponents ``2i / head_dim``. So one kernel covers both: pair ``(j, j + D/2)`` rotated by
``cos_sin_cache[pos, j]`` / ``[pos, D/2 + j]``. ``rotary_angles`` (optional) tells the kernel that angles
``>= rotary_angles`` are that identity, so it loads only the leading cos/sin entries (Gemma4RotaryEmbedding
exposes the count as ``rope_angles``).

Numerics follow SGLang's kernels exactly: fp32 sum of squares, ``x * rsqrt(sum / D + eps) * w`` rounded to
the activation dtype (upstream stores the normalised q/k there), then RoPE in fp32 with the fp32 cache and one
more rounding. KV-shared layers skip the dummy K entirely (its result is unused).

Outputs are fresh contiguous tensors ``q [M, Hq*D]``, ``k, v [M, Hkv*D]`` (what the attention backend gets
after upstream's reshapes); inputs may be strided row views of the qkv GEMM output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvtrap.kernels._validate import check_eps, check_same_device, check_same_dtype, check_tensor


@triton.jit
def _norm_rope_block(
    src_ptr,
    dst_ptr,
    w_ptr,
    cs_ptr,
    tok,
    hb,
    stride_src,
    eps,
    H: tl.constexpr,
    HALF: tl.constexpr,
    HB: tl.constexpr,
    ROT: tl.constexpr,
    HAS_W: tl.constexpr,
    ROPE: tl.constexpr,
):
    # One [HB heads, 2 x HALF] tile of one token: the two NeoX halves are loaded as separate [HB, HALF]
    # tiles so the rotation pairs lane j with lane j of the other half (no shuffles).
    heads = hb * HB + tl.arange(0, HB)
    cols = tl.arange(0, HALF)
    ok = (heads < H)[:, None]
    offs = heads[:, None] * (2 * HALF) + cols[None, :]
    src = src_ptr + tok * stride_src + offs
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
    r = tl.rsqrt(ss / (2 * HALF) + eps)[:, None]
    y1 = x1 * r
    y2 = x2 * r
    if HAS_W:
        y1 = y1 * tl.load(w_ptr + cols).to(tl.float32)[None, :]
        y2 = y2 * tl.load(w_ptr + HALF + cols).to(tl.float32)[None, :]
    dt = dst_ptr.dtype.element_ty
    dst = dst_ptr + tok * (H * 2 * HALF) + offs
    if ROPE:
        # Upstream stores the normalised head before its RoPE kernel reads it back: round there too.
        y1 = y1.to(dt).to(tl.float32)
        y2 = y2.to(dt).to(tl.float32)
        if ROT == HALF:
            c = tl.load(cs_ptr + cols)[None, :]
            s = tl.load(cs_ptr + HALF + cols)[None, :]
        else:  # angles >= ROT are the identity (zero frequency): cos 1, sin 0 without loading them
            rot = cols < ROT
            c = tl.load(cs_ptr + cols, mask=rot, other=1.0)[None, :]
            s = tl.load(cs_ptr + HALF + cols, mask=rot, other=0.0)[None, :]
        o1 = y1 * c - y2 * s
        o2 = y2 * c + y1 * s
        tl.store(dst, o1.to(dt), mask=ok)
        tl.store(dst + HALF, o2.to(dt), mask=ok)
    else:
        tl.store(dst, y1.to(dt), mask=ok)
        tl.store(dst + HALF, y2.to(dt), mask=ok)


@triton.jit
def _qkv_norm_rope_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    qw_ptr,
    kw_ptr,
    cs_ptr,
    pos_ptr,
    qo_ptr,
    ko_ptr,
    vo_ptr,
    stride_q,
    stride_k,
    stride_v,
    stride_cs,
    eps,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HALF: tl.constexpr,
    HB: tl.constexpr,
    ROT: tl.constexpr,
    HAS_KV: tl.constexpr,
    TOKEN_MAJOR: tl.constexpr,
):
    # grid (M, head blocks): blocks [0, NQB) are q, then k, then v; the branch is uniform per program
    # (the BY_HEAD launch of upstream's gemma_qkv_rmsnorm, with RoPE and the output store folded in).
    NQB: tl.constexpr = (HQ + HB - 1) // HB
    NKB: tl.constexpr = (HKV + HB - 1) // HB
    if TOKEN_MAJOR:
        # 1-D grid, all head blocks of one token adjacent: one token's q/k/v row (and its cos/sin row,
        # read by every q/k block) is touched by neighbouring programs instead of M programs apart.
        NB: tl.constexpr = NQB + (2 * NKB if HAS_KV else 0)
        pid = tl.program_id(0)
        tok = (pid // NB).to(tl.int64)
        hb = pid % NB
    else:
        tok = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
    cs = cs_ptr + tl.load(pos_ptr + tok).to(tl.int64) * stride_cs
    if hb < NQB:
        _norm_rope_block(q_ptr, qo_ptr, qw_ptr, cs, tok, hb, stride_q, eps, HQ, HALF, HB, ROT, True, True)
    elif HAS_KV:
        if hb < NQB + NKB:
            _norm_rope_block(k_ptr, ko_ptr, kw_ptr, cs, tok, hb - NQB, stride_k, eps, HKV, HALF, HB, ROT, True, True)
        else:
            _norm_rope_block(
                v_ptr, vo_ptr, kw_ptr, cs, tok, hb - NQB - NKB, stride_v, eps, HKV, HALF, HB, ROT, False, False
            )


# Token-major 1-D grid from this M on (None: never); see the kernel. Interleaved H200 runs: 1.025x the 2-D
# grid at M = 256 and 1.02-1.05x at M = 8192 (all three 31B / E4B shapes), 0.98-0.99x at M = 1 and 8.
TOKEN_MAJOR_MIN_M: int | None = 256


def launch_config(m: int, head_dim: int, total_heads: int) -> tuple[int, int]:
    """(heads per program, num_warps). Measured on an H200 (benchmarks/results/kernels-h200-earlier.md, qkv launch
    sweep, 31B shapes): one head per program is fastest at M = 1 (1.52 us at D = 256 vs 1.85 with two), but
    at M = 256 it makes 16k tiny programs (11.2 us vs 4.7-4.9 with 8 heads); at M = 8192 8 heads at 4 warps
    are best or within 0.5%. Rule: about one program per 1024 (token, head) pairs' worth of heads, up to
    8 heads per program; warps = heads per program, at most 4 (the best measured warps for each tile)."""
    if head_dim <= 256 and total_heads > 8 and m * total_heads >= 1 << 18:
        # Interleaved sweep (kernels-h200-earlier.md, 31B sliding, M = 8192, token-major grid): 16 heads x 4 warps
        # 142.5 us (89.5% of copy) vs 8 x 4 153.9 us, 8 x 8 153.7 us, 4 x 4 162.7 us. Not for layers of <= 8
        # heads (q-only): a 16-head tile would be half masked; they take the whole-token rule below.
        return 16, 4
    hb = 1
    while hb < 8 and hb * 2 * 1024 <= m * total_heads:
        hb *= 2
    if hb >= total_heads and m * total_heads >= 1 << 16:
        # A whole token per program at large M (E2B/E4B KV-shared q-only layers, 8 heads). Interleaved H200
        # run at M = 8192 (kernels-h200-qkv-tb-experiment.md): 8 warps 21.0 us (83.8% of copy), 2 warps 21.4,
        # 4 warps 22.6; two or four tokens per program (a knob tried there, then removed) never did better.
        return hb, 8
    return hb, min(4, hb)


def qkv_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor | None,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float = 1e-6,
    rotary_angles: int | None = None,
    *,
    heads_per_program: int | None = None,
    num_warps: int | None = None,
    token_major: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Normalise q, k, v per head (v without weight) and apply NeoX RoPE to q and k; one launch.

    ``q`` ``[M, Hq*D]``, ``k``/``v`` ``[M, Hkv*D]`` (row-strided views allowed) or both ``None`` for a
    KV-shared layer (then only q is produced: the dummy K upstream rotates is not needed). ``cos_sin_cache``
    is fp32 ``[max_pos, D]`` (cos then sin, as SGLang's ``RotaryEmbedding.cos_sin_cache``); ``positions``
    int32/int64 ``[M]``. ``rotary_angles``: only the first that many angles rotate (the rest of the cache must
    be cos 1 / sin 0, as in ``Gemma4RotaryEmbedding``); ``None`` reads all ``D/2``.
    Returns fresh contiguous ``(q, k, v)`` (``k``, ``v`` ``None`` for a KV-shared layer).
    """
    for name, val in (("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if not isinstance(val, int) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if head_dim % 2 or (head_dim // 2) & (head_dim // 2 - 1):
        raise ValueError(f"head_dim must be twice a power of two (NeoX halves), got {head_dim}")
    half = head_dim // 2
    check_tensor("q", q, ndim=2, shape=(None, num_q_heads * head_dim))
    m = q.shape[0]
    if (k is None) != (v is None):
        raise ValueError("k and v must both be tensors or both be None (KV-shared layer)")
    has_kv = k is not None
    if has_kv:
        check_tensor("k", k, ndim=2, shape=(m, num_kv_heads * head_dim))
        check_tensor("v", v, ndim=2, shape=(m, num_kv_heads * head_dim))
        check_same_dtype(q=q, k=k, v=v)
        if not isinstance(k_weight, torch.Tensor):
            raise TypeError("k_weight: a tensor is required when k and v are given")
        check_tensor("k_weight", k_weight, ndim=1, shape=(head_dim,), contiguous=True)
    check_tensor("q_weight", q_weight, ndim=1, shape=(head_dim,), contiguous=True)
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=(torch.float32,), shape=(None, head_dim))
    check_tensor("positions", positions, ndim=1, dtypes=(torch.int32, torch.int64), shape=(m,), contiguous=True)
    if rotary_angles is None:
        rotary_angles = half
    if not isinstance(rotary_angles, int) or not 0 < rotary_angles <= half:
        raise ValueError(f"rotary_angles must be an int in [1, head_dim/2 = {half}], got {rotary_angles!r}")
    eps = check_eps(eps)
    dev = check_same_device(
        q=q, k=k, v=v, q_weight=q_weight, k_weight=k_weight if has_kv else None,
        cos_sin_cache=cos_sin_cache, positions=positions,
    )

    qo = torch.empty((m, num_q_heads * head_dim), device=dev, dtype=q.dtype)
    ko = torch.empty((m, num_kv_heads * head_dim), device=dev, dtype=q.dtype) if has_kv else None
    vo = torch.empty_like(ko) if has_kv else None
    if m == 0:
        return qo, ko, vo
    hb, nw = launch_config(m, head_dim, num_q_heads + (2 * num_kv_heads if has_kv else 0))
    hb = heads_per_program or hb
    if hb & (hb - 1):
        raise ValueError(f"heads_per_program must be a power of two, got {hb}")
    nblocks = triton.cdiv(num_q_heads, hb) + (2 * triton.cdiv(num_kv_heads, hb) if has_kv else 0)
    if token_major is None:
        token_major = TOKEN_MAJOR_MIN_M is not None and m >= TOKEN_MAJOR_MIN_M
    _qkv_norm_rope_kernel[(m * nblocks,) if token_major else (m, nblocks)](
        q,
        k if has_kv else q,
        v if has_kv else q,
        q_weight,
        k_weight if has_kv else q_weight,
        cos_sin_cache,
        positions,
        qo,
        ko if has_kv else qo,
        vo if has_kv else qo,
        q.stride(0),
        k.stride(0) if has_kv else 0,
        v.stride(0) if has_kv else 0,
        cos_sin_cache.stride(0),
        eps,
        HQ=num_q_heads,
        HKV=num_kv_heads if has_kv else 1,
        HALF=half,
        HB=hb,
        ROT=rotary_angles,
        HAS_KV=has_kv,
        TOKEN_MAJOR=token_major,
        num_warps=num_warps or nw,
    )
    return qo, ko, vo
