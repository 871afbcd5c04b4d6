"""The fused kernels as torch custom ops (``torch.ops.kvtrap.*``), so they run under torch.compile (as opaque
calls Inductor does not trace into) and inside CUDA graphs (no host syncs, no allocation outside the
caching allocator, the layer scalar read on the device).

Each op returns fresh tensors and mutates nothing; the fake (meta) implementations only describe shapes.
Importing this module registers the ops once per process.
"""

from __future__ import annotations

import torch
from kvtrap.kernels.cross_layer_norm import post_ffn_dense_next_norm, post_ffn_moe_next_norm
from kvtrap.kernels.ple_tail import (
    gelu_tanh_mul,
    rmsnorm_add,
    rmsnorm_residual_scalar,
    rmsnorm_residual_scalar_next_norm,
)
from kvtrap.kernels.qkv_norm_rope import qkv_norm_rope
from kvtrap.kernels.routing import gemma4_fused_routing
from kvtrap.kernels.triple_norm import post_attn_pair_rmsnorm, post_attn_triple_rmsnorm

Tensor = torch.Tensor


@torch.library.custom_op("kvtrap::gemma4_fused_routing", mutates_args=())
def routing_op(logits: Tensor, per_expert_scale: Tensor, topk: int) -> tuple[Tensor, Tensor]:
    return gemma4_fused_routing(logits, per_expert_scale, topk)


@routing_op.register_fake
def _(logits: Tensor, per_expert_scale: Tensor, topk: int) -> tuple[Tensor, Tensor]:
    m = logits.shape[0]
    return (logits.new_empty((m, topk), dtype=torch.float32), logits.new_empty((m, topk), dtype=torch.int32))


@torch.library.custom_op("kvtrap::rmsnorm_add", mutates_args=())
def rmsnorm_add_op(x: Tensor, weight: Tensor, residual: Tensor, eps: float = 1e-6) -> Tensor:
    return rmsnorm_add(x, weight, residual, eps)


@rmsnorm_add_op.register_fake
def _(x: Tensor, weight: Tensor, residual: Tensor, eps: float = 1e-6) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("kvtrap::gelu_tanh_mul", mutates_args=())
def gelu_tanh_mul_op(gate: Tensor, per_layer_input: Tensor) -> Tensor:
    return gelu_tanh_mul(gate, per_layer_input)


@gelu_tanh_mul_op.register_fake
def _(gate: Tensor, per_layer_input: Tensor) -> Tensor:
    return gate.new_empty(gate.shape)


@torch.library.custom_op("kvtrap::rmsnorm_residual_scalar", mutates_args=())
def rmsnorm_residual_scalar_op(
    x: Tensor, weight: Tensor, residual: Tensor, scalar: Tensor, eps: float = 1e-6
) -> Tensor:
    return rmsnorm_residual_scalar(x, weight, residual, scalar, eps)


@rmsnorm_residual_scalar_op.register_fake
def _(x: Tensor, weight: Tensor, residual: Tensor, scalar: Tensor, eps: float = 1e-6) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("kvtrap::rmsnorm_residual_scalar_next_norm", mutates_args=())
def residual_scalar_next_norm_op(
    x: Tensor, weight: Tensor, residual: Tensor, scalar: Tensor, w_next: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    return rmsnorm_residual_scalar_next_norm(x, weight, residual, scalar, w_next, eps)


@residual_scalar_next_norm_op.register_fake
def _(
    x: Tensor, weight: Tensor, residual: Tensor, scalar: Tensor, w_next: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("kvtrap::post_attn_pair_rmsnorm", mutates_args=())
def pair_rmsnorm_op(
    attn_out: Tensor, residual: Tensor, w_post_attn: Tensor, w_pre_ff: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    return post_attn_pair_rmsnorm(attn_out, residual, w_post_attn, w_pre_ff, eps)


@pair_rmsnorm_op.register_fake
def _(
    attn_out: Tensor, residual: Tensor, w_post_attn: Tensor, w_pre_ff: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    return attn_out.new_empty(attn_out.shape), attn_out.new_empty(attn_out.shape)


@torch.library.custom_op("kvtrap::post_attn_triple_rmsnorm", mutates_args=())
def triple_rmsnorm_op(
    attn_out: Tensor,
    residual: Tensor,
    w_post_attn: Tensor,
    w_pre_ff: Tensor,
    w_router: Tensor,
    w_pre_ff_2: Tensor,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return post_attn_triple_rmsnorm(attn_out, residual, w_post_attn, w_pre_ff, w_router, w_pre_ff_2, eps)


@triple_rmsnorm_op.register_fake
def _(
    attn_out: Tensor,
    residual: Tensor,
    w_post_attn: Tensor,
    w_pre_ff: Tensor,
    w_router: Tensor,
    w_pre_ff_2: Tensor,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(attn_out.new_empty(attn_out.shape) for _ in range(4))  # type: ignore[return-value]


@torch.library.custom_op("kvtrap::post_ffn_dense_next_norm", mutates_args=())
def dense_next_norm_op(
    mlp_out: Tensor, residual: Tensor, w_post_ff: Tensor, scalar: Tensor, w_next: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    return post_ffn_dense_next_norm(mlp_out, residual, w_post_ff, scalar, w_next, eps)


@dense_next_norm_op.register_fake
def _(
    mlp_out: Tensor, residual: Tensor, w_post_ff: Tensor, scalar: Tensor, w_next: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    return mlp_out.new_empty(mlp_out.shape), mlp_out.new_empty(mlp_out.shape)


@torch.library.custom_op("kvtrap::post_ffn_moe_next_norm", mutates_args=())
def moe_next_norm_op(
    dense_out: Tensor,
    moe_out: Tensor,
    residual: Tensor,
    w_post_ff_1: Tensor,
    w_post_ff_2: Tensor,
    w_post_ff: Tensor,
    scalar: Tensor,
    w_next: Tensor,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    return post_ffn_moe_next_norm(
        dense_out, moe_out, residual, w_post_ff_1, w_post_ff_2, w_post_ff, scalar, w_next, eps
    )


@moe_next_norm_op.register_fake
def _(
    dense_out: Tensor,
    moe_out: Tensor,
    residual: Tensor,
    w_post_ff_1: Tensor,
    w_post_ff_2: Tensor,
    w_post_ff: Tensor,
    scalar: Tensor,
    w_next: Tensor,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    return dense_out.new_empty(dense_out.shape), dense_out.new_empty(dense_out.shape)


@torch.library.custom_op("kvtrap::qkv_norm_rope", mutates_args=())
def qkv_norm_rope_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    cos_sin_cache: Tensor,
    positions: Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float = 1e-6,
    rotary_angles: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``rotary_angles`` 0: all ``head_dim / 2`` angles rotate."""
    qo, ko, vo = qkv_norm_rope(
        q, k, v, q_weight, k_weight, cos_sin_cache, positions, num_q_heads, num_kv_heads, head_dim, eps,
        rotary_angles or None,
    )
    return qo, ko, vo  # type: ignore[return-value]


@qkv_norm_rope_op.register_fake
def _(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    cos_sin_cache: Tensor,
    positions: Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float = 1e-6,
    rotary_angles: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    m = q.shape[0]
    return (
        q.new_empty((m, num_q_heads * head_dim)),
        q.new_empty((m, num_kv_heads * head_dim)),
        q.new_empty((m, num_kv_heads * head_dim)),
    )


@torch.library.custom_op("kvtrap::q_norm_rope", mutates_args=())
def q_norm_rope_op(
    q: Tensor,
    q_weight: Tensor,
    cos_sin_cache: Tensor,
    positions: Tensor,
    num_q_heads: int,
    head_dim: int,
    eps: float = 1e-6,
    rotary_angles: int = 0,
) -> Tensor:
    """KV-shared layers: q only (no dummy K)."""
    return qkv_norm_rope(
        q, None, None, q_weight, None, cos_sin_cache, positions, num_q_heads, 1, head_dim, eps, rotary_angles or None
    )[0]


@q_norm_rope_op.register_fake
def _(
    q: Tensor,
    q_weight: Tensor,
    cos_sin_cache: Tensor,
    positions: Tensor,
    num_q_heads: int,
    head_dim: int,
    eps: float = 1e-6,
    rotary_angles: int = 0,
) -> Tensor:
    return q.new_empty((q.shape[0], num_q_heads * head_dim))
