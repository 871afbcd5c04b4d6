"""PLE tail of Gemma 4 E2B / E4B (``Gemma4DecoderLayer._next_stream`` with ``has_ple``), 7 launches -> 3.

Eager (SGLang 0.5.23, ~L820-834), around the two per-layer GEMMs that stay as they are::

    h = post_feedforward_layernorm(h); h = h + residual          -> rmsnorm_add            (2 -> 1)
    gate = gelu_tanh(gate); g = gate * per_layer_input            -> gelu_tanh_mul          (2 -> 1)
    c = post_per_layer_input_norm(c); h = h + c; h = h * scalar   -> rmsnorm_residual_scalar (3 -> 1)

and, for the cross-layer fusion of a PLE layer, the last of those with the next layer's ``input_layernorm``
(``model.norm`` after the last layer) -> ``rmsnorm_residual_scalar_next_norm`` (2 -> 1 against
``rmsnorm_residual_scalar`` + SGLang's norm; eager: 4 -> 1; the stream row stays in registers, 8 bytes per
element in bf16 instead of 10).

Each kernel computes in fp32 and rounds to the activation dtype exactly where the eager sequence stores an
intermediate tensor (that rounding costs nothing here and makes the fused result match eager to the last
bit up to the order of the variance sum), so swapping the kernels in does not move the model's numerics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvtrap.kernels._launch import row_config
from kvtrap.kernels._rownorm import load_row_pair, rmsnorm_rounded
from kvtrap.kernels._validate import (
    check_eps,
    check_same_device,
    check_same_dtype,
    check_scalar_tensor,
    check_tensor,
)


@triton.jit
def _rmsnorm_add_kernel(
    x_ptr,
    w_ptr,
    r_ptr,
    out_ptr,
    N,
    stride_x,
    stride_r,
    stride_o,
    eps,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols, ok, x, r, w = load_row_pair(x_ptr, r_ptr, w_ptr, row, N, stride_x, stride_r, BLOCK_N)
    dt = out_ptr.dtype.element_ty
    n = rmsnorm_rounded(x, w, N, eps, dt)
    tl.store(out_ptr + row * stride_o + cols, (n + r).to(dt), mask=ok)


@triton.jit
def _rmsnorm_residual_scalar_kernel(
    x_ptr,
    w_ptr,
    r_ptr,
    s_ptr,
    out_ptr,
    w_next_ptr,
    next_ptr,
    N,
    stride_x,
    stride_r,
    stride_o,
    eps,
    BLOCK_N: tl.constexpr,
    NEXT: tl.constexpr,
    EARLY_W: tl.constexpr,
):
    # NEXT: also the next layer's input norm of the stream row this program just wrote (the cross-layer step
    # of a PLE layer: next_ptr shares out_ptr's row stride); otherwise w_next_ptr / next_ptr are not touched.
    row = tl.program_id(0).to(tl.int64)
    cols, ok, x, r, w = load_row_pair(x_ptr, r_ptr, w_ptr, row, N, stride_x, stride_r, BLOCK_N)
    if NEXT and EARLY_W:
        # decode sizes: the next norm's weight comes with the row, off the critical path after two reductions
        wn = tl.load(w_next_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    # The scalar is stored in its own dtype; eager multiplies the activation by it after casting it to
    # the activation dtype (type promotion of a 1-element tensor), hence the round trip.
    s = tl.load(s_ptr).to(dt).to(tl.float32)
    n = rmsnorm_rounded(x, w, N, eps, dt)
    h = (r + n).to(dt).to(tl.float32)
    out = (h * s).to(dt)
    tl.store(out_ptr + row * stride_o + cols, out, mask=ok)
    if NEXT:
        # the next norm reads the rounded stream, exactly what the next layer's input_layernorm would read
        if not EARLY_W:
            wn = tl.load(w_next_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        o = out.to(tl.float32)
        rs = tl.rsqrt(tl.sum(o * o, axis=0) / N + eps)
        tl.store(next_ptr + row * stride_o + cols, (o * rs * wn).to(dt), mask=ok)


@triton.jit
def _gelu_tanh_mul_kernel(
    g_ptr,
    p_ptr,
    out_ptr,
    M,
    stride_g,
    stride_p,
    N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    # At decode sizes this kernel is a few hundred bytes: its time is the launch plus one L2 round trip,
    # so the code on that path is kept as short as Inductor's pointwise kernel: the row width is a
    # compile-time constant (the output row stride with it), loads and stores carry no predicates when
    # M % BLOCK_M == 0 and N is a power of two (EVEN), and offsets stay int32 unless the largest one
    # overflows (INDEX_64). The first version multiplied int64 rows by runtime strides under 2-D masks
    # and measured 0.98x Inductor at M = 1, 64, 128 on the H200.
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    g_offs = rows[:, None] * stride_g + cols[None, :]
    p_offs = rows[:, None] * stride_p + cols[None, :]
    o_offs = rows[:, None] * N + cols[None, :]
    if EVEN:
        g = tl.load(g_ptr + g_offs).to(tl.float32)
        p = tl.load(p_ptr + p_offs).to(tl.float32)
    else:
        ok = (rows < M)[:, None] & (cols < N)[None, :]
        g = tl.load(g_ptr + g_offs, mask=ok, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + p_offs, mask=ok, other=0.0).to(tl.float32)
    # gelu_tanh(g) = 0.5 g (1 + tanh(y)) = g * sigmoid(2y) = g / (1 + exp(-2y)), y = sqrt(2/pi)(g + 0.044715 g^3).
    # The sigmoid form needs one exponential and no tanh (Inductor calls libdevice's tanh, a much longer
    # dependent chain per element: at decode sizes its fastest launches keep one element per thread). Constants folded
    # into the exponent: exp(-2y) = exp2(g * (A + B g^2)), A = -2 sqrt(2/pi) log2(e), B = 0.044715 A, i.e.
    # g*g, one FMA, one multiply into ex2 (the plain exp form measured 1.6% slower at M = 8 in the earlier
    # interleaved run, kernels-h200-earlier.md). Clamping at 80 / ln 2 keeps it finite for very negative g
    # (g / 5.5e34 is already -0 in bf16).
    dt = out_ptr.dtype.element_ty
    z = g * (-2.302208198144325 + -0.1029432395800235 * (g * g))
    e = tl.exp2(tl.minimum(z, 115.41560327111707))
    # Approximate division (div.full.f32, ~2 fp32 ulp): invisible after the bf16 rounding, and several
    # times cheaper than the IEEE division sequence.
    act = tl.fdiv(g, 1.0 + e).to(dt).to(tl.float32)  # eager stores gelu's output first
    res = (act * p).to(dt)
    if EVEN:
        tl.store(out_ptr + o_offs, res)
    else:
        tl.store(out_ptr + o_offs, res, mask=ok)


def _check_row_pair(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor) -> tuple[int, int]:
    check_tensor("x", x, ndim=2)
    M, N = x.shape
    check_tensor("residual", residual, ndim=2, shape=(M, N))
    check_tensor("weight", w, ndim=1, shape=(N,), contiguous=True)
    check_same_dtype(x=x, residual=residual)
    check_same_device(x=x, weight=w, residual=residual)
    return M, N


def rmsnorm_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``rmsnorm(x, weight) + residual`` (Gemma 4 norm: ``x * w``) for ``[M, N]`` activations; new tensor."""
    M, N = _check_row_pair(x, weight, residual)
    eps = check_eps(eps)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    block_n, nw = row_config(N, M)
    _rmsnorm_add_kernel[(M,)](
        x, weight, residual, out, N, x.stride(0), residual.stride(0), out.stride(0), eps,
        BLOCK_N=block_n, num_warps=nw,
    )  # fmt: skip
    return out


def rmsnorm_residual_scalar(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, scalar: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``(residual + rmsnorm(x, weight)) * scalar`` with eager's roundings; ``scalar`` a 1-element tensor."""
    M, N = _check_row_pair(x, weight, residual)
    check_scalar_tensor("scalar", scalar)
    check_same_device(x=x, scalar=scalar)
    eps = check_eps(eps)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    block_n, nw = row_config(N, M)
    _rmsnorm_residual_scalar_kernel[(M,)](
        x, weight, residual, scalar, out, weight, out, N, x.stride(0), residual.stride(0), out.stride(0), eps,
        BLOCK_N=block_n, NEXT=False, EARLY_W=False, num_warps=nw,
    )  # fmt: skip
    return out


def rmsnorm_residual_scalar_next_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor,
    scalar: torch.Tensor,
    w_next: torch.Tensor,
    eps: float = 1e-6,
    *,
    early_w: bool | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PLE tail's last step and the next layer's input norm in one launch (the cross-layer fusion of a
    PLE layer): ``stream = rmsnorm_residual_scalar(x, weight, residual, scalar)`` (eager's roundings) and
    ``next_in = rmsnorm(stream, w_next)``. ``w_next`` is the next layer's ``input_layernorm.weight``
    (``model.norm.weight`` after the last layer). Returns ``(stream, next_in)``, new ``[M, N]`` tensors.
    ``early_w`` (default: M <= 256) and ``num_warps`` are launch knobs for the benchmark (None: the default
    rule)."""
    M, N = _check_row_pair(x, weight, residual)
    check_tensor("w_next", w_next, ndim=1, shape=(N,), contiguous=True)
    check_scalar_tensor("scalar", scalar)
    check_same_device(x=x, scalar=scalar, w_next=w_next)
    eps = check_eps(eps)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    nxt = torch.empty_like(out)
    if M == 0:
        return out, nxt
    block_n, nw = row_config(N, M)
    _rmsnorm_residual_scalar_kernel[(M,)](
        x, weight, residual, scalar, out, w_next, nxt, N, x.stride(0), residual.stride(0), out.stride(0), eps,
        BLOCK_N=block_n, NEXT=True, EARLY_W=M <= 256 if early_w is None else early_w, num_warps=num_warps or nw,
    )  # fmt: skip
    return out, nxt


def _gelu_config(M: int, block_n: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps). Up to M = 256 the kernel is a handful of instructions around two loads and a
    store, so what sets its time is how long each thread's chain is: about 2 elements per thread. H200,
    interleaved against Inductor's generated kernel at 11 launch shapes (N = 256; benchmarks/results/
    kernels-h200-gelu-launch-sweep.md, re-measured in kernels-h200.md): 2 rows x 8 warps fastest or within ~1%
    at M = 8-128, one row x 4 warps at M = 1 and 256; the earlier 1 x 2 rule (4 per thread) lost 0.5-1.6% to
    Inductor's fastest (1 per thread) launches at M = 1-256. Larger M is bandwidth-bound: ~1K elements per
    4-warp program."""
    if M <= 256:
        bm = 2 if M % 2 == 0 and M <= 128 else 1
        return bm, max(1, min(8, bm * block_n // 64))
    return max(1, 1024 // block_n), 4


def gelu_tanh_mul(
    gate: torch.Tensor,
    per_layer_input: torch.Tensor,
    *,
    block_m: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """``gelu_tanh(gate) * per_layer_input``; ``per_layer_input`` may be the strided ``[M, 256]`` view
    (row stride ``num_layers * 256``) of the per-layer embeddings. Returns a contiguous new tensor."""
    check_tensor("gate", gate, ndim=2)
    M, N = gate.shape
    check_tensor("per_layer_input", per_layer_input, ndim=2, shape=(M, N))
    check_same_dtype(gate=gate, per_layer_input=per_layer_input)
    check_same_device(gate=gate, per_layer_input=per_layer_input)
    out = torch.empty((M, N), dtype=gate.dtype, device=gate.device)
    if M == 0 or N == 0:
        return out
    block_n = triton.next_power_of_2(N)
    bm, nw = _gelu_config(M, block_n)
    bm, nw = block_m or bm, num_warps or nw
    grid = triton.cdiv(M, bm)
    # Largest element offset any program forms (padded rows of the last block included).
    last = (grid * bm - 1) * max(gate.stride(0), per_layer_input.stride(0), N) + block_n
    _gelu_tanh_mul_kernel[(grid,)](
        gate, per_layer_input, out, M, gate.stride(0), per_layer_input.stride(0),
        N=N, BLOCK_M=bm, BLOCK_N=block_n, EVEN=(M % bm == 0 and N == block_n), INDEX_64=last >= 2**31, num_warps=nw,
    )  # fmt: skip
    return out


def ple_tail(
    h: torch.Tensor,
    residual: torch.Tensor,
    per_layer_input: torch.Tensor,
    w_post_ff: torch.Tensor,
    w_gate: torch.Tensor,
    w_proj: torch.Tensor,
    w_post_ple: torch.Tensor,
    scalar: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The whole PLE tail with the three fused kernels around the two per-layer GEMMs (kept as
    ``F.linear``, i.e. cuBLAS): 3 + 2 launches instead of eager's 7 + 2. Same arguments and result as
    ``references.ple_tail_ref`` (``w_gate`` ``[256, H]``, ``w_proj`` ``[H, 256]``)."""
    h = rmsnorm_add(h, w_post_ff, residual, eps)
    gated = gelu_tanh_mul(torch.nn.functional.linear(h, w_gate), per_layer_input)
    return rmsnorm_residual_scalar(torch.nn.functional.linear(gated, w_proj), w_post_ple, h, scalar, eps)
