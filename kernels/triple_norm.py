"""Post-attention norms: the triple RMSNorm of Gemma 4 26B-A4B (MoE layers, 4 launches -> 1) and the dense
layers' pair (2 -> 1).

Replaces, in ``Gemma4DecoderLayer`` (SGLang 0.5.23, ~L734-765): ``post_attention_layernorm(attn_out)``,
``pre_feedforward_layernorm(h, residual)`` (fused add + norm; the new residual feeds the MoE branch),
``router.norm(residual)`` (weight folded with ``scale * hidden**-0.5`` by ``Gemma4Router.fuse_scale``) and
``pre_feedforward_layernorm_2(residual)``. The three norms of the new residual share one variance, so one
program reads ``attn_out`` and ``residual`` once and writes four rows: 12 bytes per element in bf16 instead
of 20. The pass structure follows the seed's description of vLLM Inductor's
``triton_red_fused_add_moe_forward_mul_rms_norm_0`` (/work/shared/notes/gemma4.md); the code is new.

Numerics: the post-attention norm output is rounded before the add, as eager stores it. The shared
variance is taken over the *rounded* new residual, which is exactly what eager's router and
``pre_feedforward_layernorm_2`` see; eager's fused-add dense norm instead normalises the unrounded fp32 sum,
so ``dense_ffn_in`` can differ from eager by about one bf16 ulp. That is the one deliberate deviation.

The router norm weight must be the folded one, i.e. read ``router.norm.weight`` only after
``fuse_scale()`` ran (SGLang runs it lazily on the router's first forward).

Dense layers (E2B/E4B, 31B) have only the first two of those norms: ``post_attn_pair_rmsnorm`` is the same
kernel with the router and MoE outputs compiled out (2 launches -> 1, 8 bytes per element in bf16 instead of
12). With one norm of the new residual there is nothing to share, so it normalises the unrounded fp32 sum,
as eager's fused add-norm does (SGLang's CUDA ``fused_add_rmsnorm`` and its native path alike): it matches
eager up to the order of the variance sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvtrap.kernels._launch import row_config
from kvtrap.kernels._rownorm import load_row_pair, rmsnorm_rounded
from kvtrap.kernels._validate import check_eps, check_same_device, check_same_dtype, check_tensor


@triton.jit
def _post_attn_norms_kernel(
    x_ptr,
    r_ptr,
    w_post_ptr,
    w_ff_ptr,
    w_router_ptr,
    w_ff2_ptr,
    res_out_ptr,
    ff_out_ptr,
    router_out_ptr,
    moe_out_ptr,
    N,
    stride_x,
    stride_r,
    eps,
    BLOCK_N: tl.constexpr,
    MOE: tl.constexpr,
    EARLY_W: tl.constexpr,
):
    # MOE: the triple norm (four outputs, one variance of the rounded new residual); otherwise the dense pair
    # (residual + pre-FFN norm of the unrounded sum; the router / MoE pointers are not touched).
    row = tl.program_id(0).to(tl.int64)
    cols, ok, x, r, w_post = load_row_pair(x_ptr, r_ptr, w_post_ptr, row, N, stride_x, stride_r, BLOCK_N)
    if EARLY_W:
        # decode sizes: the second weight comes with the row, off the critical path after the reductions
        # (what EARLY_W measured for the cross-layer kernels)
        w = tl.load(w_ff_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    dt = res_out_ptr.dtype.element_ty
    s = rmsnorm_rounded(x, w_post, N, eps, dt) + r
    post = s.to(dt)
    o = row * N + cols  # outputs are fresh contiguous tensors
    tl.store(res_out_ptr + o, post, mask=ok)
    if MOE:
        p = post.to(tl.float32)
    else:
        p = s
    y = p * tl.rsqrt(tl.sum(p * p, axis=0) / N + eps)
    # Weights are loaded late, one at a time, so at most three row-sized fp32 tensors are live.
    if not EARLY_W:
        w = tl.load(w_ff_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(ff_out_ptr + o, (y * w).to(dt), mask=ok)
    if MOE:
        w = tl.load(w_router_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(router_out_ptr + o, (y * w).to(dt), mask=ok)
        w = tl.load(w_ff2_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(moe_out_ptr + o, (y * w).to(dt), mask=ok)


def post_attn_triple_rmsnorm(
    attn_out: torch.Tensor,
    residual: torch.Tensor,
    w_post_attn: torch.Tensor,
    w_pre_ff: torch.Tensor,
    w_router: torch.Tensor,
    w_pre_ff_2: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch for ``(residual_new, dense_ffn_in, router_in, moe_in)``::

        residual_new = rmsnorm(attn_out, w_post_attn) + residual
        dense_ffn_in = rmsnorm(residual_new, w_pre_ff)
        router_in    = rmsnorm(residual_new, w_router)     # folded router weight
        moe_in       = rmsnorm(residual_new, w_pre_ff_2)

    All ``[M, N]`` in the activation dtype, freshly allocated (``residual`` is not modified).
    """
    check_tensor("attn_out", attn_out, ndim=2)
    M, N = attn_out.shape
    check_tensor("residual", residual, ndim=2, shape=(M, N))
    check_same_dtype(attn_out=attn_out, residual=residual)
    for name, w in (("w_post_attn", w_post_attn), ("w_pre_ff", w_pre_ff), ("w_router", w_router),
                    ("w_pre_ff_2", w_pre_ff_2)):  # fmt: skip
        check_tensor(name, w, ndim=1, shape=(N,), contiguous=True)
    check_same_device(attn_out=attn_out, residual=residual, w_post_attn=w_post_attn, w_pre_ff=w_pre_ff,
                      w_router=w_router, w_pre_ff_2=w_pre_ff_2)  # fmt: skip
    eps = check_eps(eps)
    outs = [torch.empty((M, N), dtype=attn_out.dtype, device=attn_out.device) for _ in range(4)]
    if M > 0:
        block_n, nw = row_config(N, M, wide=True)
        _post_attn_norms_kernel[(M,)](
            attn_out, residual, w_post_attn, w_pre_ff, w_router, w_pre_ff_2, *outs,
            N, attn_out.stride(0), residual.stride(0), eps, BLOCK_N=block_n, MOE=True, EARLY_W=False, num_warps=nw,
        )  # fmt: skip
    return outs[0], outs[1], outs[2], outs[3]


def post_attn_pair_rmsnorm(
    attn_out: torch.Tensor,
    residual: torch.Tensor,
    w_post_attn: torch.Tensor,
    w_pre_ff: torch.Tensor,
    eps: float = 1e-6,
    *,
    early_w: bool | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch for a dense layer's ``(residual_new, ffn_in)``::

        residual_new = rmsnorm(attn_out, w_post_attn) + residual     # post_attention_layernorm, then the add
        ffn_in       = rmsnorm(residual_new, w_pre_ff)               # pre_feedforward_layernorm (fp32 sum)

    what SGLang's ``post_attention_layernorm(attn_out)`` and ``pre_feedforward_layernorm(h, residual)`` give
    (``(ffn_in, residual_new)`` there). Both ``[M, N]`` in the activation dtype, freshly allocated;
    ``residual`` is not modified (SGLang's fused add-norm writes both in place). ``early_w`` (default: M <= 256)
    and ``num_warps`` are launch knobs for the benchmark (None: the default rule)."""
    check_tensor("attn_out", attn_out, ndim=2)
    M, N = attn_out.shape
    check_tensor("residual", residual, ndim=2, shape=(M, N))
    check_same_dtype(attn_out=attn_out, residual=residual)
    for name, w in (("w_post_attn", w_post_attn), ("w_pre_ff", w_pre_ff)):
        check_tensor(name, w, ndim=1, shape=(N,), contiguous=True)
    check_same_device(attn_out=attn_out, residual=residual, w_post_attn=w_post_attn, w_pre_ff=w_pre_ff)
    eps = check_eps(eps)
    res_out = torch.empty((M, N), dtype=attn_out.dtype, device=attn_out.device)
    ff_out = torch.empty_like(res_out)
    if M > 0:
        block_n, nw = row_config(N, M)
        _post_attn_norms_kernel[(M,)](
            attn_out, residual, w_post_attn, w_pre_ff, w_pre_ff, w_pre_ff, res_out, ff_out, ff_out, ff_out,
            N, attn_out.stride(0), residual.stride(0), eps, BLOCK_N=block_n, MOE=False,
            EARLY_W=M <= 256 if early_w is None else early_w, num_warps=num_warps or nw,
        )  # fmt: skip
    return res_out, ff_out
