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
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_post_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(s_ptr).to(tl.float32)
    dt = stream_ptr.dtype.element_ty
    h = ((x * tl.rsqrt(tl.sum(x * x, axis=0) / N + eps) * w + r) * s).to(dt)
    o = row * N + cols
    tl.store(stream_ptr + o, h, mask=ok)
    hf = h.to(tl.float32)
    wn = tl.load(w_next_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(next_ptr + o, (hf * tl.rsqrt(tl.sum(hf * hf, axis=0) / N + eps) * wn).to(dt), mask=ok)


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
    BLOCK_N: tl.constexpr,
    EARLY_R: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    # Load order matters: the row lives in registers, and every row-sized tensor that is live across a
    # reduction costs BLOCK_N / (32 * num_warps) registers per thread. Loading the residual and all four
    # weights up front (the first version) kept seven row tensors live: 214 registers per thread at
    # 4 warps (ptxas, sm_90a), two rows per SM, 69% of the copy rate at M = 8192 on the H200. Here at most
    # x1, x2 and then c are live together; each weight is loaded right where it is used. The residual
    # load is issued up front (EARLY_R, the default): H200, M = 8192, 8 warps: 66.3 us (81% of the copy
    # rate) against 72.3 us when it is loaded after the reductions; at 4 warps the extra live row costs
    # occupancy instead (83.8 vs 71.2 us). benchmarks/results/kernels-h200.md, MoE sweep.
    x1 = tl.load(x1_ptr + row * stride_x1 + cols, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x2_ptr + row * stride_x2 + cols, mask=ok, other=0.0).to(tl.float32)
    if EARLY_R:
        r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
    r1 = tl.rsqrt(tl.sum(x1 * x1, axis=0) / N + eps)
    r2 = tl.rsqrt(tl.sum(x2 * x2, axis=0) / N + eps)
    c = x1 * r1 * tl.load(w1_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    c += x2 * r2 * tl.load(w2_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    r3 = tl.rsqrt(tl.sum(c * c, axis=0) / N + eps)
    if not EARLY_R:
        r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(s_ptr).to(tl.float32)
    dt = stream_ptr.dtype.element_ty
    h = ((c * r3 * tl.load(w3_ptr + cols, mask=ok, other=0.0).to(tl.float32) + r) * s).to(dt)
    o = row * N + cols
    tl.store(stream_ptr + o, h, mask=ok)
    hf = h.to(tl.float32)
    wn = tl.load(w_next_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(next_ptr + o, (hf * tl.rsqrt(tl.sum(hf * hf, axis=0) / N + eps) * wn).to(dt), mask=ok)


def _check_weights(N: int, **weights: torch.Tensor) -> None:
    for name, w in weights.items():
        check_tensor(name, w, ndim=1, shape=(N,), contiguous=True)


def post_ffn_dense_next_norm(
    mlp_out: torch.Tensor,
    residual: torch.Tensor,
    w_post_ff: torch.Tensor,
    scalar: torch.Tensor,
    w_next: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``stream = (rmsnorm(mlp_out, w_post_ff) + residual) * scalar``; ``next_in = rmsnorm(stream, w_next)``.

    ``w_next`` is the next layer's ``input_layernorm.weight`` (``model.norm.weight`` after the last layer).
    Returns ``(stream, next_in)``, both new ``[M, N]`` tensors in the activation dtype."""
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
        block_n, nw = row_config(N, M)
        _dense_next_kernel[(M,)](
            mlp_out, residual, w_post_ff, scalar, w_next, stream, nxt,
            N, mlp_out.stride(0), residual.stride(0), eps, BLOCK_N=block_n, num_warps=nw,
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE form: ``stream = (rmsnorm(rmsnorm(dense_out, w1) + rmsnorm(moe_out, w2), w_post_ff) + residual)
    * scalar``; ``next_in = rmsnorm(stream, w_next)``. Returns ``(stream, next_in)``. ``early_r`` (default
    True) issues the residual load before the reductions (a benchmark knob)."""
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
        # Wide like the triple norm (three row inputs, four weights): 8 warps at BLOCK_N <= 4096 also
        # at M = 8192 (102 registers per thread; benchmarks/results/kernels-*: the MoE warps sweep).
        block_n, nw = row_config(N, M, wide=True)
        _moe_next_kernel[(M,)](
            dense_out, moe_out, residual, w_post_ff_1, w_post_ff_2, w_post_ff, scalar, w_next, stream, nxt,
            N, dense_out.stride(0), moe_out.stride(0), residual.stride(0), eps, BLOCK_N=block_n,
            EARLY_R=early_r, num_warps=nw,
        )  # fmt: skip
    return stream, nxt
