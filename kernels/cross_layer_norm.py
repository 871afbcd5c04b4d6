"""Cross-layer fusion: a layer's post-FFN norm and residual step fused with the next layer's input norm.

In SGLang 0.5.23 a non-PLE Gemma 4 layer ends with ``gemma_rmsnorm_residual_scalar`` (dense, E4B-less
31B / 26B dense layers) or ``gemma_dual_rmsnorm_residual_scalar`` (26B MoE layers), and the next layer's
``attn_boundary.prepare`` (~L726) starts with ``input_layernorm`` of that stream; after the last layer the
partner is ``model.norm``. Each pair is 2 launches and reads the stream back right after writing it; here
the stream row stays in registers: one launch, 8 bytes per element (dense, bf16) instead of 10.

Numerics follow SGLang's CUDA path: the post-FFN part is fp32 end to end with one cast (as its Triton
kernels do), and the next norm reads the *rounded* stream, exactly what the next layer would read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvtrap.kernels._launch import row_config
from kvtrap.kernels._validate import (
    check_eps,
    check_same_device,
    check_same_dtype,
    check_scalar_tensor,
    check_tensor,
)


@triton.jit
def _up(v):
    """bf16 -> fp32 by moving the bits: the value of ``v.to(fp32)``, but a different op, so the compiler
    does not merge it with an earlier upcast of the same load and can keep the 16-bit copy (half the
    registers) live across a row reduction instead of the fp32 one."""
    if v.dtype == tl.bfloat16:
        out = (v.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        out = v.to(tl.float32)
    return out


@triton.jit
def _dense_next_kernel(
    x_ptr,
    r_ptr,
    w_post_ptr,
    s_ptr,
    w_next_ptr,
    stream_ptr,
    next_ptr,
    N,
    stride_x,
    stride_r,
    eps,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    LOW_REG: tl.constexpr,
    EVICT: tl.constexpr,
    EARLY_W: tl.constexpr,
):
    # The row is held in registers as two chunks, [0, BLOCK_A) and [BLOCK_A, BLOCK_A + BLOCK_B) (BLOCK_B = 0:
    # one chunk), both powers of two: N = 5376 takes 4096 + 2048 = 6144 lanes instead of next_pow2 = 8192,
    # so a quarter fewer registers per row tensor and more rows in flight per SM at M = 8192.
    row = tl.program_id(0).to(tl.int64)
    dt = stream_ptr.dtype.element_ty
    ca = tl.arange(0, BLOCK_A)
    oka = ca < N
    # EARLY_W (decode sizes): both weights are loaded with the row, so the kernel's critical path has one
    # memory round trip; loaded after the reduction they cost ~0.45 us at M = 1 (H200: 2.99 us in
    # kernels-h200-run1.json, 2.54 us with EARLY_W in kernels-h200-earlier.json); at M = 8192 (EARLY_W off) they
    # would only hold registers across the reductions.
    if EARLY_W:
        wa = tl.load(w_post_ptr + ca, mask=oka, other=0.0)
        wna = tl.load(w_next_ptr + ca, mask=oka, other=0.0)
    xa = tl.load(x_ptr + row * stride_x + ca, mask=oka, other=0.0, eviction_policy=EVICT)
    ra = tl.load(r_ptr + row * stride_r + ca, mask=oka, other=0.0, eviction_policy=EVICT)  # kept 16-bit
    xfa = xa.to(tl.float32)
    ss = tl.sum(xfa * xfa, axis=0)
    if BLOCK_B > 0:
        cb = BLOCK_A + tl.arange(0, BLOCK_B)
        okb = cb < N
        if EARLY_W:
            wb = tl.load(w_post_ptr + cb, mask=okb, other=0.0)
            wnb = tl.load(w_next_ptr + cb, mask=okb, other=0.0)
        xb = tl.load(x_ptr + row * stride_x + cb, mask=okb, other=0.0, eviction_policy=EVICT)
        rb = tl.load(r_ptr + row * stride_r + cb, mask=okb, other=0.0, eviction_policy=EVICT)
        xfb = xb.to(tl.float32)
        ss += tl.sum(xfb * xfb, axis=0)
    rs = tl.rsqrt(ss / N + eps)
    s = tl.load(s_ptr).to(tl.float32)
    if LOW_REG:
        xfa = _up(xa)
    if not EARLY_W:
        wa = tl.load(w_post_ptr + ca, mask=oka, other=0.0)
    ha = ((xfa * rs * wa.to(tl.float32) + ra.to(tl.float32)) * s).to(dt)
    tl.store(stream_ptr + row * N + ca, ha, mask=oka)
    hfa = ha.to(tl.float32)
    ss2 = tl.sum(hfa * hfa, axis=0)
    if BLOCK_B > 0:
        if LOW_REG:
            xfb = _up(xb)
        if not EARLY_W:
            wb = tl.load(w_post_ptr + cb, mask=okb, other=0.0)
        hb = ((xfb * rs * wb.to(tl.float32) + rb.to(tl.float32)) * s).to(dt)
        tl.store(stream_ptr + row * N + cb, hb, mask=okb)
        hfb = hb.to(tl.float32)
        ss2 += tl.sum(hfb * hfb, axis=0)
    rs2 = tl.rsqrt(ss2 / N + eps)
    if LOW_REG:
        hfa = _up(ha)
    if not EARLY_W:
        wna = tl.load(w_next_ptr + ca, mask=oka, other=0.0)
    tl.store(next_ptr + row * N + ca, (hfa * rs2 * wna.to(tl.float32)).to(dt), mask=oka)
    if BLOCK_B > 0:
        if LOW_REG:
            hfb = _up(hb)
        if not EARLY_W:
            wnb = tl.load(w_next_ptr + cb, mask=okb, other=0.0)
        tl.store(next_ptr + row * N + cb, (hfb * rs2 * wnb.to(tl.float32)).to(dt), mask=okb)


@triton.jit
def _moe_next_kernel(
    x1_ptr,
    x2_ptr,
    r_ptr,
    w1_ptr,
    w2_ptr,
    w3_ptr,
    s_ptr,
    w_next_ptr,
    stream_ptr,
    next_ptr,
    N,
    stride_x1,
    stride_x2,
    stride_r,
    eps,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    EARLY_R: tl.constexpr,
    LOW_REG: tl.constexpr,
    EVICT: tl.constexpr,
    EARLY_W: tl.constexpr,
):
    # Load order and register pressure decide the M = 8192 rate: every row-sized tensor live across a
    # reduction costs (lanes / threads) registers per thread, and fewer registers mean more rows in flight
    # per SM. History (H200, M = 8192, benchmarks/results/kernels-h200*.md): all loads up front, 214
    # registers at 4 warps: 69% of the copy rate; weights loaded at their use: 76%; + the residual load
    # issued first, 8 warps: 81% in a sweep. Here the row is two power-of-two chunks (N = 2816: 2048 + 1024
    # lanes instead of 4096), the residual stays 16-bit until it is added, and with LOW_REG the inputs
    # are re-expanded from their 16-bit copies after each reduction (``_up``) instead of keeping fp32 ones.
    # EARLY_W (decode sizes, where registers are free and latency is all): the four weights are loaded
    # with the row (one memory round trip on the critical path instead of four).
    row = tl.program_id(0).to(tl.int64)
    dt = stream_ptr.dtype.element_ty
    ca = tl.arange(0, BLOCK_A)
    oka = ca < N
    if EARLY_W:
        w1a = tl.load(w1_ptr + ca, mask=oka, other=0.0)
        w2a = tl.load(w2_ptr + ca, mask=oka, other=0.0)
        w3a = tl.load(w3_ptr + ca, mask=oka, other=0.0)
        wna = tl.load(w_next_ptr + ca, mask=oka, other=0.0)
    x1a = tl.load(x1_ptr + row * stride_x1 + ca, mask=oka, other=0.0, eviction_policy=EVICT)
    x2a = tl.load(x2_ptr + row * stride_x2 + ca, mask=oka, other=0.0, eviction_policy=EVICT)
    if BLOCK_B > 0:
        cb = BLOCK_A + tl.arange(0, BLOCK_B)
        okb = cb < N
        if EARLY_W:
            w1b = tl.load(w1_ptr + cb, mask=okb, other=0.0)
            w2b = tl.load(w2_ptr + cb, mask=okb, other=0.0)
            w3b = tl.load(w3_ptr + cb, mask=okb, other=0.0)
            wnb = tl.load(w_next_ptr + cb, mask=okb, other=0.0)
        x1b = tl.load(x1_ptr + row * stride_x1 + cb, mask=okb, other=0.0, eviction_policy=EVICT)
        x2b = tl.load(x2_ptr + row * stride_x2 + cb, mask=okb, other=0.0, eviction_policy=EVICT)
    if EARLY_R:
        ra = tl.load(r_ptr + row * stride_r + ca, mask=oka, other=0.0, eviction_policy=EVICT)
        if BLOCK_B > 0:
            rb = tl.load(r_ptr + row * stride_r + cb, mask=okb, other=0.0, eviction_policy=EVICT)
    f1a = x1a.to(tl.float32)
    f2a = x2a.to(tl.float32)
    s1 = tl.sum(f1a * f1a, axis=0)
    s2 = tl.sum(f2a * f2a, axis=0)
    if BLOCK_B > 0:
        f1b = x1b.to(tl.float32)
        f2b = x2b.to(tl.float32)
        s1 += tl.sum(f1b * f1b, axis=0)
        s2 += tl.sum(f2b * f2b, axis=0)
    r1 = tl.rsqrt(s1 / N + eps)
    r2 = tl.rsqrt(s2 / N + eps)
    if LOW_REG:
        f1a = _up(x1a)
        f2a = _up(x2a)
    if not EARLY_W:
        w1a = tl.load(w1_ptr + ca, mask=oka, other=0.0)
        w2a = tl.load(w2_ptr + ca, mask=oka, other=0.0)
    c_a = f1a * r1 * w1a.to(tl.float32) + f2a * r2 * w2a.to(tl.float32)
    s3 = tl.sum(c_a * c_a, axis=0)
    if BLOCK_B > 0:
        if LOW_REG:
            f1b = _up(x1b)
            f2b = _up(x2b)
        if not EARLY_W:
            w1b = tl.load(w1_ptr + cb, mask=okb, other=0.0)
            w2b = tl.load(w2_ptr + cb, mask=okb, other=0.0)
        c_b = f1b * r1 * w1b.to(tl.float32) + f2b * r2 * w2b.to(tl.float32)
        s3 += tl.sum(c_b * c_b, axis=0)
    r3 = tl.rsqrt(s3 / N + eps)
    if not EARLY_R:
        ra = tl.load(r_ptr + row * stride_r + ca, mask=oka, other=0.0, eviction_policy=EVICT)
        if BLOCK_B > 0:
            rb = tl.load(r_ptr + row * stride_r + cb, mask=okb, other=0.0, eviction_policy=EVICT)
    s = tl.load(s_ptr).to(tl.float32)
    if not EARLY_W:
        w3a = tl.load(w3_ptr + ca, mask=oka, other=0.0)
    ha = ((c_a * r3 * w3a.to(tl.float32) + ra.to(tl.float32)) * s).to(dt)
    tl.store(stream_ptr + row * N + ca, ha, mask=oka)
    hfa = ha.to(tl.float32)
    s4 = tl.sum(hfa * hfa, axis=0)
    if BLOCK_B > 0:
        if not EARLY_W:
            w3b = tl.load(w3_ptr + cb, mask=okb, other=0.0)
        hb = ((c_b * r3 * w3b.to(tl.float32) + rb.to(tl.float32)) * s).to(dt)
        tl.store(stream_ptr + row * N + cb, hb, mask=okb)
        hfb = hb.to(tl.float32)
        s4 += tl.sum(hfb * hfb, axis=0)
    r4 = tl.rsqrt(s4 / N + eps)
    if LOW_REG:
        hfa = _up(ha)
    if not EARLY_W:
        wna = tl.load(w_next_ptr + ca, mask=oka, other=0.0)
    tl.store(next_ptr + row * N + ca, (hfa * r4 * wna.to(tl.float32)).to(dt), mask=oka)
    if BLOCK_B > 0:
        if LOW_REG:
            hfb = _up(hb)
        if not EARLY_W:
            wnb = tl.load(w_next_ptr + cb, mask=okb, other=0.0)
        tl.store(next_ptr + row * N + cb, (hfb * r4 * wnb.to(tl.float32)).to(dt), mask=okb)


def split_blocks(n: int, split: bool = True) -> tuple[int, int]:
    """(BLOCK_A, BLOCK_B) covering ``n`` lanes with two power-of-two chunks (``split``), or one chunk of
    next_pow2(n) (BLOCK_B = 0). 2816 -> (2048, 1024), 5376 -> (4096, 2048), 2560 -> (2048, 512),
    4096 -> (2048, 2048)."""
    full = triton.next_power_of_2(n)
    if not split or n < 64:
        return full, 0
    a = full // 2  # the largest power of two below n (n itself when n is a power of two: half of it)
    return a, triton.next_power_of_2(n - a)


def _check_weights(N: int, **weights: torch.Tensor) -> None:
    for name, w in weights.items():
        check_tensor(name, w, ndim=1, shape=(N,), contiguous=True)


def _xl_launch(
    n: int, m: int, wide: bool, split: bool | None, num_warps: int | None, early_w: bool | None
) -> tuple[int, int, int, bool]:
    """(BLOCK_A, BLOCK_B, num_warps, EARLY_W) for the cross-layer kernels; None = the measured default.

    Decode sizes (m <= 256) are latency-bound: one power-of-two block, ``row_config``'s warps, weights
    loaded with the row. At m > 256 (bandwidth-bound) the row is split in two chunks, the weights are
    loaded where they are used, and the warps give ~24 lanes per thread per row tensor: 8 warps for the
    dense kernel at N = 5376 (6144 lanes), 4 for the MoE kernel at N = 2816 (3072 lanes), the fastest in
    the H200 sweep (benchmarks/results/kernels-h200-earlier.md, cross-layer sweep)."""
    decode = m <= 256
    split = not decode if split is None else split
    early_w = decode if early_w is None else early_w
    block_a, block_b = split_blocks(n, split)
    if num_warps is None:
        if decode or not split:
            num_warps = row_config(n, m, wide=wide)[1]
        else:
            num_warps = min(16, max(1, triton.next_power_of_2((block_a + block_b) // 768)))
    return block_a, block_b, num_warps, early_w


def post_ffn_dense_next_norm(
    mlp_out: torch.Tensor,
    residual: torch.Tensor,
    w_post_ff: torch.Tensor,
    scalar: torch.Tensor,
    w_next: torch.Tensor,
    eps: float = 1e-6,
    *,
    split: bool | None = None,
    low_reg: bool = True,
    evict_first: bool = False,
    num_warps: int | None = None,
    early_w: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``stream = (rmsnorm(mlp_out, w_post_ff) + residual) * scalar``; ``next_in = rmsnorm(stream, w_next)``.

    ``w_next`` is the next layer's ``input_layernorm.weight`` (``model.norm.weight`` after the last layer).
    Returns ``(stream, next_in)``, both new ``[M, N]`` tensors in the activation dtype. The keyword-only
    arguments are launch knobs for the benchmark sweep (None / defaults: the measured choice)."""
    check_tensor("mlp_out", mlp_out, ndim=2)
    M, N = mlp_out.shape
    check_tensor("residual", residual, ndim=2, shape=(M, N))
    check_same_dtype(mlp_out=mlp_out, residual=residual)
    _check_weights(N, w_post_ff=w_post_ff, w_next=w_next)
    check_scalar_tensor("scalar", scalar)
    check_same_device(mlp_out=mlp_out, residual=residual, w_post_ff=w_post_ff, scalar=scalar, w_next=w_next)
    eps = check_eps(eps)
    stream = torch.empty((M, N), dtype=mlp_out.dtype, device=mlp_out.device)
    nxt = torch.empty_like(stream)
    if M > 0:
        block_a, block_b, nw, ew = _xl_launch(N, M, False, split, num_warps, early_w)
        _dense_next_kernel[(M,)](
            mlp_out, residual, w_post_ff, scalar, w_next, stream, nxt,
            N, mlp_out.stride(0), residual.stride(0), eps, BLOCK_A=block_a, BLOCK_B=block_b,
            LOW_REG=low_reg, EVICT="evict_first" if evict_first else "", EARLY_W=ew, num_warps=nw,
        )  # fmt: skip
    return stream, nxt


def post_ffn_moe_next_norm(
    dense_out: torch.Tensor,
    moe_out: torch.Tensor,
    residual: torch.Tensor,
    w_post_ff_1: torch.Tensor,
    w_post_ff_2: torch.Tensor,
    w_post_ff: torch.Tensor,
    scalar: torch.Tensor,
    w_next: torch.Tensor,
    eps: float = 1e-6,
    *,
    early_r: bool = True,
    split: bool | None = None,
    low_reg: bool = True,
    evict_first: bool = False,
    num_warps: int | None = None,
    early_w: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE form: ``stream = (rmsnorm(rmsnorm(dense_out, w1) + rmsnorm(moe_out, w2), w_post_ff) + residual)
    * scalar``; ``next_in = rmsnorm(stream, w_next)``. Returns ``(stream, next_in)``. ``early_r`` (default
    True) issues the residual load before the reductions; it and the other keyword-only arguments are launch
    knobs for the benchmark sweep (None / defaults: the measured choice)."""
    check_tensor("dense_out", dense_out, ndim=2)
    M, N = dense_out.shape
    check_tensor("moe_out", moe_out, ndim=2, shape=(M, N))
    check_tensor("residual", residual, ndim=2, shape=(M, N))
    check_same_dtype(dense_out=dense_out, moe_out=moe_out, residual=residual)
    _check_weights(N, w_post_ff_1=w_post_ff_1, w_post_ff_2=w_post_ff_2, w_post_ff=w_post_ff, w_next=w_next)
    check_scalar_tensor("scalar", scalar)
    check_same_device(dense_out=dense_out, moe_out=moe_out, residual=residual, w_post_ff_1=w_post_ff_1,
                      w_post_ff_2=w_post_ff_2, w_post_ff=w_post_ff, scalar=scalar, w_next=w_next)  # fmt: skip
    eps = check_eps(eps)
    stream = torch.empty((M, N), dtype=dense_out.dtype, device=dense_out.device)
    nxt = torch.empty_like(stream)
    if M > 0:
        block_a, block_b, nw, ew = _xl_launch(N, M, True, split, num_warps, early_w)
        _moe_next_kernel[(M,)](
            dense_out, moe_out, residual, w_post_ff_1, w_post_ff_2, w_post_ff, scalar, w_next, stream, nxt,
            N, dense_out.stride(0), moe_out.stride(0), residual.stride(0), eps, BLOCK_A=block_a,
            BLOCK_B=block_b, EARLY_R=early_r, LOW_REG=low_reg, EVICT="evict_first" if evict_first else "",
            EARLY_W=ew, num_warps=nw,
        )  # fmt: skip
    return stream, nxt
