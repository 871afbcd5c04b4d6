"""The opening every row-wise PLE / triple-norm kernel shares, as Triton helpers (inlined at compile time;
the kernels' PTX is unchanged by using them, checked with triton.compile for sm_90)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_row_pair(x_ptr, r_ptr, w_ptr, row, N, stride_x, stride_r, BLOCK_N: tl.constexpr):
    """Row ``row`` of x and of the residual, then the weight, all as fp32: ``(cols, ok, x, r, w)``. The two
    row loads go out first; a caller with one more load (a scalar) issues it after this and before
    ``rmsnorm_rounded`` so it is in flight during the reduction."""
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    return cols, ok, x, r, w


@triton.jit
def rmsnorm_rounded(x, w, N, eps, dt: tl.constexpr):
    """Gemma 4 RMSNorm of an fp32 row (``x * rsqrt(mean(x^2) + eps) * w``) rounded through ``dt``: eager
    stores the norm output in the activation dtype before anything adds to it."""
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    return (x * rstd * w).to(dt).to(tl.float32)
