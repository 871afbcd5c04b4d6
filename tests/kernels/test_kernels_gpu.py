"""Fused Gemma 4 kernels on the GPU at the released models' shapes, against the eager references and
against SGLang 0.5.23's own Triton kernels where upstream has one; plus CUDA-graph capture and
torch.compile of the custom ops. Tolerances as in test_kernels_cpu.py (GPU branch): one bf16 ulp
elementwise (rounding-boundary cases from a different fp32 summation order), ids exactly equal, fp32
routing weights to 2e-6.
"""

from __future__ import annotations

import pytest
import torch
from kvtrap.kernels import custom_ops  # noqa: F401  (registers torch.ops.kvtrap.*)
from kvtrap.kernels import references as ref
from kvtrap.kernels.cross_layer_norm import post_ffn_dense_next_norm, post_ffn_moe_next_norm
from kvtrap.kernels.ple_tail import (
    gelu_tanh_mul,
    ple_tail,
    rmsnorm_add,
    rmsnorm_residual_scalar,
    rmsnorm_residual_scalar_next_norm,
)
from kvtrap.kernels.qkv_norm_rope import qkv_norm_rope
from kvtrap.kernels.routing import gemma4_fused_routing
from kvtrap.kernels.triple_norm import post_attn_pair_rmsnorm, post_attn_triple_rmsnorm

pytestmark = pytest.mark.gpu
HIDDEN = (1536, 2560, 2816, 5376)
ROWS = (1, 77, 8192)


def _act(*shape: int, scale: float = 1.0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def _weight(n: int) -> torch.Tensor:
    return (torch.rand(n, device="cuda") + 0.5).to(torch.bfloat16)


def _close(out: torch.Tensor, want: torch.Tensor) -> None:
    o, w = out.float(), want.float()
    assert torch.isfinite(o).all()
    rtol = 2.0**-7
    torch.testing.assert_close(o, w, rtol=rtol, atol=rtol * w.abs().max().item())
    assert ((o - w).norm() / w.norm()).item() < 4e-3


def _sglang_routing():  # noqa: ANN202
    try:
        from sglang.kernels.ops.moe.gemma4_routing import gemma4_fused_routing as f
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SGLang routing kernel not importable: {e}")
    return f


def _sglang_fused_ops():  # noqa: ANN202
    try:
        from sglang.kernels.ops.layernorm import gemma4_fused_ops as m
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SGLang gemma4_fused_ops not importable: {e}")
    return m


@pytest.mark.parametrize("m", [1, 64, 256, 8192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_routing_vs_sglang(m: int, dtype: torch.dtype) -> None:
    sgl = _sglang_routing()
    torch.manual_seed(m)
    logits = _act(m, 128, scale=2.0, dtype=dtype)
    scale = torch.rand(128, device="cuda") + 0.5
    w, ids = gemma4_fused_routing(logits, scale, 8)
    w_s, ids_s = sgl(logits, scale, 8)
    w_r, ids_r = ref.routing_ref(logits, scale, 8)
    assert torch.equal(ids, ids_s), "ids differ from SGLang's (both break ties to the lower id)"
    assert torch.equal(ids, ids_r)
    torch.testing.assert_close(w, w_s, rtol=0, atol=2e-6)
    torch.testing.assert_close(w, w_r, rtol=0, atol=2e-6)


@pytest.mark.parametrize("n", HIDDEN)
@pytest.mark.parametrize("m", ROWS)
def test_row_kernels_real_shapes(n: int, m: int) -> None:
    torch.manual_seed(n + m)
    x, r, x2 = _act(m, n, scale=2.0), _act(m, n, scale=8.0), _act(m, n)
    w = [_weight(n) for _ in range(4)]
    s = torch.tensor([0.75], device="cuda").to(torch.bfloat16)
    _close(rmsnorm_add(x, w[0], r), ref.rmsnorm_add_ref(x, w[0], r))
    _close(rmsnorm_residual_scalar(x, w[0], r, s), ref.rmsnorm_residual_scalar_ref(x, w[0], r, s))
    for a, b in zip(post_attn_triple_rmsnorm(x, r, *w), ref.post_attn_triple_rmsnorm_ref(x, r, *w), strict=True):
        _close(a, b)
    for early_w in (False, True):  # the launch rule picks one by M; both must compute the same thing
        for a, b in zip(post_attn_pair_rmsnorm(x, r, w[0], w[1], early_w=early_w),
                        ref.post_attn_pair_rmsnorm_ref(x, r, w[0], w[1]), strict=True):  # fmt: skip
            _close(a, b)
        for a, b in zip(rmsnorm_residual_scalar_next_norm(x, w[0], r, s, w[1], early_w=early_w),
                        ref.rmsnorm_residual_scalar_next_norm_ref(x, w[0], r, s, w[1]), strict=True):  # fmt: skip
            _close(a, b)
    for a, b in zip(post_ffn_dense_next_norm(x, r, w[0], s, w[1]),
                    ref.post_ffn_dense_next_norm_ref(x, r, w[0], s, w[1]), strict=True):  # fmt: skip
        _close(a, b)
    for a, b in zip(post_ffn_moe_next_norm(x, x2, r, *w[:3], s, w[3]),
                    ref.post_ffn_moe_next_norm_ref(x, x2, r, *w[:3], s, w[3]), strict=True):  # fmt: skip
        _close(a, b)


@pytest.mark.parametrize("n", HIDDEN)
@pytest.mark.parametrize(("split", "low_reg", "evict_first", "early_r", "early_w"),
                         [(True, True, False, True, False), (True, False, True, False, True),
                          (False, True, False, True, False), (False, False, False, False, True)])  # fmt: skip
def test_cross_layer_launch_knobs(
    n: int, split: bool, low_reg: bool, evict_first: bool, early_r: bool, early_w: bool
) -> None:
    """Every benchmark-sweep variant of the cross-layer kernels computes the same thing (compiled, real N)."""
    torch.manual_seed(n)
    m = 300
    x, r, x2 = _act(m, n, scale=2.0), _act(m, n, scale=8.0), _act(m, n)
    w = [_weight(n) for _ in range(4)]
    s = torch.tensor([0.75], device="cuda").to(torch.bfloat16)
    knobs = {"split": split, "low_reg": low_reg, "evict_first": evict_first, "early_w": early_w}
    for a, b in zip(post_ffn_dense_next_norm(x, r, w[0], s, w[1], **knobs),
                    ref.post_ffn_dense_next_norm_ref(x, r, w[0], s, w[1]), strict=True):  # fmt: skip
        _close(a, b)
    for a, b in zip(post_ffn_moe_next_norm(x, x2, r, *w[:3], s, w[3], early_r=early_r, **knobs),
                    ref.post_ffn_moe_next_norm_ref(x, x2, r, *w[:3], s, w[3]), strict=True):  # fmt: skip
        _close(a, b)


@pytest.mark.parametrize("m", (*ROWS, 64, 128))
def test_gelu_tanh_mul_real_shapes(m: int) -> None:
    torch.manual_seed(m)
    per_layer_inputs = _act(m, 42, 256)  # E4B: 42 layers x 256
    ple = per_layer_inputs[:, 17, :]
    gate = _act(m, 256, scale=3.0)
    _close(gelu_tanh_mul(gate, ple), ref.gelu_tanh_mul_ref(gate, ple))


@pytest.mark.parametrize("m", (1, 128, 8192))
def test_ple_tail_whole_e4b(m: int) -> None:
    torch.manual_seed(m + 1)
    hid, d = 2560, 256
    h, res = _act(m, hid, scale=2.0), _act(m, hid)
    ple = _act(m, 42, d)[:, 5, :]
    w_gate, w_proj = _act(d, hid, scale=hid**-0.5), _act(hid, d, scale=d**-0.5)
    w_ff, w_ple = _weight(hid), _weight(hid)
    s = torch.tensor([0.625], device="cuda").to(torch.bfloat16)
    got = ple_tail(h, res, ple, w_ff, w_gate, w_proj, w_ple, s)
    want = ref.ple_tail_ref(h, res, ple, w_ff, w_gate, w_proj, w_ple, s)
    assert torch.isfinite(got).all()
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 4e-3


@pytest.mark.parametrize("n", (1536, 2560, 5376))
@pytest.mark.parametrize("m", (1, 77, 8192))
def test_pair_norm_matches_sglang_cuda_norms(n: int, m: int) -> None:
    """post_attn_pair_rmsnorm against what a server's dense layer runs there: sgl_kernel's rmsnorm
    (post_attention_layernorm) then its in-place fused_add_rmsnorm (pre_feedforward_layernorm)."""
    try:
        from sgl_kernel import fused_add_rmsnorm, rmsnorm
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"sgl_kernel not importable: {e}")
    torch.manual_seed(n + m)
    x, r = _act(m, n, scale=2.0), _act(m, n, scale=8.0)
    w_post, w_ff = _weight(n), _weight(n)
    h = rmsnorm(x, w_post, 1e-6)
    res_sgl = r.clone()
    fused_add_rmsnorm(h, res_sgl, w_ff, 1e-6)  # h <- ffn input, res_sgl <- new residual
    res, ffn_in = post_attn_pair_rmsnorm(x, r, w_post, w_ff)
    # the post-attention norm's variance is summed in another order there: rounding-boundary cases differ
    _close(res, res_sgl)
    _close(ffn_in, h)


@pytest.mark.parametrize("n", (2816, 5376))
def test_cross_layer_stream_matches_sglang_kernels(n: int) -> None:
    """Our stream output is SGLang's gemma_(dual_)rmsnorm_residual_scalar output (same fp32 math)."""
    sgl = _sglang_fused_ops()
    torch.manual_seed(n)
    x, x2, r = _act(300, n), _act(300, n, scale=3.0), _act(300, n, scale=8.0)
    w = [_weight(n) for _ in range(4)]
    s = torch.tensor([0.75], device="cuda").to(torch.bfloat16)
    stream, _ = post_ffn_dense_next_norm(x, r, w[0], s, w[1])
    _close(stream, sgl.gemma_rmsnorm_residual_scalar(x, w[0], r, s, 1e-6))
    stream, _ = post_ffn_moe_next_norm(x, x2, r, w[0], w[1], w[2], s, w[3])
    _close(stream, sgl.gemma_dual_rmsnorm_residual_scalar(x, w[0], x2, w[1], w[2], r, s))


def test_custom_ops_in_cuda_graph_and_compile() -> None:
    torch.manual_seed(0)
    n, m = 2816, 64
    x, r = _act(m, n), _act(m, n, scale=4.0)
    w = [_weight(n) for _ in range(4)]
    s = torch.ones(1, device="cuda", dtype=torch.bfloat16)
    logits = _act(m, 128)
    scale = torch.rand(128, device="cuda") + 0.5
    ops = torch.ops.kvtrap

    def step(x: torch.Tensor, r: torch.Tensor, logits: torch.Tensor) -> list[torch.Tensor]:
        res, ff, rin, moe = ops.post_attn_triple_rmsnorm(x, r, w[0], w[1], w[2], w[3], 1e-6)
        tw, tid = ops.gemma4_fused_routing(logits, scale, 8)
        stream, nxt = ops.post_ffn_dense_next_norm(ff, res, w[0], s, w[1], 1e-6)
        pres, pff = ops.post_attn_pair_rmsnorm(x, r, w[0], w[1], 1e-6)
        pstream, pnxt = ops.rmsnorm_residual_scalar_next_norm(pff, w[2], pres, s, w[3], 1e-6)
        return [res, ff, rin, moe, tw, tid, stream, nxt, ops.rmsnorm_add(x, w[0], r, 1e-6), pres, pff, pstream, pnxt]

    eager = step(x, r, logits)
    compiled = torch.compile(step, fullgraph=True)
    for a, b in zip(compiled(x, r, logits), eager, strict=True):
        assert torch.equal(a, b)

    sx, sr, sl = x.clone(), r.clone(), logits.clone()
    stream_ = torch.cuda.Stream()
    stream_.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream_):
        step(sx, sr, sl)
    torch.cuda.current_stream().wait_stream(stream_)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step(sx, sr, sl)
    x2, r2, l2 = _act(m, n), _act(m, n), _act(m, 128)
    sx.copy_(x2), sr.copy_(r2), sl.copy_(l2)
    for o in outs:
        o.fill_(float("nan")) if o.is_floating_point() else o.fill_(-1)
    g.replay()
    torch.cuda.synchronize()
    for a, b in zip(outs, step(x2, r2, l2), strict=True):
        assert torch.equal(a, b)


# --- q/k/v norm + RoPE: (q heads, kv heads, head dim) per released variant and layer type -------------------
# sliding: RotaryEmbedding(D, D, theta 1e4); full: Gemma4RotaryEmbedding (factor 0.25, theta 1e6, 64 angles).
QKV_SHAPES = {
    "E2B-sliding": (8, 1, 256), "E4B-sliding": (8, 2, 256), "E4B-full": (8, 2, 512),
    "26B-sliding": (16, 8, 256), "26B-full": (16, 2, 512), "31B-sliding": (32, 16, 256), "31B-full": (32, 4, 512),
}


def _qkv_case(m: int, hq: int, hkv: int, d: int):  # noqa: ANN202
    qkv = _act(m, (hq + 2 * hkv) * d, scale=2.0)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    full = d == 512
    cache = ref.gemma4_cos_sin_cache(d, 40000, 1e6 if full else 1e4, 0.25 if full else 1.0, device="cuda")
    pos = torch.randint(0, 40000, (m,), device="cuda")
    return q, k, v, _weight(d), _weight(d), cache, pos, (64 if full else None)


@pytest.mark.parametrize("m", [1, 77, 8192])
@pytest.mark.parametrize("variant", list(QKV_SHAPES))
def test_qkv_norm_rope_real_shapes(variant: str, m: int) -> None:
    hq, hkv, d = QKV_SHAPES[variant]
    torch.manual_seed(m + d)
    q, k, v, qw, kw, cache, pos, rot = _qkv_case(m, hq, hkv, d)
    want = ref.qkv_norm_rope_ref(q, k, v, qw, kw, cache, pos, hq, hkv, d)
    for angles in {rot, None}:
        for g, w in zip(qkv_norm_rope(q, k, v, qw, kw, cache, pos, hq, hkv, d, rotary_angles=angles), want, strict=True):
            _close(g, w)
    # KV-shared layer (E2B/E4B's last layers): q only
    got_q = qkv_norm_rope(q, None, None, qw, None, cache, pos, hq, hkv, d, rotary_angles=rot)[0]
    _close(got_q, ref.qkv_norm_rope_ref(q, None, None, qw, None, cache, pos, hq, hkv, d)[0])


@pytest.mark.parametrize("variant", ["31B-sliding", "31B-full", "E2B-sliding"])
@pytest.mark.parametrize("m", [1, 300])
def test_qkv_norm_vs_sglang_kernel(variant: str, m: int) -> None:
    """The norm half against upstream's gemma_qkv_rmsnorm (in place on the split views), then RoPE."""
    sgl = _sglang_fused_ops()
    hq, hkv, d = QKV_SHAPES[variant]
    torch.manual_seed(m)
    q, k, v, qw, kw, cache, pos, rot = _qkv_case(m, hq, hkv, d)
    qkv2 = torch.cat([q, k, v], dim=-1)
    q2, k2, v2 = qkv2.split([hq * d, hkv * d, hkv * d], dim=-1)
    sgl.gemma_qkv_rmsnorm(q2, k2, v2, qw, kw, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, eps=1e-6)
    cos, sin = cache.index_select(0, pos).chunk(2, dim=-1)
    got = qkv_norm_rope(q, k, v, qw, kw, cache, pos, hq, hkv, d, rotary_angles=rot)
    _close(got[0], ref._rope_neox(q2.reshape(m, hq, d), cos, sin).reshape(m, -1))
    _close(got[1], ref._rope_neox(k2.reshape(m, hkv, d), cos, sin).reshape(m, -1))
    _close(got[2], v2)


def test_qkv_custom_op_in_cuda_graph_and_compile() -> None:
    hq, hkv, d = QKV_SHAPES["31B-full"]
    torch.manual_seed(5)
    q, k, v, qw, kw, cache, pos, rot = _qkv_case(64, hq, hkv, d)
    ops = torch.ops.kvtrap

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> list[torch.Tensor]:
        a = ops.qkv_norm_rope(q, k, v, qw, kw, cache, pos, hq, hkv, d, 1e-6, rot)
        return [*a, ops.q_norm_rope(q * 2, qw, cache, pos, hq, d, 1e-6, rot)]

    eager = step(q, k, v, pos)
    for a, b in zip(torch.compile(step, fullgraph=True)(q, k, v, pos), eager, strict=True):
        assert torch.equal(a, b)
    sq, sk, sv, sp = q.clone(), k.clone(), v.clone(), pos.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(sq, sk, sv, sp)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step(sq, sk, sv, sp)
    q2, k2, v2, _, _, _, p2, _ = _qkv_case(64, hq, hkv, d)
    sq.copy_(q2), sk.copy_(k2), sv.copy_(v2), sp.copy_(p2)
    for o in outs:
        o.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    for a, b in zip(outs, step(q2, k2, v2, p2), strict=True):
        assert torch.equal(a, b)
