"""Eager PyTorch references: SGLang 0.5.23's op sequences for each fused kernel, casts included.

Sources (read from the 0.5.23 wheel): ``sglang/srt/models/gemma4_causal.py`` (``Gemma4DecoderLayer``,
``Gemma4Router``, ``Gemma4MoE.routing_function``) and ``sglang/srt/layers/layernorm.py`` (``RMSNorm`` and
``Gemma4RMSNorm``). Gemma 4 norms are ``x * w`` (no ``1 + w``), computed in fp32 and cast back.

Every function here is what the fused kernel replaces, one torch op per eager launch, so the same code is
the correctness reference in the tests and the "eager" and "torch.compile" rows of the benchmark.
"""

from __future__ import annotations

import torch

EPS = 1e-6


def rms_norm_fp32(x: torch.Tensor, w: torch.Tensor | None, eps: float = EPS) -> torch.Tensor:
    """Gemma 4 RMSNorm in fp32, not cast back: ``x * rsqrt(mean(x^2) + eps) [* w]`` (no ``1 + w``)."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return out if w is None else out * w.float()


def rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float = EPS) -> torch.Tensor:
    """``RMSNorm.forward_native`` / ``Gemma4RMSNorm.forward_native`` (scale_shift 0): fp32 math, one cast."""
    return rms_norm_fp32(x, w, eps).to(x.dtype)


# --- routing -------------------------------------------------------------------------------------------


def routing_ref(logits: torch.Tensor, per_expert_scale: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The semantics of SGLang's ``gemma4_fused_routing`` (its CUDA path): top-k, fp32 softmax over the kept
    logits, times ``per_expert_scale[id]``; fp32 weights, int32 ids. Equal logits keep the lower
    expert id first (a stable descending sort), the order of SGLang's packed-key sort too; ``torch.topk``
    leaves tie order unspecified."""
    vals, ids = torch.sort(logits.float(), dim=-1, descending=True, stable=True)
    vals, ids = vals[:, :topk], ids[:, :topk]
    w = torch.softmax(vals, dim=-1) * per_expert_scale.float()[ids]
    return w, ids.to(torch.int32)


def routing_eager(
    logits: torch.Tensor, per_expert_scale: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Gemma4MoE.routing_function``'s non-fused fallback, op for op: topk in the logits' dtype, softmax in
    that dtype, scale cast to it, then casts. With bf16 logits the softmax rounds to bf16 (~4e-3)."""
    topk_logits, topk_ids = torch.topk(logits, k=topk, dim=-1)
    w = torch.nn.functional.softmax(topk_logits, dim=-1)
    w = w * per_expert_scale[topk_ids].to(w.dtype)
    return w.to(torch.float32), topk_ids.to(torch.int32)


# --- PLE tail (E2B / E4B), Gemma4DecoderLayer._next_stream with has_ple ---------------------------------


def rmsnorm_add_ref(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``post_feedforward_layernorm(h)`` then ``h + residual``: 2 launches, the norm output rounds first."""
    return rms_norm(x, w, eps) + residual


def gelu_tanh_mul_ref(gate: torch.Tensor, per_layer_input: torch.Tensor) -> torch.Tensor:
    """``gelu(gate, approximate="tanh")`` then ``* per_layer_input`` (a strided view): 2 launches."""
    return torch.nn.functional.gelu(gate, approximate="tanh") * per_layer_input


def rmsnorm_residual_scalar_ref(
    x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, scalar: torch.Tensor, eps: float = EPS
) -> torch.Tensor:
    """``post_per_layer_input_norm(c)``, ``h + c``, ``h * layer_scalar``: 3 launches, each rounding."""
    h = residual + rms_norm(x, w, eps)
    return h * scalar


def rmsnorm_residual_scalar_next_norm_ref(
    x: torch.Tensor,
    w: torch.Tensor,
    residual: torch.Tensor,
    scalar: torch.Tensor,
    w_next: torch.Tensor,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A PLE layer's end (``rmsnorm_residual_scalar_ref``: 3 launches, each rounding) and then the next layer's
    ``input_layernorm`` (or ``model.norm`` after the last layer) of that stream: 4 launches.

    Returns ``(hidden_stream, next_layer_input)``."""
    stream = rmsnorm_residual_scalar_ref(x, w, residual, scalar, eps)
    return stream, rms_norm(stream, w_next, eps)


def ple_tail_ref(
    h: torch.Tensor,
    residual: torch.Tensor,
    per_layer_input: torch.Tensor,
    w_post_ff: torch.Tensor,
    w_gate: torch.Tensor,
    w_proj: torch.Tensor,
    w_post_ple: torch.Tensor,
    scalar: torch.Tensor,
    eps: float = EPS,
) -> torch.Tensor:
    """The whole PLE tail, the two GEMMs included (``w_gate`` [256, H], ``w_proj`` [H, 256]): 7 + 2 launches."""
    h = rms_norm(h, w_post_ff, eps)
    h = h + residual
    gate = torch.nn.functional.linear(h, w_gate)
    gate = torch.nn.functional.gelu(gate, approximate="tanh")
    gated = gate * per_layer_input
    contrib = torch.nn.functional.linear(gated, w_proj)
    contrib = rms_norm(contrib, w_post_ple, eps)
    h = h + contrib
    return h * scalar


# --- 26B MoE: post-attention triple norm -----------------------------------------------------------------


def post_attn_triple_rmsnorm_ref(
    attn_out: torch.Tensor,
    residual: torch.Tensor,
    w_post_attn: torch.Tensor,
    w_pre_ff: torch.Tensor,
    w_router: torch.Tensor,
    w_pre_ff_2: torch.Tensor,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """post_attention_layernorm, pre_feedforward_layernorm(h, residual) (fused add: the sum in fp32, the
    residual stored rounded, the norm of the unrounded sum), router.norm (weight already folded by
    ``fuse_scale``) and pre_feedforward_layernorm_2 of the new residual: 4 launches.

    Returns ``(residual_new, dense_ffn_in, router_in, moe_in)``."""
    h = rms_norm(attn_out, w_post_attn, eps)
    s = h.float() + residual.float()
    residual_new = s.to(residual.dtype)
    dense_in = rms_norm_fp32(s, w_pre_ff, eps).to(h.dtype)
    router_in = rms_norm(residual_new, w_router, eps)
    moe_in = rms_norm(residual_new, w_pre_ff_2, eps)
    return residual_new, dense_in, router_in, moe_in


# --- dense layers (E2B/E4B, 31B): post-attention norm + pre-FFN add-norm ------------------------------------


def post_attn_pair_rmsnorm_ref(
    attn_out: torch.Tensor,
    residual: torch.Tensor,
    w_post_attn: torch.Tensor,
    w_pre_ff: torch.Tensor,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``post_attention_layernorm(attn_out)`` (rounded), then ``pre_feedforward_layernorm(h, residual)``: the
    fused add-norm sums in fp32, stores the new residual rounded and normalises the unrounded sum (SGLang's
    ``RMSNorm.forward_native`` and its CUDA ``fused_add_rmsnorm`` alike): 2 launches.

    Returns ``(residual_new, ffn_in)``."""
    h = rms_norm(attn_out, w_post_attn, eps)
    s = h.float() + residual.float()
    return s.to(residual.dtype), rms_norm_fp32(s, w_pre_ff, eps).to(h.dtype)


# --- cross-layer: post-FFN norm + the next layer's input norm ---------------------------------------------


def post_ffn_dense_next_norm_ref(
    mlp_out: torch.Tensor,
    residual: torch.Tensor,
    w_post_ff: torch.Tensor,
    scalar: torch.Tensor,
    w_next: torch.Tensor,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense layer end on CUDA: SGLang's ``gemma_rmsnorm_residual_scalar`` (fp32 throughout, one cast), then
    the next layer's ``input_layernorm`` (or ``model.norm`` after the last layer): 2 launches.

    Returns ``(hidden_stream, next_layer_input)``."""
    n = rms_norm_fp32(mlp_out, w_post_ff, eps)
    stream = ((n + residual.float()) * scalar.float()).to(mlp_out.dtype)
    return stream, rms_norm(stream, w_next, eps)


def post_ffn_moe_next_norm_ref(
    dense_out: torch.Tensor,
    moe_out: torch.Tensor,
    residual: torch.Tensor,
    w_post_ff_1: torch.Tensor,
    w_post_ff_2: torch.Tensor,
    w_post_ff: torch.Tensor,
    scalar: torch.Tensor,
    w_next: torch.Tensor,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE layer end on CUDA: SGLang's ``gemma_dual_rmsnorm_residual_scalar`` (fp32 throughout), then the next
    layer's input norm: 2 launches. Returns ``(hidden_stream, next_layer_input)``."""
    combined = rms_norm_fp32(dense_out, w_post_ff_1, eps) + rms_norm_fp32(moe_out, w_post_ff_2, eps)
    stream = ((rms_norm_fp32(combined, w_post_ff, eps) + residual.float()) * scalar.float()).to(dense_out.dtype)
    return stream, rms_norm(stream, w_next, eps)


def post_ffn_dense_next_norm_native_ref(
    mlp_out: torch.Tensor,
    residual: torch.Tensor,
    w_post_ff: torch.Tensor,
    scalar: torch.Tensor,
    w_next: torch.Tensor,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same step through SGLang's non-fused fallback (norm, add, scalar mul, next norm: 4 launches, each
    rounding). Used as the benchmark's "eager" row, which is what torch.compile is given."""
    h = rms_norm(mlp_out, w_post_ff, eps) + residual
    stream = h * scalar
    return stream, rms_norm(stream, w_next, eps)


def post_ffn_moe_next_norm_native_ref(
    dense_out: torch.Tensor,
    moe_out: torch.Tensor,
    residual: torch.Tensor,
    w_post_ff_1: torch.Tensor,
    w_post_ff_2: torch.Tensor,
    w_post_ff: torch.Tensor,
    scalar: torch.Tensor,
    w_next: torch.Tensor,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-fused fallback of the MoE layer end (~L793-834) plus the next input norm: 6 launches."""
    h = rms_norm(dense_out, w_post_ff_1, eps) + rms_norm(moe_out, w_post_ff_2, eps)
    h = rms_norm(h, w_post_ff, eps) + residual
    stream = h * scalar
    return stream, rms_norm(stream, w_next, eps)


# --- q/k/v norm + RoPE (attention input) ----------------------------------------------------------------


def gemma4_cos_sin_cache(
    head_dim: int, max_pos: int, base: float, partial_rotary_factor: float = 1.0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """SGLang's fp32 ``cos_sin_cache`` ``[max_pos, head_dim]`` (cos then sin) for a Gemma 4 layer:
    ``RotaryEmbedding`` (sliding: theta 1e4, factor 1) or ``Gemma4RotaryEmbedding`` (full, "proportional":
    theta 1e6, factor 0.25: the first ``int(D * f) // 2`` angles with exponent ``2i / D``, the rest 0)."""
    half = head_dim // 2
    angles = int(head_dim * partial_rotary_factor) // 2 if partial_rotary_factor < 1.0 else half
    inv_freq = 1.0 / (base ** (torch.arange(0, 2 * angles, 2, dtype=torch.float, device=device) / head_dim))
    inv_freq = torch.cat([inv_freq, torch.zeros(half - angles, dtype=torch.float, device=device)])
    freqs = torch.einsum("i,j -> ij", torch.arange(max_pos, dtype=torch.float, device=device), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _head_norm(x: torch.Tensor, w: torch.Tensor | None, heads: int, head_dim: int, eps: float) -> torch.Tensor:
    """``gemma_qkv_rmsnorm`` on one tensor: fp32 ``x * rsqrt(sum(x^2) / D + eps) [* w]``, stored in x's dtype."""
    xf = x.reshape(x.shape[0], heads, head_dim).float()
    out = xf * torch.rsqrt(xf.pow(2).sum(dim=-1, keepdim=True) / head_dim + eps)
    if w is not None:
        out = out * w.float()
    return out.to(x.dtype)


def _rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """SGLang's CUDA RoPE (``FusedRopeKernel``, NeoX): fp32 math with the fp32 cache, one rounding."""
    xf = x.float()
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def qkv_norm_rope_ref(
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
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``Gemma4Attention.forward`` from the q/k/v split to the attention call (~L450-527): per-head norms
    (v without weight), k/v reshaped to contiguous, NeoX RoPE of q and k; a KV-shared layer (k, v None)
    rotates q against a zeroed dummy K that it then drops. Returns 2-D ``(q, k, v)``."""
    m = q.shape[0]
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    qn = _head_norm(q, q_weight, num_q_heads, head_dim, eps)
    if k is None:
        dummy_k = torch.zeros_like(q[:, : num_kv_heads * head_dim])
        qr = _rope_neox(qn, cos, sin)
        _rope_neox(dummy_k.view(m, num_kv_heads, head_dim), cos, sin)
        return qr.reshape(m, -1), None, None
    kn = _head_norm(k, k_weight, num_kv_heads, head_dim, eps)
    vn = _head_norm(v, None, num_kv_heads, head_dim, eps)
    return (
        _rope_neox(qn, cos, sin).reshape(m, -1),
        _rope_neox(kn, cos, sin).reshape(m, -1),
        vn.reshape(m, -1),
    )
