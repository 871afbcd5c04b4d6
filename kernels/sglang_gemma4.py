"""The fused kernels inside SGLang 0.5.23's Gemma 4 model code (``KVTRAP_GEMMA4_KERNELS=1``).

Switched on in every SGLang process by the plugin entry point (:mod:`kvtrap.plugin`), independent of the
trap's ``SGLANG_TRTLLM_MHA_DEBUG``. Nothing in SGLang's files changes: :func:`enable` wraps methods of
``sglang.srt.models.gemma4_causal`` with kvtrap's patching machinery (:mod:`kvtrap.capture.patching`: wrappers are
applied when SGLang imports the module, and :func:`disable` puts the originals back).

What is routed where (line numbers of ``gemma4_causal.py`` 0.5.23, approximate):

- ``qkv_norm_rope``: ``Gemma4Attention.forward`` between the QKV GEMM and the attention call (~L450-527):
  ``gemma_qkv_rmsnorm`` + k/v reshapes + RoPE -> one kernel; KV-shared layers rotate q only (no dummy K).
- ``routing``: the custom routing function each ``Gemma4MoE`` gives its ``TopK`` (~L250-285), swapped for
  one that calls the kernel when the model is planned (and calls SGLang's again after :func:`disable`).
- ``ple_tail``: ``Gemma4DecoderLayer._next_stream``'s PLE branch (E2B/E4B, ~L820-834): 3 fused kernels
  around SGLang's own two per-layer GEMM modules (called from the layer override below where that runs,
  its last kernel then also writing the next layer's input norm).
- ``pair_norm``, ``triple_norm`` and ``cross_layer``: a TP=1 replacement of ``Gemma4DecoderLayer.forward``
  (every released variant; on PLE layers it also runs the PLE tail's kernels itself). After attention, one
  kernel writes the new residual and the FFN input(s): ``pair_norm`` on dense layers (E2B/E4B, 31B),
  ``triple_norm`` on MoE layers (26B-A4B). The layer's end writes the residual stream *and* the next layer's
  input norm (or ``model.norm`` after the last layer) in one kernel (on PLE layers: the PLE tail's last
  kernel); the next consumer finds that normed tensor in a stash keyed by the identity of the stream tensor
  it receives (no tensor values are read, so CUDA-graph capture sees the same launches every time). The
  final norm is picked up through ``layer_boundary.residual.access.final_norm_pair``. The residual stream
  bookkeeping (``forward_batch.residual_stream``) is left in the same "written" state SGLang's own layer
  leaves.

Ideas credited: the routing kernel keeps the contract of SGLang's ``gemma4_fused_routing`` (the algorithm of
vLLM PR #39083); the triple norm follows vLLM's Inductor-generated post-attention kernel (see
``triple_norm.py``); removing launches per Gemma 4 layer is what TensorRT-LLM PR #13013 measured (~1.3 us
per kernel at batch 1). The wiring itself (plan, stash, residual-stream state) is kvtrap's own.

Every fusion qualifies per layer (dtype, shapes, norm flavours, RoPE type, TP=1 where the fusion needs the
whole row and the whole layer) when the model first runs; what does not qualify runs SGLang's own code. One
WARNING per model says which layers use which fusion and why the rest fall back, and which per-call
fallbacks the plan cannot foresee. Per call only tensor metadata is checked (dimensions, dtype): no host
syncs, no ``.item()``, no branching on tensor values. Under SGLang's deterministic inference nothing is
fused (:func:`batch_invariance_reason`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from kvtrap.capture.patching import MethodTarget, install, module_function, uninstall

logger = logging.getLogger("kvtrap.kernels")

MODEL_MODULE = "sglang.srt.models.gemma4_causal"
ACCESS_MODULE = "sglang.srt.layers.layer_boundary.residual.access"

#: Fusion names, in the order the WARNING lists them.
FUSIONS = ("qkv_norm_rope", "routing", "ple_tail", "pair_norm", "triple_norm", "cross_layer")
ON = "on"

# Instance attributes (plain Python objects, never nn.Modules, so the module tree and state dict stay SGLang's).
_PLAN = "_kvtrap_gemma4_plan"  # LayerPlan on a decoder layer, ModelPlan on a Gemma4TextModel
_ATTN_PLAN = "_kvtrap_gemma4_attn"  # AttnPlan on a Gemma4Attention
_STASH = "_kvtrap_pre_normed"  # (stream, normed stream) left by the previous layer for its next consumer


# ------------------------------------------------------------------------------------------ the switch
def targets() -> list[MethodTarget]:
    """What :func:`enable` wraps (also listed by ``kvtrap doctor``)."""
    return [
        MethodTarget(MODEL_MODULE, "Gemma4TextModel", "forward", _wrap_model_forward),
        MethodTarget(MODEL_MODULE, "Gemma4DecoderLayer", "forward", _wrap_layer_forward),
        MethodTarget(MODEL_MODULE, "Gemma4DecoderLayer", "_next_stream", _wrap_next_stream),
        MethodTarget(MODEL_MODULE, "Gemma4Attention", "forward", _wrap_attention_forward),
        module_function(ACCESS_MODULE, "final_norm_pair", _wrap_final_norm_pair),
    ]


_active = False  # read by the routing function a planned MoE keeps after disable()


#: The SGLang releases whose Gemma 4 method bodies the fused paths restate (checked by the plugin before enabling).
TESTED_SGLANG = ("0.5.23",)


def sglang_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def enable() -> None:
    """Route Gemma 4 to the fused kernels in this process (now, or when SGLang imports the model module)."""
    global _active
    install(targets())
    _active = True


def disable() -> None:
    """Put SGLang's methods back; models planned while enabled run SGLang's code again."""
    global _active
    _active = False
    uninstall(targets())


def enabled() -> bool:
    """True between :func:`enable` and :func:`disable` (methods are wrapped once SGLang imports them)."""
    return _active


#: The released variants' structure: (PLE, MoE).
RELEASED = {"E2B-it/E4B-it": (True, False), "26B-A4B-it": (False, True), "31B-it": (False, False)}


def expected_fusions(*, ple: bool, moe: bool, tp: int = 1) -> tuple[str, ...]:
    """The fusions every layer of a model of that structure gets (bf16 on CUDA, SGLang's default norms).

    The per-layer plan (:func:`plan_model`) decides from the live modules; the tests check that the two agree.
    Not covered here: the last layer of a non-last pipeline stage has no next norm (no ``cross_layer``, and
    with it no ``pair_norm`` / ``triple_norm``, which run in the same layer override).
    """
    names = {"qkv_norm_rope"}
    if moe:
        names.add("routing")
    if ple and not moe:
        names.add("ple_tail")
    if tp == 1 and not (ple and moe):  # PLE with MoE: no released variant, not wired
        names.add("cross_layer")
        names.add("triple_norm" if moe else "pair_norm")
    return tuple(n for n in FUSIONS if n in names)


# ------------------------------------------------------------------------------------------ qualifying
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _device_reason(t: Any) -> str | None:
    # Compiled Triton needs CUDA; on a CPU host the kernels run in Triton's interpreter (tests, CI).
    if t.is_cuda or (t.device.type == "cpu" and _interpreting()):
        return None
    return f"device {t.device.type} (needs CUDA, or TRITON_INTERPRET=1 on CPU)"


def _dtype_reason(t: Any) -> str | None:
    import torch

    if t.dtype in (torch.bfloat16, torch.float16, torch.float32):
        return None
    return f"dtype {t.dtype}"


def _plain_rmsnorm_reason(norm: Any, name: str) -> str | None:
    """SGLang's ``RMSNorm`` computing ``x * w`` in fp32 with no extra mode (what the kernels implement)."""
    if norm is None:
        return f"{name} missing"
    if type(norm).__name__ != "RMSNorm":
        return f"{name} is {type(norm).__name__}"
    if (
        not getattr(norm, "has_weight", True)
        or getattr(norm, "variance_size_override", None) is not None
        or getattr(norm, "fp32_residual", False)
        or getattr(norm, "override_orig_dtype", None) is not None
        or getattr(norm, "cast_x_before_out_mul", False)
        or getattr(norm, "x_pad_to_multiple", 0)
        or getattr(norm, "_quant_linear", None) is not None
    ):
        return f"{name} uses an RMSNorm mode the kernels do not implement"
    return None


def _eps(norm: Any) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", -1.0)))


def _same_eps_reason(*norms: Any) -> str | None:
    values = {_eps(n) for n in norms if n is not None}
    return None if len(values) == 1 else f"norms use different eps {sorted(values)}"


def _tp_reason() -> str | None:
    try:
        from sglang.srt.runtime_context import get_parallel

        tp = int(get_parallel().tp_size)
    except Exception as exc:  # no published parallel state: do not guess
        return f"parallel state unknown ({type(exc).__name__})"
    return None if tp == 1 else f"TP={tp} (the fusion needs whole rows and the whole layer on one rank)"


def batch_invariance_reason() -> str | None:
    """Why no fusion may run in this process, if SGLang is asked for batch-invariant results.

    SGLang's deterministic inference (``--enable-deterministic-inference``, which
    ``--rl-on-policy-target`` also turns on) promises the same output for a request whatever else is in
    the batch. The kernels cannot keep that promise: their launch shape (programs per row or head, warps,
    the cross-layer row split, routing's tokens per program) changes with the token count, and with it the
    order of every reduction (norms, the routing softmax). The RL mode also runs native ops to match the
    trainer's numerics bit for bit, which fused kernels do not. Read when the model is planned; SGLang's
    model runner turns the mode on before the first forward."""
    try:
        from sglang.srt.batch_invariant_ops import is_batch_invariant_mode_enabled

        invariant = bool(is_batch_invariant_mode_enabled())
    except ImportError:  # an SGLang without the batch-invariant ops has no such mode
        invariant = False
    target, deterministic = None, False
    try:
        from sglang.srt.runtime_context import get_exec

        det = get_exec().deterministic
        target = getattr(det, "rl_on_policy_target", None)
        deterministic = bool(getattr(det, "enable_deterministic_inference", False))
    except (ImportError, ValueError, AttributeError):  # no published config (layer tests): the flag decides
        pass
    why = "the kernels' launch shape, and with it their reduction order, changes with the token count"
    if target is not None:
        return f"--rl-on-policy-target {target}: SGLang's batch-invariant, native-op mode ({why})"
    if invariant or deterministic:
        return f"SGLang's deterministic inference (batch-invariant mode): {why}"
    return None


def _first(*reasons: str | None) -> str:
    for r in reasons:
        if r is not None:
            return r
    return ON


@dataclass
class AttnPlan:
    status: str  # ON or why not
    rotary_angles: int = 0  # 0: all head_dim/2 angles rotate


def _plan_attention(attn: Any) -> AttnPlan:
    rope = getattr(attn, "rotary_emb", None)
    rope_kind = type(rope).__name__
    hd = attn.head_dim
    reason = batch_invariance_reason()
    if reason is not None:
        return AttnPlan(reason)
    if rope_kind not in ("RotaryEmbedding", "Gemma4RotaryEmbedding"):
        reason = f"RoPE class {rope_kind}"
    elif not rope.is_neox_style or rope.rotary_dim != hd or rope.head_size != hd:
        reason = "RoPE is not NeoX over the whole head"
    elif hd % 2 or (hd // 2) & (hd // 2 - 1):
        reason = f"head_dim {hd} is not twice a power of two"
    else:
        import torch

        cache = rope.cos_sin_cache
        if cache.dtype != torch.float32 or cache.dim() != 2 or cache.shape[1] != hd:
            reason = f"cos_sin_cache {cache.dtype} {tuple(cache.shape)} (needs fp32 [max_pos, head_dim])"
    q_norm, k_norm, v_norm = attn.q_norm, attn.k_norm, attn.v_norm
    if reason is None and not (
        q_norm.scale_shift == 0.0 and k_norm.scale_shift == 0.0 and q_norm.with_scale and k_norm.with_scale
        and not v_norm.with_scale
    ):  # fmt: skip
        reason = "q/k/v norms are not Gemma 4's (x * w; v without weight)"
    if reason is None and not (q_norm.eps == k_norm.eps == v_norm.eps):
        reason = "q/k/v norms use different eps"
    reason = reason or _device_reason(q_norm.weight) or _dtype_reason(q_norm.weight)
    angles = 0
    if reason is None and rope_kind == "Gemma4RotaryEmbedding":
        angles = int(getattr(rope, "rope_angles", 0))
        if not 0 < angles <= hd // 2:
            reason = f"Gemma4RotaryEmbedding.rope_angles {angles}"
    return AttnPlan(_first(reason), angles)


@dataclass
class LayerPlan:
    layer_id: int
    fusions: dict[str, str] = field(default_factory=dict)  # fusion -> ON or why it falls back
    next_norm: Any = None  # the norm this layer's end applies for its next consumer (cross_layer)
    next_holder: Any = None  # that consumer (the next layer, or the final norm module)

    def on(self, name: str) -> bool:
        return self.fusions.get(name) == ON


def _ple_reason(layer: Any) -> str:
    if not layer.has_ple:
        return "no PLE in this model"
    if layer.enable_moe_block:
        return "PLE with MoE (no released variant; not wired)"
    ppl = layer.post_per_layer_input_norm
    return _first(
        _plain_rmsnorm_reason(layer.post_feedforward_layernorm, "post_feedforward_layernorm"),
        None if type(ppl).__name__ == "Gemma4RMSNorm" and ppl.with_scale and ppl.scale_shift == 0.0
        else "post_per_layer_input_norm is not x * w",
        _same_eps_reason(layer.post_feedforward_layernorm, ppl),
        None if layer.layer_scalar.numel() == 1 else "layer_scalar is not one element",
        _device_reason(layer.layer_scalar),
        _dtype_reason(layer.post_feedforward_layernorm.weight),
    )  # fmt: skip


def _cross_reason(layer: Any, next_norm: Any, tp: str | None, ple: str) -> str:
    """The TP=1 layer override (``cross_layer``; ``pair_norm`` and ``triple_norm`` run inside it). On a PLE
    layer it runs the PLE tail's kernels itself, so the layer's ``ple_tail`` must qualify (``ple``)."""
    if layer.has_ple and ple != ON:
        return f"PLE layer whose PLE tail falls back: {ple}"
    norms = [layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
             layer.post_feedforward_layernorm]  # fmt: skip
    names = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
    if layer.enable_moe_block:
        if not (hasattr(layer.router, "_scale_fused") and hasattr(layer.router, "fuse_scale")):
            return "Gemma4Router without the lazy scale folding of SGLang 0.5.23"
        norms += [layer.post_feedforward_layernorm_1, layer.post_feedforward_layernorm_2,
                  layer.pre_feedforward_layernorm_2]  # fmt: skip
        names += ["post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"]
    same_eps = [*norms, next_norm] + ([layer.post_per_layer_input_norm] if layer.has_ple else [])
    return _first(
        tp,
        None if next_norm is not None else "no next norm on this rank (last layer of a non-last PP stage)",
        *(_plain_rmsnorm_reason(n, name) for n, name in zip(norms, names, strict=True)),
        _plain_rmsnorm_reason(next_norm, "next input norm") if next_norm is not None else None,
        _same_eps_reason(*same_eps),
        None if layer.layer_scalar.numel() == 1 else "layer_scalar is not one element",
        _device_reason(layer.layer_scalar),
        _dtype_reason(layer.post_feedforward_layernorm.weight),
    )


def _pair_reason(layer: Any, cross: str) -> str:
    if layer.enable_moe_block:
        return "MoE layer (its post-attention norms are triple_norm's)"
    if cross != ON:
        return f"needs the TP=1 layer path, which falls back here: {cross}"
    return ON


def _triple_reason(layer: Any, cross: str) -> str:
    if not layer.enable_moe_block:
        return "dense layer (no router)"
    if cross != ON:
        return f"needs the TP=1 layer path, which falls back here: {cross}"
    rn = layer.router.norm
    if not (type(rn).__name__ == "Gemma4RMSNorm" and rn.scale_shift == 0.0 and rn.eps == _eps(layer.input_layernorm)):
        return "router norm is not Gemma 4's"
    return ON


def _plan_routing(layer: Any, invariance: str | None) -> str:
    """Qualify the layer's MoE routing and, if it qualifies, give its TopK the kernel's routing function."""
    if not layer.enable_moe_block:
        return "dense layer (no router)"
    config = getattr(layer.moe.topk, "topk_config", None)
    fn = getattr(config, "custom_routing_function", None)
    if fn is None:
        return "TopK has no custom routing function"
    reason = _first(invariance, _device_reason(layer.moe.per_expert_scale))
    if reason == ON and not isinstance(fn, _Routing):
        config.custom_routing_function = _Routing(fn, layer.moe.per_expert_scale)
    return reason


@dataclass
class ModelPlan:
    layers: list[LayerPlan]


def plan_model(model: Any) -> ModelPlan:
    """Decide per layer which fusions apply and wire the cross-layer chain; stored on the model."""
    plan = getattr(model, _PLAN, None)
    if plan is not None:
        return plan
    tp = _tp_reason()
    invariance = batch_invariance_reason()
    local = [model.layers[i] for i in range(model.start_layer, model.end_layer)]
    final_norm = model.norm if type(model.norm).__name__ != "PPMissingLayer" else None
    plans = []
    for idx, layer in enumerate(local):
        holder = local[idx + 1] if idx + 1 < len(local) else final_norm
        next_norm = None if holder is None else (holder.input_layernorm if holder is not final_norm else final_norm)
        lp = LayerPlan(layer.layer_id, next_norm=next_norm, next_holder=holder)
        lp.fusions["qkv_norm_rope"] = _attn_plan(layer.self_attn).status
        lp.fusions["routing"] = _plan_routing(layer, invariance)
        # a dense or PLE-less layer keeps its structural reason; the others say the mode is why
        ple = _first(invariance if layer.has_ple else None, _ple_reason(layer))
        lp.fusions["ple_tail"] = ple
        cross = _first(invariance, _cross_reason(layer, next_norm, tp, ple))
        lp.fusions["cross_layer"] = cross
        moe = layer.enable_moe_block
        lp.fusions["pair_norm"] = _first(invariance if not moe else None, _pair_reason(layer, cross))
        lp.fusions["triple_norm"] = _first(invariance if moe else None, _triple_reason(layer, cross))
        object.__setattr__(layer, _PLAN, lp)
        plans.append(lp)
    plan = ModelPlan(plans)
    object.__setattr__(model, _PLAN, plan)
    logger.warning("Gemma 4 fused kernels (KVTRAP_GEMMA4_KERNELS=1): %s. %s", describe(plan), PER_CALL_NOTE)
    return plan


#: The end of the plan's WARNING: what the plan cannot know, because it is decided per call.
PER_CALL_NOTE = (
    "Per call, SGLang's own path runs even where a fusion is listed above: the layer override (pair_norm, "
    "triple_norm, cross_layer) on a layer that captures aux hidden states (EAGLE3/DFLASH capture layers) or "
    "a PLE layer called without its per-layer input, and while torch.compile or piecewise CUDA-graph capture "
    "traces it (PLE layers keep ple_tail there where it applies); routing under an MoE runner that does its own "
    "top-k and never calls the custom routing function; and inputs of another layout or dtype"
)


def _ranges(ids: list[int]) -> str:
    out: list[str] = []
    for i in sorted(ids):
        if out and out[-1].split("-")[-1] == str(i - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


def describe(plan: ModelPlan) -> str:
    """One line: for each fusion, the layers that use it and, per reason, the layers that fall back."""
    parts = []
    for name in FUSIONS:
        by_status: dict[str, list[int]] = {}
        for lp in plan.layers:
            by_status.setdefault(lp.fusions[name], []).append(lp.layer_id)
        used = by_status.pop(ON, [])
        text = f"{name}: layers {_ranges(used)}" if used else f"{name}: none"
        for why, ids in by_status.items():
            text += f"; SGLang's path on layers {_ranges(ids)} ({why})"
        parts.append(text)
    return " | ".join(parts)


def _attn_plan(attn: Any) -> AttnPlan:
    plan = attn.__dict__.get(_ATTN_PLAN)
    if plan is None:
        plan = _plan_attention(attn)
        object.__setattr__(attn, _ATTN_PLAN, plan)
    return plan


def _ops() -> Any:
    import kvtrap.kernels.custom_ops  # noqa: F401  (registers torch.ops.kvtrap.*)
    import torch

    return torch.ops.kvtrap


# ------------------------------------------------------------------------------------------ wrappers
def _wrap_model_forward(original: Any) -> Any:
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _PLAN not in self.__dict__:
            plan_model(self)
        return original(self, *args, **kwargs)

    return forward


def _wrap_attention_forward(original: Any) -> Any:
    def forward(self: Any, positions: Any, hidden_states: Any, forward_batch: Any, **kwargs: Any) -> Any:
        plan = _attn_plan(self)
        if (
            plan.status != ON
            or kwargs
            or hidden_states.dim() != 2
            or not _positions_ok(positions, hidden_states.shape[0])
            or self.rotary_emb.cos_sin_cache.dtype != _fp32()
        ):
            return original(self, positions, hidden_states, forward_batch, **kwargs)
        return _attention_fused(self, plan, positions, hidden_states, forward_batch)

    return forward


def _fp32() -> Any:
    import torch

    return torch.float32


def _positions_ok(positions: Any, rows: int) -> bool:
    import torch

    return (
        positions.dim() == 1
        and positions.shape[0] == rows
        and positions.dtype in (torch.int32, torch.int64)
        and positions.is_contiguous()
    )


def _compiling() -> bool:
    import torch

    return torch.compiler.is_compiling()


def _attention_fused(self: Any, plan: AttnPlan, positions: Any, hidden_states: Any, forward_batch: Any) -> Any:
    """``Gemma4Attention.forward`` with q/k/v norm + RoPE in one kernel (the rest is SGLang's modules)."""
    ops = _ops()
    qkv, _ = self.qkv_proj(hidden_states)
    q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
    rope = self.rotary_emb
    # read per call: the frozen-KV MTP draft (gemma4_mtp.bind_frozen_kv_context) turns its layers into
    # KV-shared ones after they are built
    if self.is_kv_shared_layer and self.kv_shared_layer_index is not None:
        # upstream rotates a zeroed dummy K it then drops; the kernel rotates q alone
        q = ops.q_norm_rope(
            q, self.q_norm.weight, rope.cos_sin_cache, positions, self.num_heads, self.head_dim,
            self.q_norm.eps, plan.rotary_angles,
        )  # fmt: skip
        k = v = None
    else:
        q, k, v = ops.qkv_norm_rope(
            q, k, v, self.q_norm.weight, self.k_norm.weight, rope.cos_sin_cache, positions,
            self.num_heads, self.num_kv_heads, self.head_dim, self.q_norm.eps, plan.rotary_angles,
        )  # fmt: skip
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
    attn_output = self.attn(
        q.view(-1, self.num_heads, self.head_dim),
        k,
        v,
        forward_batch=forward_batch,
        save_kv_cache=not self.is_kv_shared_layer,
    )
    if attn_output.dim() == 3:
        attn_output = attn_output.flatten(-2, -1)
    output, _ = self.o_proj(attn_output)
    return output


class _Routing:
    """The routing function a ``Gemma4MoE`` gives its ``TopK``, routed to ``torch.ops.kvtrap.gemma4_fused_routing``.

    Same contract as SGLang's closure (fp32 weights, int32 ids; ``renormalize`` is always True for Gemma 4,
    see the closure's comment); anything the kernel does not take goes to that closure.
    """

    def __init__(self, original: Any, per_expert_scale: Any) -> None:
        self.original = original
        self.per_expert_scale = per_expert_scale

    def __call__(self, hidden_states: Any, gating_output: Any, topk: int, renormalize: bool) -> Any:
        import torch

        if (
            _active
            and gating_output.dim() == 2
            and gating_output.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and gating_output.stride(-1) == 1
            and 0 < topk <= gating_output.shape[1] <= 1024
            and _device_reason(gating_output) is None
        ):
            return _ops().gemma4_fused_routing(gating_output, self.per_expert_scale, topk)
        return self.original(hidden_states, gating_output, topk, renormalize)


def _wrap_next_stream(original: Any) -> Any:
    def _next_stream(self: Any, hidden_states: Any, residual: Any, per_layer_input: Any, forward_batch: Any) -> Any:
        plan = self.__dict__.get(_PLAN)
        if plan is None or not plan.on("ple_tail") or not _ple_input_ok(per_layer_input, hidden_states):
            return original(self, hidden_states, residual, per_layer_input, forward_batch)
        from sglang.srt.layers.layer_boundary import SumGroup

        mlp_out = self.ffn_boundary.sum_part(self.mlp(hidden_states), forward_batch, SumGroup.TP)
        return _ple_tail(self, mlp_out, residual, per_layer_input)

    return _next_stream


def _ple_input_ok(per_layer_input: Any, hidden_states: Any) -> bool:
    """The per-layer input the PLE kernels take: a 2-D row-per-token view (row stride free), unit last stride."""
    return (
        per_layer_input is not None
        and hidden_states.dim() == 2
        and per_layer_input.dim() == 2
        and per_layer_input.shape[0] == hidden_states.shape[0]
        and per_layer_input.stride(-1) == 1
        and per_layer_input.dtype == hidden_states.dtype
    )


def _ple_tail(layer: Any, mlp_out: Any, residual: Any, per_layer_input: Any, next_norm: Any = None) -> Any:
    """post-FFN norm + residual, gate GEMM, gelu * per-layer input, projection GEMM, its norm + residual,
    times the layer scalar: 3 fused kernels around SGLang's two GEMM modules (7 + 2 launches -> 3 + 2).
    With ``next_norm`` (the layer override's cross-layer step) the last kernel also writes that norm of the
    stream and ``(stream, normed)`` is returned."""
    ops = _ops()
    eps = _eps(layer.post_feedforward_layernorm)
    h = ops.rmsnorm_add(mlp_out, layer.post_feedforward_layernorm.weight, residual, eps)
    gate, _ = layer.per_layer_input_gate(h)
    gated = ops.gelu_tanh_mul(gate, per_layer_input)
    contrib, _ = layer.per_layer_projection(gated)
    w_ple, scalar = layer.post_per_layer_input_norm.weight, layer.layer_scalar
    if next_norm is None:
        return ops.rmsnorm_residual_scalar(contrib, w_ple, h, scalar, eps)
    return ops.rmsnorm_residual_scalar_next_norm(contrib, w_ple, h, scalar, next_norm.weight, eps)


def _take_stash(holder: Any, stream: Any) -> Any:
    """The normed stream the previous layer left for ``holder``, if ``stream`` is the tensor it was made from."""
    stash = holder.__dict__.get(_STASH)
    if stash is None:
        return None
    object.__setattr__(holder, _STASH, None)
    return stash[1] if stash[0] is stream else None


def _wrap_layer_forward(original: Any) -> Any:
    def forward(
        self: Any,
        positions: Any,
        hidden_states: Any,
        per_layer_input: Any,
        forward_batch: Any,
        capture_output: Any = None,
        **kwargs: Any,
    ) -> Any:
        plan = self.__dict__.get(_PLAN)
        stream = getattr(forward_batch, "residual_stream", None)
        if (
            plan is None
            or not plan.on("cross_layer")
            or capture_output is not None
            or kwargs
            or hidden_states.dim() != 2
            or stream is None
            or stream.pending is not None
            or stream.transport is not None
            or not (stream.residual is None or stream.residual is hidden_states)
            or (self.has_ple and not (plan.on("ple_tail") and _ple_input_ok(per_layer_input, hidden_states)))
            or _compiling()  # the override keeps Python state between layers; leave tracing to SGLang's code
        ):
            if self.__dict__.get(_STASH) is not None:
                object.__setattr__(self, _STASH, None)
            return original(self, positions, hidden_states, per_layer_input, forward_batch, capture_output, **kwargs)
        return _layer_fused(self, plan, positions, hidden_states, per_layer_input, forward_batch)

    return forward


def _layer_fused(self: Any, plan: LayerPlan, positions: Any, x: Any, per_layer_input: Any, forward_batch: Any) -> Any:
    """``Gemma4DecoderLayer.forward`` at TP=1, entered with the stream written (or fresh).

    SGLang's boundaries would: input-norm x; attention; post-attention norm; fused add + pre-FFN norm
    (the new residual); FFN(s); post-FFN norm(s) + residual (on a PLE layer: then the PLE tail), times the
    layer scalar, as the new written stream. Here the input norm may come from the previous layer's end, the
    post-attention part is one kernel (``triple_norm`` on MoE layers, ``pair_norm`` on dense ones), and the
    end also writes the next consumer's input norm (on a PLE layer: the PLE tail's last kernel does).
    """
    from sglang.srt.layers.layer_boundary.residual import batch as residual_batch

    ops = _ops()
    eps = _eps(self.input_layernorm)
    normed = _take_stash(self, x)
    if normed is None:
        normed = self.input_layernorm(x)
    attn = self.self_attn(positions=positions, hidden_states=normed, forward_batch=forward_batch)
    if self.enable_moe_block:
        router = self.router
        if not router._scale_fused:
            router.fuse_scale()  # what Gemma4Router.forward does on its first call (a device copy)
        if plan.on("triple_norm"):
            residual, dense_in, router_in, moe_in = ops.post_attn_triple_rmsnorm(
                attn, x, self.post_attention_layernorm.weight, self.pre_feedforward_layernorm.weight,
                router.norm.weight, self.pre_feedforward_layernorm_2.weight, eps,
            )  # fmt: skip
        else:
            dense_in, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(attn), x)
            router_in = router.norm(residual)
            moe_in = self.pre_feedforward_layernorm_2(residual)
        dense_out = self.mlp(dense_in)
        logits, _ = router.proj(router_in)
        moe_out = self.moe(moe_in, logits)
        stream, next_in = ops.post_ffn_moe_next_norm(
            dense_out, moe_out, residual, self.post_feedforward_layernorm_1.weight,
            self.post_feedforward_layernorm_2.weight, self.post_feedforward_layernorm.weight,
            self.layer_scalar, plan.next_norm.weight, eps,
        )  # fmt: skip
    else:
        if plan.on("pair_norm"):
            residual, dense_in = ops.post_attn_pair_rmsnorm(
                attn, x, self.post_attention_layernorm.weight, self.pre_feedforward_layernorm.weight, eps
            )
        else:
            dense_in, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(attn), x)
        mlp_out = self.mlp(dense_in)
        if self.has_ple:
            stream, next_in = _ple_tail(self, mlp_out, residual, per_layer_input, plan.next_norm)
        else:
            stream, next_in = ops.post_ffn_dense_next_norm(
                mlp_out, residual, self.post_feedforward_layernorm.weight, self.layer_scalar,
                plan.next_norm.weight, eps,
            )  # fmt: skip
    object.__setattr__(plan.next_holder, _STASH, (stream, next_in))
    residual_batch.set_written(stream, forward_batch)
    return stream


def _wrap_final_norm_pair(original: Any) -> Any:
    def final_norm_pair(hidden_states: Any, residual: Any, norm: Any, capture: Any = None, **read_kwargs: Any) -> Any:
        if residual is None and getattr(norm, "__dict__", {}).get(_STASH) is not None:
            normed = _take_stash(norm, hidden_states)
            if normed is not None and not read_kwargs:
                if capture is not None:
                    capture(hidden_states)
                return normed
        return original(hidden_states, residual, norm, capture, **read_kwargs)

    return final_norm_pair
