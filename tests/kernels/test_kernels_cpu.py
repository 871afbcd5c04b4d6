"""Fused Gemma 4 kernels against their eager references, small shapes.

Without CUDA these run in Triton's interpreter (``TRITON_INTERPRET=1``, set below before any kernel module
is imported: ``triton.jit`` reads the setting when it decorates a kernel). With CUDA the same tests run the
compiled kernels on the GPU.

Tolerances. The kernels compute in fp32 and round to bf16 where the eager sequence stores a tensor, so on
the GPU they agree with eager to about one bf16 ulp (relative 2**-8..2**-7, from rounding-boundary cases
where the fp32 sums are ordered differently). Triton's interpreter (triton 3.8) *truncates* fp32 -> bf16
instead of rounding to nearest even (measured: 540 of 1024 random values differ from torch's cast), so on
the CPU each rounding can be off by a full ulp in one direction; with up to two roundings on a path the
elementwise bound is rtol = 2**-6 plus an absolute term of 2**-6 x the tensor's largest magnitude for
results that cancel to near zero (``n + r``); the relative Frobenius error must also stay under 1e-2
(CPU) / 4e-3 (GPU). Routing ids must equal the reference exactly (ties go to the lower expert id in both),
and its fp32 weights agree to 2e-6 absolute (exp and the division round differently).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kvtrap.kernels import custom_ops  # noqa: E402,F401  (registers torch.ops.kvtrap.*)
from kvtrap.kernels import references as ref  # noqa: E402
from kvtrap.kernels.cross_layer_norm import (  # noqa: E402
    post_ffn_dense_next_norm,
    post_ffn_moe_next_norm,
    split_blocks,
)
from kvtrap.kernels.ple_tail import (  # noqa: E402
    gelu_tanh_mul,
    ple_tail,
    rmsnorm_add,
    rmsnorm_residual_scalar,
    rmsnorm_residual_scalar_next_norm,
)
from kvtrap.kernels.qkv_norm_rope import qkv_norm_rope  # noqa: E402
from kvtrap.kernels.routing import gemma4_fused_routing  # noqa: E402
from kvtrap.kernels.triple_norm import post_attn_pair_rmsnorm, post_attn_triple_rmsnorm  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEV == "cuda"


def _act(*shape: int, dtype: torch.dtype = torch.bfloat16, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


def _weight(n: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return (torch.rand(n, device=DEV) + 0.5).to(dtype)


def assert_close_act(out: torch.Tensor, want: torch.Tensor) -> None:
    assert out.shape == want.shape and out.dtype == want.dtype
    o, w = out.float(), want.float()
    assert torch.isfinite(o).all(), "non-finite output (unwritten or overflowed elements)"
    if want.dtype == torch.float32:
        torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5)
        return
    ulp = 2.0**-7 if want.dtype == torch.bfloat16 else 2.0**-10
    rtol = ulp if ON_GPU else 2 * ulp
    atol = rtol * w.abs().max().item()
    torch.testing.assert_close(o, w, rtol=rtol, atol=atol)
    rel = ((o - w).norm() / w.norm().clamp_min(1e-30)).item()
    assert rel < (4e-3 if ON_GPU else 1e-2), rel


# --- routing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("m", "e", "k"), [(5, 128, 8), (3, 100, 8), (2, 1000, 4), (3, 16, 16), (1, 8, 1)])
def test_routing_matches_reference(dtype: torch.dtype, m: int, e: int, k: int) -> None:
    torch.manual_seed(m * 1000 + e + k)
    logits = _act(m, e, dtype=dtype, scale=2.0)
    logits[0, : e // 2] = logits[0, e // 2]  # a long run of exact ties in row 0
    scale = torch.rand(e, device=DEV) + 0.5
    w, ids = gemma4_fused_routing(logits, scale, k)
    w_ref, ids_ref = ref.routing_ref(logits, scale, k)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("block_m", [1, 4])
def test_routing_block_m_and_strided_rows(block_m: int) -> None:
    torch.manual_seed(1)
    base = _act(7, 160)
    logits = base[:, :128]  # row stride 160: the kernel must honour stride(0)
    scale = torch.rand(128, device=DEV) + 0.5
    w, ids = gemma4_fused_routing(logits, scale, 8, block_m=block_m, num_warps=1)
    w_ref, ids_ref = ref.routing_ref(logits, scale, 8)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=2e-6)


def test_routing_close_to_eager_fallback() -> None:
    """SGLang's non-fused fallback softmaxes in the logits' dtype; with fp32 logits (no ties) it agrees."""
    torch.manual_seed(2)
    logits = _act(4, 128, dtype=torch.float32)
    scale = torch.rand(128, device=DEV) + 0.5
    w, ids = gemma4_fused_routing(logits, scale, 8)
    w_e, ids_e = ref.routing_eager(logits, scale, 8)
    assert torch.equal(ids, ids_e)
    torch.testing.assert_close(w, w_e, rtol=1e-5, atol=1e-6)


def test_routing_empty_batch() -> None:
    w, ids = gemma4_fused_routing(_act(0, 128), torch.ones(128, device=DEV), 8)
    assert w.shape == (0, 8) and ids.shape == (0, 8)


# --- PLE tail --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rmsnorm_add(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    x, r, w = _act(5, 300, dtype=dtype, scale=3.0), _act(5, 300, dtype=dtype), _weight(300, dtype)
    assert_close_act(rmsnorm_add(x, w, r), ref.rmsnorm_add_ref(x, w, r))


def test_rmsnorm_residual_scalar() -> None:
    torch.manual_seed(4)
    x, r, w = _act(4, 256), _act(4, 256, scale=4.0), _weight(256)
    s = torch.tensor([0.8125], device=DEV).to(torch.bfloat16)
    assert_close_act(rmsnorm_residual_scalar(x, w, r, s), ref.rmsnorm_residual_scalar_ref(x, w, r, s))


@pytest.mark.parametrize("early_w", [False, True])
@pytest.mark.parametrize(("dtype", "n"), [(torch.bfloat16, 300), (torch.float16, 256), (torch.float32, 200)])
def test_rmsnorm_residual_scalar_next_norm(dtype: torch.dtype, n: int, early_w: bool) -> None:
    """A PLE layer's end + the next input norm: the stream is exactly what ``rmsnorm_residual_scalar`` writes
    (the same code path in the kernel), and both outputs match eager's 3 + 1 launches."""
    torch.manual_seed(n)
    x, r, w, wn = _act(5, n, dtype=dtype), _act(5, n, scale=4.0, dtype=dtype), _weight(n, dtype), _weight(n, dtype)
    s = torch.tensor([0.8125], device=DEV).to(dtype)
    r_before = r.clone()
    stream, nxt = rmsnorm_residual_scalar_next_norm(x, w, r, s, wn, early_w=early_w)
    assert torch.equal(stream, rmsnorm_residual_scalar(x, w, r, s))
    for got, want in zip((stream, nxt), ref.rmsnorm_residual_scalar_next_norm_ref(x, w, r, s, wn), strict=True):
        assert_close_act(got, want)
    # the norm half on its own: the next norm of the very stream the kernel wrote (one rounding, fp32 order)
    assert_close_act(nxt, ref.rms_norm(stream, wn))
    assert torch.equal(r, r_before), "the residual input must not be modified"


def test_gelu_tanh_mul_strided_per_layer_input() -> None:
    torch.manual_seed(5)
    m, layers, d = 19, 5, 256  # 19 rows: a partial last row block
    per_layer_inputs = _act(m, layers, d, scale=2.0)
    ple = per_layer_inputs[:, 3, :]  # the real strided view: row stride layers * 256
    assert ple.stride() == (layers * d, 1)
    gate = _act(m, d, scale=3.0)
    gate[0, :4] = torch.tensor([-30.0, 30.0, 0.0, -0.0])  # saturated tails and zeros
    out = gelu_tanh_mul(gate, ple)
    assert out.is_contiguous()
    assert_close_act(out, ref.gelu_tanh_mul_ref(gate, ple))


@pytest.mark.parametrize(
    ("m", "d", "block_m"), [(8, 256, None), (12, 256, 4), (6, 200, None), (5, 256, 2), (3, 256, None), (300, 64, None)]
)
def test_gelu_tanh_mul_even_and_masked_paths(m: int, d: int, block_m: int | None) -> None:
    """EVEN (no predicates: M % BLOCK_M == 0 and N a power of two) and the masked path (partial row block,
    or a row width that is not a power of two), at the launch rule's small-M (2 rows, odd M: 1 row) and
    large-M shapes."""
    torch.manual_seed(m * d)
    ple = _act(m, 3, d, scale=2.0)[:, 1, :]
    gate = _act(m, d, scale=3.0)
    gate[0, :4] = torch.tensor([-60.0, 60.0, 0.0, -0.0])  # exponent clamp, saturation, zeros
    assert_close_act(gelu_tanh_mul(gate, ple, block_m=block_m), ref.gelu_tanh_mul_ref(gate, ple))


def test_ple_tail_whole() -> None:
    """The three fused kernels around the two GEMMs against eager's 7 + 2 launches. The GEMMs amplify a
    one-ulp difference of their input (the interpreter truncates bf16), so only the relative error is
    bounded here."""
    torch.manual_seed(11)
    m, hid, d = 3, 128, 64
    h, res = _act(m, hid, scale=2.0), _act(m, hid)
    ple = _act(m, 4, d)[:, 2, :]
    w_gate, w_proj = _act(d, hid, scale=hid**-0.5), _act(hid, d, scale=d**-0.5)
    w_ff, w_ple = _weight(hid), _weight(hid)
    s = torch.tensor([0.625], device=DEV).to(torch.bfloat16)
    got = ple_tail(h, res, ple, w_ff, w_gate, w_proj, w_ple, s)
    want = ref.ple_tail_ref(h, res, ple, w_ff, w_gate, w_proj, w_ple, s)
    assert got.shape == want.shape and got.dtype == want.dtype and torch.isfinite(got).all()
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < (4e-3 if ON_GPU else 1e-2)


# --- triple norm / cross-layer ---------------------------------------------------------------------------


def test_post_attn_triple_rmsnorm() -> None:
    torch.manual_seed(6)
    n = 352
    x, r = _act(6, n, scale=2.0), _act(6, n, scale=8.0)
    ws = [_weight(n) for _ in range(4)]
    outs = post_attn_triple_rmsnorm(x, r, *ws)
    r_before = r.clone()
    for got, want in zip(outs, ref.post_attn_triple_rmsnorm_ref(x, r, *ws), strict=True):
        assert_close_act(got, want)
    assert torch.equal(r, r_before), "the residual input must not be modified"


@pytest.mark.parametrize("early_w", [False, True])
@pytest.mark.parametrize(("dtype", "n"), [(torch.bfloat16, 352), (torch.float16, 256), (torch.float32, 200)])
def test_post_attn_pair_rmsnorm(dtype: torch.dtype, n: int, early_w: bool) -> None:
    """Dense layers' post-attention norm + pre-FFN add-norm against eager's 2 launches; the new residual is
    the triple norm's (one kernel, the MoE outputs compiled out), and strided rows are honoured."""
    torch.manual_seed(n + 1)
    x = _act(6, n + 16, scale=2.0, dtype=dtype)[:, 16:]  # row stride n + 16 (a view of a wider GEMM output)
    r, w_post, w_ff = _act(6, n, scale=8.0, dtype=dtype), _weight(n, dtype), _weight(n, dtype)
    r_before = r.clone()
    got = post_attn_pair_rmsnorm(x, r, w_post, w_ff, early_w=early_w)
    for a, b in zip(got, ref.post_attn_pair_rmsnorm_ref(x, r, w_post, w_ff), strict=True):
        assert a.is_contiguous()
        assert_close_act(a, b)
    assert torch.equal(r, r_before), "the residual input must not be modified"
    assert torch.equal(got[0], post_attn_triple_rmsnorm(x, r, w_post, w_ff, w_ff, w_ff)[0])


def test_post_attn_pair_rmsnorm_normalises_the_unrounded_sum() -> None:
    """Eager's fused add-norm normalises the fp32 sum, not the rounded residual it stores. fp16 (which the
    interpreter rounds to nearest, unlike bf16) with a residual near 1000 (fp16 ulp 0.5) and a post-attention
    norm of ~1: the rounding the stored residual drops moves the FFN input by up to half an output ulp, so the
    two readings round apart in many elements. The kernel must give eager's (all but a few elements that a
    different fp32 summation order may flip), and the control shows the two readings are told apart."""
    torch.manual_seed(12)
    n, dt = 512, torch.float16
    x = _act(8, n, dtype=dt)
    r = (1000.0 + 8.0 * torch.randn(8, n, device=DEV)).to(dt)
    w_post, w_ff = _weight(n, dt), torch.ones(n, device=DEV, dtype=dt)
    _, ffn_in = post_attn_pair_rmsnorm(x, r, w_post, w_ff)
    res_new, want = ref.post_attn_pair_rmsnorm_ref(x, r, w_post, w_ff)
    of_rounded = ref.rms_norm(res_new, w_ff)
    same_as_eager = (ffn_in == want).float().mean().item()
    same_as_rounded = (ffn_in == of_rounded).float().mean().item()
    assert same_as_eager >= 0.99, same_as_eager
    assert same_as_rounded <= 0.9, same_as_rounded  # the control: the rounded reading is a different result


XL_KNOBS = [  # (n, split, low_reg, early_w): two-chunk rows (exact, masked second chunk, power of two), one chunk
    (320, True, True, False), (200, True, False, True), (256, True, True, True), (320, False, True, False),
    (200, False, False, True),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "split", "low_reg", "early_w"), XL_KNOBS)
def test_post_ffn_dense_next_norm(n: int, split: bool, low_reg: bool, early_w: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(7)
    x, r = _act(5, n, dtype=dtype), _act(5, n, scale=6.0, dtype=dtype)
    w, wn = _weight(n, dtype), _weight(n, dtype)
    s = torch.tensor([0.5], device=DEV)
    got = post_ffn_dense_next_norm(x, r, w, s, wn, split=split, low_reg=low_reg, evict_first=split, early_w=early_w)
    for a, b in zip(got, ref.post_ffn_dense_next_norm_ref(x, r, w, s, wn), strict=True):
        assert_close_act(a, b)


@pytest.mark.parametrize("early_r", [False, True])
@pytest.mark.parametrize(("n", "split", "low_reg", "early_w"), XL_KNOBS)
def test_post_ffn_moe_next_norm(early_r: bool, n: int, split: bool, low_reg: bool, early_w: bool) -> None:
    torch.manual_seed(8)
    x1, x2, r = _act(5, n), _act(5, n, scale=3.0), _act(5, n, scale=6.0)
    w1, w2, w3, wn = (_weight(n) for _ in range(4))
    s = torch.tensor([1.25], device=DEV).to(torch.bfloat16)
    got = post_ffn_moe_next_norm(x1, x2, r, w1, w2, w3, s, wn, early_r=early_r, split=split, low_reg=low_reg,
                                 early_w=early_w)
    want = ref.post_ffn_moe_next_norm_ref(x1, x2, r, w1, w2, w3, s, wn)
    for a, b in zip(got, want, strict=True):
        assert_close_act(a, b)


def test_split_blocks() -> None:
    assert split_blocks(2816) == (2048, 1024)
    assert split_blocks(5376) == (4096, 2048)
    assert split_blocks(2560) == (2048, 512)
    assert split_blocks(4096) == (2048, 2048)
    assert split_blocks(5376, split=False) == (8192, 0)
    assert split_blocks(40) == (64, 0)


# --- validation -------------------------------------------------------------------------------------------


def test_validation_errors() -> None:
    x, w = _act(2, 64), _weight(64)
    with pytest.raises(ValueError, match="residual: expected size 64"):
        rmsnorm_add(x, w, _act(2, 32))
    with pytest.raises(TypeError, match="dtypes must share|share one dtype"):
        rmsnorm_add(x, w, x.float())
    with pytest.raises(TypeError, match="dtype torch.int32 not supported"):
        rmsnorm_add(x.int(), w, x.int())
    with pytest.raises(ValueError, match="last dimension must have stride 1"):
        rmsnorm_add(_act(64, 2).t(), w, x)
    with pytest.raises(ValueError, match="weight: expected 1-D"):
        rmsnorm_add(x, w[None], x)
    with pytest.raises(ValueError, match="one element"):
        rmsnorm_residual_scalar(x, w, x, torch.ones(2, device=DEV))
    with pytest.raises(ValueError, match="eps must be a positive"):
        rmsnorm_add(x, w, x, eps=0.0)
    with pytest.raises(ValueError, match="one device"):
        rmsnorm_add(x, w.to("meta"), x)
    with pytest.raises(ValueError, match="E <= 1024"):
        gemma4_fused_routing(_act(1, 1100), torch.ones(1100, device=DEV), 8)
    with pytest.raises(ValueError, match="topk must be"):
        gemma4_fused_routing(_act(1, 16), torch.ones(16, device=DEV), 17)
    with pytest.raises(ValueError, match="per_expert_scale: expected size 16"):
        gemma4_fused_routing(_act(1, 16), torch.ones(8, device=DEV), 4)
    with pytest.raises(ValueError, match="w_next: expected size 64"):
        rmsnorm_residual_scalar_next_norm(x, w, x, torch.ones(1, device=DEV), w[:32])
    with pytest.raises(ValueError, match="w_pre_ff: expected size 64"):
        post_attn_pair_rmsnorm(x, x, w, w[:32])
    with pytest.raises(ValueError, match="residual: expected size 2 in dim 0"):
        post_attn_pair_rmsnorm(x, _act(3, 64), w, w)
    with pytest.raises(ValueError, match="per_layer_input: expected size 3"):
        gelu_tanh_mul(_act(3, 256), _act(2, 256))


# --- q/k/v norm + RoPE ----------------------------------------------------------------------------------


def _qkv_inputs(m: int, hq: int, hkv: int, d: int, factor: float, base: float):  # noqa: ANN202
    qkv = _act(m, (hq + 2 * hkv) * d + 8, scale=2.0)[:, 8:]  # row-strided views of one GEMM output
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    cache = ref.gemma4_cos_sin_cache(d, 96, base, factor, device=DEV)
    pos = torch.randint(0, 96, (m,), device=DEV)
    pos[0] = 95
    return q, k, v, _weight(d), _weight(d), cache, pos


# (m, hq, hkv, d, partial_rotary_factor, theta, rotary_angles, heads_per_program): sliding-like (full
# rotation), full-like (Gemma4RotaryEmbedding: a quarter of the angles, with and without the skip hint),
# a partial last head block.
QKV_CASES = [
    (3, 4, 2, 32, 1.0, 1e4, None, None),
    (2, 4, 1, 64, 0.25, 1e6, 8, None),
    (2, 4, 1, 64, 0.25, 1e6, None, 2),
    (3, 3, 1, 32, 1.0, 1e4, None, 2),
]


@pytest.mark.parametrize("token_major", [False, True])
@pytest.mark.parametrize(("m", "hq", "hkv", "d", "f", "base", "rot", "hb"), QKV_CASES)
def test_qkv_norm_rope(
    m: int, hq: int, hkv: int, d: int, f: float, base: float, rot: int | None, hb: int | None, token_major: bool
) -> None:
    """Both grids: (M, head blocks) and the token-major 1-D grid (head blocks of one token adjacent)."""
    torch.manual_seed(m * 100 + d + hq)
    q, k, v, qw, kw, cache, pos = _qkv_inputs(m, hq, hkv, d, f, base)
    got = qkv_norm_rope(q, k, v, qw, kw, cache, pos, hq, hkv, d, rotary_angles=rot, heads_per_program=hb,
                        token_major=token_major)
    want = ref.qkv_norm_rope_ref(q, k, v, qw, kw, cache, pos, hq, hkv, d)
    for g, w in zip(got, want, strict=True):
        assert g.is_contiguous()
        assert_close_act(g, w)


def test_q_norm_rope_kv_shared_and_int32_positions() -> None:
    torch.manual_seed(11)
    q, _, _, qw, _, cache, pos = _qkv_inputs(3, 4, 1, 64, 0.25, 1e6)
    got = qkv_norm_rope(q, None, None, qw, None, cache, pos.int(), 4, 1, 64, rotary_angles=8)
    assert got[1] is None and got[2] is None
    assert_close_act(got[0], ref.qkv_norm_rope_ref(q, None, None, qw, None, cache, pos, 4, 1, 64)[0])
    op = torch.ops.kvtrap.q_norm_rope(q, qw, cache, pos, 4, 64, 1e-6, 8)
    assert torch.equal(op, got[0])


def test_qkv_norm_rope_validation() -> None:
    q, k, v, qw, kw, cache, pos = _qkv_inputs(2, 2, 1, 32, 1.0, 1e4)
    with pytest.raises(ValueError, match="q: expected size 96"):
        qkv_norm_rope(q, k, v, qw, kw, cache, pos, 3, 1, 32)
    with pytest.raises(ValueError, match="both be tensors or both be None"):
        qkv_norm_rope(q, k, None, qw, kw, cache, pos, 2, 1, 32)
    with pytest.raises(TypeError, match="k_weight: a tensor is required"):
        qkv_norm_rope(q, k, v, qw, None, cache, pos, 2, 1, 32)
    with pytest.raises(TypeError, match="cos_sin_cache: dtype torch.bfloat16"):
        qkv_norm_rope(q, k, v, qw, kw, cache.bfloat16(), pos, 2, 1, 32)
    with pytest.raises(ValueError, match="cos_sin_cache: expected size 32"):
        qkv_norm_rope(q, k, v, qw, kw, cache[:, :16], pos, 2, 1, 32)
    with pytest.raises(TypeError, match="positions: dtype torch.float32"):
        qkv_norm_rope(q, k, v, qw, kw, cache, pos.float(), 2, 1, 32)
    with pytest.raises(ValueError, match="positions: expected size 2"):
        qkv_norm_rope(q, k, v, qw, kw, cache, pos[:1], 2, 1, 32)
    with pytest.raises(ValueError, match="rotary_angles must be"):
        qkv_norm_rope(q, k, v, qw, kw, cache, pos, 2, 1, 32, rotary_angles=17)
    with pytest.raises(ValueError, match="head_dim must be twice a power of two"):
        qkv_norm_rope(q[:, :48], k[:, :24], v[:, :24], qw[:24], kw[:24], cache[:, :24], pos, 2, 1, 24)
    with pytest.raises(TypeError, match="share one dtype"):
        qkv_norm_rope(q, k.float(), v, qw, kw, cache, pos, 2, 1, 32)
    with pytest.raises(ValueError, match="last dimension must have stride 1"):
        qkv_norm_rope(_act(64, 2).t(), k, v, qw, kw, cache, pos, 2, 1, 32)


# --- custom ops -------------------------------------------------------------------------------------------


def test_custom_ops_opcheck() -> None:
    torch.manual_seed(9)
    x, r, w, s = _act(3, 128), _act(3, 128), _weight(128), torch.ones(1, device=DEV)
    cs, pos = ref.gemma4_cos_sin_cache(32, 8, 1e4, device=DEV), torch.tensor([0, 5, 7], device=DEV)
    ops = torch.ops.kvtrap
    cases = [
        (ops.gemma4_fused_routing.default, (_act(3, 64), torch.rand(64, device=DEV), 4)),
        (ops.rmsnorm_add.default, (x, w, r, 1e-6)),
        (ops.gelu_tanh_mul.default, (x, r)),
        (ops.rmsnorm_residual_scalar.default, (x, w, r, s, 1e-6)),
        (ops.rmsnorm_residual_scalar_next_norm.default, (x, w, r, s, w, 1e-6)),
        (ops.post_attn_pair_rmsnorm.default, (x, r, w, w, 1e-6)),
        (ops.post_attn_triple_rmsnorm.default, (x, r, w, w, w, w, 1e-6)),
        (ops.post_ffn_dense_next_norm.default, (x, r, w, s, w, 1e-6)),
        (ops.post_ffn_moe_next_norm.default, (x, x, r, w, w, w, s, w, 1e-6)),
        (ops.qkv_norm_rope.default, (x[:, :64], x[:, 64:96], x[:, 96:], w[:32], w[:32], cs, pos, 2, 1, 32, 1e-6, 0)),
        (ops.q_norm_rope.default, (x[:, :64], w[:32], cs, pos, 2, 32, 1e-6, 4)),
    ]
    for op, args in cases:
        # Only schema and fake-tensor checks: the others re-run the kernel many times (slow in the
        # interpreter) and test autograd, which these inference ops do not register.
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_custom_op_under_torch_compile() -> None:
    torch.manual_seed(10)
    x, r, w = _act(4, 128), _act(4, 128), _weight(128)

    def f(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.ops.kvtrap.rmsnorm_add(x * 2, w, r) + 1

    backend = "inductor" if ON_GPU else "aot_eager"
    got = torch.compile(f, backend=backend, fullgraph=True)(x, r, w)
    assert_close_act(got, ref.rmsnorm_add_ref(x * 2, w, r) + 1)
