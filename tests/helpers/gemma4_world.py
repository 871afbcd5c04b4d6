"""SGLang 0.5.23's real Gemma 4 text model on the CPU, run with the fused kernels off and on.

Run as a script in a fresh process (``test_sglang_gemma4.py`` does; ``KVTRAP_TEST_DEVICE=cuda`` runs it on a
GPU against SGLang's CUDA kernels, where ``sglang.srt`` imports there): it initialises SGLang's distributed
state with gloo at world size 1 (``sglang.test.layer_ut_utils.init_single_process_dist``, SGLang's own helper
for layer tests), builds ``Gemma4TextModel`` from a small ``Gemma4TextConfig`` with the released variants'
structure, and runs one prefill (two requests, 5 + 3 tokens) and one decode step through SGLang's
``TorchNativeAttnBackend`` over a real ``MHATokenToKVPool``. It runs the same batches four times:

1. ``off``: SGLang's own code (the switch was never on in this process);
2. ``on``: after :func:`kvtrap.kernels.sglang_gemma4.enable` (the same model object, patched in place);
3. ``on2``: again, to check the WARNING is logged once;
4. ``off_again``: after :func:`~kvtrap.kernels.sglang_gemma4.disable`;

and ``solo`` runs with one layer fused (26B- and E4B-like: also ``pair``, two neighbours fused). Then, each
with fresh models: ``handoff`` (a layer of the 31B- and the E4B-like model entered with a copy of the stream
its predecessor left a normed tensor for), ``router_fold`` (the switch on before any run with it off, router scale not sqrt(hidden)),
``capture`` (an aux-hidden-state capture layer), ``ple_input`` (a PLE layer called without its per-layer
input), ``deterministic`` (SGLang's batch-invariant mode and its
server flags), and ``fallback``: switched on where no layer qualifies (a CPU host without the Triton
interpreter at planning time).

It saves every decoder layer's output stream, the model output, which kernels ran, the plan and the log
lines to the ``.pt`` file named on the command line. A separate process because SGLang's distributed state,
the runtime context and two CPU-host settings below would otherwise leak into the rest of the test session:

- ``SGLANG_ROPE_CACHE_FP32=1``: SGLang keeps the RoPE cache in fp32 on CUDA; on a CPU host it would cast
  it to bf16 unless told (the kernels, like SGLang's CUDA path, read the fp32 cache).
- ``rotary_embedding.base._is_cpu = True``: without CUDA or SGLang's CPU engine, ``RotaryEmbedding`` imports
  vLLM's RoPE op; the CPU-engine flag (the whole engine needs ``sgl_kernel``'s CPU build) is set for that one
  module so it uses its native path.

Layer shapes are small (hidden 64) but keep the structure: sliding + full layers with different RoPE
(default theta 1e4 / "proportional" 1e6 with partial factor 0.25), GQA, KV-shared layers and PLE (E4B-like),
MoE with router + dense MLP (26B-A4B-like), plain dense (31B-like). One head_dim (64) for both layer types:
the test pool (``MHATokenToKVPool``) holds one head size.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

VARIANTS = {
    "e4b": dict(
        hidden_size_per_layer_input=16, vocab_size_per_layer_input=64, num_kv_shared_layers=2,
    ),
    "moe": dict(
        enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32,
        hidden_size_per_layer_input=0, num_kv_shared_layers=0,
    ),
    "dense": dict(hidden_size_per_layer_input=0, num_kv_shared_layers=0),
}  # fmt: skip
HIDDEN = 64
# SGLang's CUDA RoPE takes head sizes 64/128/256/512 with the fp32 cache (other sizes cast it to bf16)
HEAD_DIM = 64
# cpu (CI: Triton interpreter, SGLang's native paths) or cuda (SGLang's CUDA kernels on the off side)
DEVICE = os.environ.get("KVTRAP_TEST_DEVICE", "cpu")
LAYERS = 4
KERNELS = (
    "qkv_norm_rope", "gemma4_fused_routing", "rmsnorm_add", "gelu_tanh_mul", "rmsnorm_residual_scalar",
    "rmsnorm_residual_scalar_next_norm", "post_attn_pair_rmsnorm", "post_attn_triple_rmsnorm",
    "post_ffn_dense_next_norm", "post_ffn_moe_next_norm",
)  # fmt: skip


def config(variant: str):
    from transformers import Gemma4TextConfig

    cfg = Gemma4TextConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        sliding_window=4,
        max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        **VARIANTS[variant],
    )
    # SGLang reads head_dim from the top level (its own config loader does too)
    cfg.allow_global_per_layer_attribute_access = True
    return cfg


def init_weights(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.scale"):
                # Folded router weight = scale * hidden**-0.5 = 1 exactly. SGLang's CPU path
                # (Gemma4RMSNorm.forward_native, with_scale=False) ignores the folded weight that its CUDA
                # path and the kernel apply; with 1 both agree. The kernel tests cover other weights.
                p.fill_(HIDDEN**0.5)
            elif "q_norm" in name or "k_norm" in name:
                # Attention scaling is 1 after the q/k norms: weights ~0.35 keep the random model's attention
                # logits at std ~1 (weights ~1 give logits of std ~8, an argmax that any rounding can flip,
                # which would hide the fused ops' error behind chaotic attention in the all-layers test).
                p.copy_(0.35 + 0.05 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("per_expert_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1)
        for layer in model.layers:
            layer.layer_scalar.fill_(0.75)


class Runner:
    def __init__(self, variant: str) -> None:
        import torch
        from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
        from sglang.srt.model_executor.forward_context import ForwardContext, set_forward_context
        from sglang.srt.models.gemma4_causal import Gemma4TextModel

        torch.set_default_dtype(torch.bfloat16)
        try:
            self.model = Gemma4TextModel(config(variant))
        finally:
            torch.set_default_dtype(torch.float32)
        init_weights(self.model, seed=sum(map(ord, variant)))
        self.model.to(DEVICE)
        self.kv = MHATokenToKVPool(
            size=64, page_size=1, dtype=torch.bfloat16, head_num=1, head_dim=HEAD_DIM, layer_num=LAYERS,
            device=DEVICE, enable_memory_saver=False,
        )  # fmt: skip
        self.r2t = ReqToTokenPool(size=4, max_context_len=32, device=DEVICE, enable_memory_saver=False)
        self.backend = TorchNativeAttnBackend(
            _ModelRunnerFacts(device=DEVICE, req_to_token_pool=self.r2t, token_to_kv_pool=self.kv)
        )
        set_forward_context(ForwardContext(attn_backend=self.backend))
        self.rec: dict[str, list] = {}
        for i, layer in enumerate(self.model.layers):
            layer.register_forward_pre_hook(self._layer_in(i), with_kwargs=True)
            layer.register_forward_hook(self._keep(f"out{i}"))
            layer.self_attn.register_forward_hook(self._keep(f"attn{i}"))
            layer.input_layernorm.register_forward_pre_hook(self._mark(f"own_norm{i}"))
            if layer.moe is not None:
                layer.moe.topk.register_forward_hook(self._keep_topk(f"topk{i}"))
                layer.moe.topk.register_forward_pre_hook(self._keep_logits(f"logits{i}"))

    def _keep(self, key: str):
        def hook(_m, _a, out) -> None:
            self.rec[key] = out.detach().clone()

        return hook

    def _mark(self, key: str):
        def hook(_m, _a) -> None:
            import torch

            self.rec[key] = torch.tensor(True)  # a tensor like every record (the tests compare them all)

        return hook

    def _keep_topk(self, key: str):
        def hook(_m, _a, out) -> None:
            self.rec[key] = (out.topk_weights.detach().clone(), out.topk_ids.detach().clone())

        return hook

    def _keep_logits(self, key: str):
        def hook(_m, args) -> None:
            self.rec[key] = args[1].detach().clone()  # TopK(hidden_states, router_logits)

        return hook

    def _layer_in(self, i: int):
        def hook(layer, _args, kwargs) -> None:
            x = kwargs["hidden_states"]
            self.rec[f"in{i}"] = x.detach().clone()
            stash = layer.__dict__.get("_kvtrap_pre_normed")  # what the previous layer's end left
            if stash is not None and stash[0] is x:
                self.rec[f"stash{i}"] = stash[1].detach().clone()

        return hook

    def batches(self):
        import torch
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

        g = torch.Generator().manual_seed(7)
        lens = [5, 3]
        ids = torch.randint(0, 64, (sum(lens),), generator=g)
        self.r2t.req_to_token[0, :6] = torch.arange(1, 7)
        self.r2t.req_to_token[1, :4] = torch.arange(7, 11)
        prefill = ForwardBatch(
            forward_mode=ForwardMode.EXTEND, batch_size=2, input_ids=ids, req_pool_indices=torch.arange(2),
            seq_lens=torch.tensor(lens), out_cache_loc=torch.tensor([1, 2, 3, 4, 5, 7, 8, 9]),
            seq_lens_sum=sum(lens), extend_prefix_lens=torch.tensor([0, 0]), extend_seq_lens=torch.tensor(lens),
            positions=torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]),
        )  # fmt: skip
        decode = ForwardBatch(
            forward_mode=ForwardMode.DECODE, batch_size=2, input_ids=torch.randint(0, 64, (2,), generator=g),
            req_pool_indices=torch.arange(2), seq_lens=torch.tensor([6, 4]), out_cache_loc=torch.tensor([6, 10]),
            seq_lens_sum=10, positions=torch.tensor([5, 3]),
        )  # fmt: skip
        for fb in (prefill, decode):
            for name, value in vars(fb).items():
                if isinstance(value, torch.Tensor):
                    setattr(fb, name, value.to(DEVICE))
        return [("prefill", prefill), ("decode", decode)]

    def run(self, steps: tuple[str, ...] = ("prefill", "decode")) -> dict:
        """The steps (prefill, then decode); per step the records of every hook plus the model output
        ``out`` (and ``aux``: the aux hidden states, when the model captures any)."""
        import torch
        from sglang.srt.model_executor.runner_utils.forward_batch import set_forward_batch

        for buf in (*self.kv.k_buffer, *self.kv.v_buffer):
            buf.zero_()  # same cache contents every run
        result: dict = {}
        with torch.no_grad():
            for step, fb in self.batches():
                if step not in steps:
                    continue
                self.backend.init_forward_metadata(fb)
                self.rec = {}
                with set_forward_batch(fb):
                    out = self.model(fb.input_ids, fb.positions, fb)
                if isinstance(out, tuple):  # (hidden states, aux hidden states) when layers_to_capture is set
                    out, aux = out
                    self.rec["aux"] = [a.clone() for a in aux]
                self.rec["out"] = out.clone()
                result[step] = self.rec
        return result

    @contextmanager
    def holding(self, hold: dict[int, tuple[str, ...] | None]):
        """Hold fusions off per layer for the runs inside (``None``: all of the layer's fusions, its attention
        and its routing too); the plans are put back afterwards."""
        from kvtrap.kernels import sglang_gemma4 as sg

        saved = []
        for i, names in hold.items():
            layer = self.model.layers[i]
            plan, attn_plan = layer.__dict__[sg._PLAN], layer.self_attn.__dict__[sg._ATTN_PLAN]
            routing = layer.moe.topk.topk_config if layer.moe is not None else None
            saved.append((plan, dict(plan.fusions), attn_plan, attn_plan.status, routing,
                          routing.custom_routing_function if routing else None))  # fmt: skip
            plan.fusions.update(dict.fromkeys(plan.fusions if names is None else names, "held off by the test"))
            if names is None:
                attn_plan.status = "held off by the test"
                if routing is not None:
                    routing.custom_routing_function = routing.custom_routing_function.original
        try:
            yield
        finally:
            for plan, fusions, attn_plan, status, routing, fn in saved:
                plan.fusions, attn_plan.status = fusions, status
                if routing is not None:
                    routing.custom_routing_function = fn

    @contextmanager
    def hooked(self, i: int, pre=None, post=None):
        """Extra forward hooks on layer ``i`` (after the recording ones) for the runs inside."""
        layer = self.model.layers[i]
        handles = [layer.register_forward_pre_hook(pre, with_kwargs=True)] if pre else []
        handles += [layer.register_forward_hook(post)] if post else []
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def next_norm(self, i: int, stream):
        """SGLang's own norm that follows layer ``i`` (the next input norm, or ``model.norm``) on ``stream``."""
        import torch

        norm = self.model.layers[i + 1].input_layernorm if i + 1 < LAYERS else self.model.norm
        with torch.no_grad():
            return norm(stream)

    def solo(self, *keep: int, steps: tuple[str, ...] = ("prefill", "decode")) -> dict:
        """A run where only the layers ``keep`` use the fused kernels (the others run SGLang's code);
        ``next_norm_ref``: SGLang's norm after the last of them, on its output."""
        with self.holding(dict.fromkeys((i for i in range(LAYERS) if i not in keep), None)):
            result = self.run(steps)
        for rec in result.values():
            rec["next_norm_ref"] = self.next_norm(keep[-1], rec[f"out{keep[-1]}"])
        return result


class _ModelRunnerFacts:
    """The three facts ``TorchNativeAttnBackend.__init__`` reads from a model runner."""

    def __init__(self, **facts) -> None:
        self.__dict__.update(facts)


def _count_kernel_calls() -> dict[str, int]:
    """Count calls of each kernel entry point (the custom ops look them up in ``custom_ops`` at call time)."""
    import kvtrap.kernels.custom_ops as co

    counts = dict.fromkeys(KERNELS, 0)
    for name in KERNELS:
        fn = getattr(co, name)

        def counted(*a, _fn=fn, _name=name, **kw):
            counts[_name] += 1
            return _fn(*a, **kw)

        setattr(co, name, counted)
    return counts


def _calls(counts: dict[str, int], run):
    before = dict(counts)
    result = run()
    return result, {k: counts[k] - before[k] for k in counts}


def handoff_runs(counts: dict[str, int], variant: str) -> dict:
    """The cross-layer hand-off when layer 2 of ``variant`` (layers 1 and 2 fused) is entered with a copy of
    the stream layer 1 wrote, re-written as the stream (what an adapter that re-imports the stream across an
    eager break does: same values, another tensor). The normed tensor layer 1 left is poisoned (NaN), so using
    it would show. ``copy``: the stash must be ignored and cleared, and the layer must apply its own input norm
    (SGLang's ``input_layernorm``), exactly as in ``dropped`` (the same copy, the stash removed by the test);
    ``poisoned``: the control, the poisoned stash on the very tensor it was made from (it is used)."""
    import torch
    from kvtrap.kernels import sglang_gemma4 as sg
    from sglang.srt.layers.layer_boundary.residual import batch as residual_batch

    runner = Runner(variant)
    sg.plan_model(runner.model)  # what its first forward would do; only layers 1 and 2 need fusing here
    out: dict = {}
    for kind in ("copy", "dropped", "poisoned"):
        seen: dict = {}

        def pre(layer, args, kwargs, kind=kind, seen=seen):
            stash = layer.__dict__.get(sg._STASH)
            seen["stash_in"] = stash is not None and stash[0] is kwargs["hidden_states"]
            if stash is not None:
                object.__setattr__(layer, sg._STASH, (stash[0], torch.full_like(stash[1], float("nan"))))
            if kind == "poisoned":
                return None
            x = kwargs["hidden_states"].clone()
            residual_batch.set_written(x, kwargs["forward_batch"])
            if kind == "dropped":
                object.__setattr__(layer, sg._STASH, None)
            return args, {**kwargs, "hidden_states": x}

        def post(layer, _a, _o, seen=seen):
            seen["stash_left"] = layer.__dict__.get(sg._STASH) is not None

        with runner.holding({0: None, 3: None}), runner.hooked(2, pre, post):
            res, calls = _calls(counts, lambda: runner.run(("prefill",)))
        out[kind] = {**res["prefill"], "seen": seen, "calls": calls}
    return out


def router_fold_runs(counts: dict[str, int]) -> dict:
    """Fresh MoE models whose router scale is not sqrt(hidden) (so the folded router norm weight is not all
    ones), run with the switch on before any run with it off: SGLang folds the scale in
    ``Gemma4Router.forward``, which the fused layer never calls. ``lazy``: as built; ``prefolded``: the same
    weights with ``fuse_scale()`` called by the test first; ``unfolded``: the control, marked folded with the
    weight left at ones (what the fused layer would use if it did not fold). Layer 0 fused, the others
    held off (SGLang's path: interpreter time)."""
    import torch
    from kvtrap.kernels import sglang_gemma4 as sg

    out: dict = {}
    for kind in ("lazy", "prefolded", "unfolded"):
        runner = Runner("moe")
        g = torch.Generator().manual_seed(11)
        routers = [layer.router for layer in runner.model.layers]
        with torch.no_grad():
            for router in routers:
                router.scale.copy_(HIDDEN**0.5 * (0.5 + torch.rand(HIDDEN, generator=g)))
                assert not router._scale_fused
                if kind == "prefolded":
                    router.fuse_scale()
                elif kind == "unfolded":
                    router._scale_fused = True
        sg.plan_model(runner.model)  # what the first forward does (it does not fold)
        with runner.holding({1: None, 2: None, 3: None}):
            res, calls = _calls(counts, lambda runner=runner: runner.run(("prefill",)))
        folded = [
            r._scale_fused and torch.equal(r.norm.weight, (r.scale * r.root_size).to(r.norm.weight.dtype))
            for r in routers
        ]  # fmt: skip
        out[kind] = {**res["prefill"], "calls": calls, "folded": folded}
    return out


def capture_runs(counts: dict[str, int]) -> dict:
    """Dense model, all layers fused, layer 2 capturing aux hidden states (an EAGLE3/DFLASH capture layer:
    ``layers_to_capture`` holds 2) against the same model with layer 2's layer override held off by the test:
    the capture layer must take SGLang's path, so the two runs agree bit for bit."""
    from kvtrap.kernels import sglang_gemma4 as sg

    runner = Runner("dense")
    sg.plan_model(runner.model)  # what its first forward would do; the plan is then held off on layer 2
    out: dict = {}
    with runner.holding({0: None, 3: None}):  # layers 1 and 2 are the ones that matter
        with runner.holding({2: ("cross_layer",)}):
            out["held"] = runner.run(("prefill",))["prefill"]
        runner.model.layers_to_capture = [2]
        try:
            res, calls = _calls(counts, lambda: runner.run(("prefill",)))
        finally:
            runner.model.layers_to_capture = []
    out["capture"] = {**res["prefill"], "calls": calls}
    return out


def ple_input_runs(counts: dict[str, int]) -> dict:
    """E4B-like model, layers 1 and 2 fused, layer 2 called without its per-layer input (a pre-hook passes
    ``per_layer_input=None``; SGLang's layer then skips the PLE part): the layer override must fall back to
    SGLang's layer (bit-identical to the same run with layer 2's override and PLE tail held off by the test),
    dropping the normed input layer 1 left for it."""
    from kvtrap.kernels import sglang_gemma4 as sg

    runner = Runner("e4b")
    sg.plan_model(runner.model)
    seen: dict = {}

    def pre(layer, args, kwargs):
        stash = layer.__dict__.get(sg._STASH)
        seen["stash_in"] = stash is not None and stash[0] is kwargs["hidden_states"]
        return args, {**kwargs, "per_layer_input": None}

    def post(layer, _a, _o):
        seen["stash_left"] = layer.__dict__.get(sg._STASH) is not None

    out: dict = {}
    with runner.holding({0: None, 3: None}), runner.hooked(2, pre, post):
        with runner.holding({2: ("cross_layer", "pair_norm", "ple_tail")}):
            out["held"] = runner.run(("prefill",))["prefill"]
        res, calls = _calls(counts, lambda: runner.run(("prefill",)))
    out["none"] = {**res["prefill"], "calls": calls, "seen": dict(seen)}
    return out


def deterministic_runs(counts: dict[str, int], records: list[str]) -> dict:
    """SGLang's deterministic inference: the MoE model switched on with the batch-invariant flag set (the flag
    ``enable_batch_invariant_mode()`` sets in SGLang's model runner; the aten overrides it also registers are
    CUDA kernels with no bearing on the plan), off and on, bit-identical and no kernel launched; then plans
    only, under SGLang's own scoped override of the server flags: ``--enable-deterministic-inference`` and
    ``--rl-on-policy-target fsdp`` (the E4B-like model, for the PLE tail's reason too)."""
    import sglang.srt.batch_invariant_ops.batch_invariant_ops as bio
    from kvtrap.kernels import sglang_gemma4 as sg
    from sglang.srt.runtime_context import get_exec

    out: dict = {}
    runner = Runner("moe")
    sg.disable()
    bio._batch_invariant_MODE = True
    try:
        out["off"] = runner.run(("prefill",))["prefill"]
        sg.enable()
        res, out["calls"] = _calls(counts, lambda: runner.run(("prefill",)))
        out["on"] = res["prefill"]
    finally:
        bio._batch_invariant_MODE = False
    out["plan"] = [lp.fusions for lp in runner.model.__dict__[sg._PLAN].layers]
    out["log"] = list(records)
    records.clear()
    for name, flags in (
        ("flag", dict(enable_deterministic_inference=True)),
        ("rl", dict(enable_deterministic_inference=True, rl_on_policy_target="fsdp")),
    ):
        with get_exec().deterministic.override(**flags):
            out[f"plan_{name}"] = [lp.fusions for lp in sg.plan_model(Runner("e4b").model).layers]
    out["plan_none"] = [lp.fusions for lp in sg.plan_model(Runner("e4b").model).layers]
    records.clear()
    return out


def main(out_path: str, variants: list[str]) -> None:
    os.environ["SGLANG_ROPE_CACHE_FP32"] = "1"
    if DEVICE == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    from sglang.test.layer_ut_utils import init_single_process_dist

    init_single_process_dist(master_port=int(os.environ.get("KVTRAP_TEST_PORT", "29731")))
    import sglang.srt.layers.rotary_embedding.base as rope_base

    if DEVICE == "cpu":
        rope_base._is_cpu = True  # see the module docstring
    from kvtrap.kernels import sglang_gemma4

    # The switch through SGLang's plugin loader, as in every SGLang process (the caller sets
    # KVTRAP_GEMMA4_KERNELS=1 and leaves SGLANG_TRTLLM_MHA_DEBUG unset): patched on import, trap not armed.
    from sglang.srt.plugins import load_plugins

    from kvtrap.capture.patching import ORIGINAL_ATTR
    from kvtrap.capture.session import current

    lazy = sglang_gemma4.MODEL_MODULE not in sys.modules
    load_plugins()
    from sglang.srt.models import gemma4_causal as g4

    wrapped = lambda: {  # noqa: E731
        f"{t.cls}.{t.attr}": hasattr(getattr(g4, t.cls).__dict__[t.attr], ORIGINAL_ATTR)
        for t in sglang_gemma4.targets() if t.module == sglang_gemma4.MODEL_MODULE
    }  # fmt: skip
    plugin = {"lazy": lazy, "wrapped": wrapped(), "trap_armed": current() is not None}
    sglang_gemma4.disable()
    plugin["after_disable"] = wrapped()

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.levelname} {record.getMessage()}")

    logging.getLogger("kvtrap").addHandler(Keep())
    counts = _count_kernel_calls()
    results: dict = {}
    for variant in variants:
        runner = Runner(variant)
        res = {"off": runner.run()}
        sglang_gemma4.enable()
        before = dict(counts)
        res["on"] = runner.run()
        res["calls"] = {k: counts[k] - before[k] for k in counts}
        res["on2"] = runner.run()
        res["solo"] = [runner.solo(i) for i in range(LAYERS)]
        if variant in ("moe", "e4b"):  # layers i-1 and i fused: layer i takes the normed input i-1 left (prefill)
            res["pair"] = [None, *(runner.solo(i - 1, i, steps=("prefill",)) for i in range(1, LAYERS))]
        sglang_gemma4.disable()
        res["off_again"] = runner.run()
        res["per_expert_scale"] = [
            layer.moe.per_expert_scale.detach().clone() if layer.moe is not None else None for layer in runner.model.layers
        ]
        res["plan"] = [lp.fusions for lp in runner.model.__dict__["_kvtrap_gemma4_plan"].layers]
        res["log"] = list(records)
        records.clear()
        results[variant] = res
    sglang_gemma4.enable()
    try:
        results["handoff"] = {v: handoff_runs(counts, v) for v in ("dense", "e4b")}
        results["router_fold"] = router_fold_runs(counts)
        results["capture"] = capture_runs(counts)
        results["ple_input"] = ple_input_runs(counts)
        records.clear()
        results["deterministic"] = deterministic_runs(counts, records)
    finally:
        sglang_gemma4.disable()
    # Nothing qualifies: planned while compiled Triton is the only option on this CPU host, so every layer
    # must take SGLang's path (bit-identical) and the WARNING must say why.
    if DEVICE != "cpu":
        results["plugin"] = plugin
        torch.save(results, out_path)
        return
    runner = Runner("moe")
    fallback = {"off": runner.run()}
    sglang_gemma4.enable()
    os.environ["TRITON_INTERPRET"] = "0"  # read by the plan only; the kernels were decorated already
    try:
        before = dict(counts)
        fallback["on"] = runner.run()
        fallback["calls"] = {k: counts[k] - before[k] for k in counts}
    finally:
        os.environ["TRITON_INTERPRET"] = "1"
        sglang_gemma4.disable()
    fallback["plan"] = [lp.fusions for lp in runner.model.__dict__["_kvtrap_gemma4_plan"].layers]
    fallback["log"] = list(records)
    results["fallback"] = fallback
    results["plugin"] = plugin
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(VARIANTS))
