"""Weight-free models for the server repros: configs + a tokenizer, no weights, no hub.

``kvtrap repro NAME --dummy-weights`` (or ``kvtrap repro models write DIR``) writes a target model dir (and, for
the Gemma 4 variants, its frozen-KV MTP "assistant" draft dir), each with a ``config.json``, a
``generation_config.json`` and a word-level tokenizer, and the server starts with ``--load-format dummy`` (SGLang
initialises the weights itself). Any GPU that runs SGLang can then run kvtrap's server scenarios without
downloading anything.

Two families: Gemma 4 (:class:`DummyModel`, the #26957 workload) and GPT-OSS (:class:`GptOssModel`), the one
hybrid sliding-window architecture SGLang 0.5.23 both serves on fa3 and gives the hybrid SWA pool (it refuses
Gemma 4 on fa3), so that kvtrap's fa3 traps can run in a real server; see :class:`GptOssModel` for why.

The Gemma 4 shapes follow the public checkpoints' config.json values (the ``VARIANTS`` table below; the MoE and
31B MLP widths are approximate, which only changes GEMM sizes) except where a weight-free text-only model on
SGLang 0.5.23 cannot follow them;
every such deviation is listed in :attr:`DummyModel.deviations` and recorded in the run's report:

* head_dim 256 on every layer (the real full-attention layers use 512): FlashInfer's XQA decode kernel,
  which trtllm_mha runs on sm_90, refuses head_dim 512 with speculative decoding, and fmha_v2 has no sm_90
  prefill kernel for it; a text-only ``gemma4_text`` config also carries one head_dim for all layers in
  SGLang 0.5.23 (it flattens per-layer head dims only for the multimodal ``gemma4`` model type).
* fewer layers on request (``layers=``): CUDA-graph capture time grows with the layer count; the
  sliding/full pattern (5:1, last layer full) and the KV-shared tail keep their proportions.
* ``rms_norm_eps`` 1e-30 (real: 1e-6): see :data:`NORM_EPS_WHY`. Without it the dummy-weight forward pass
  shrinks the residual stream about 1000x per layer to zero (or denormals), and the model's logits are all 0.

The tokenizer maps id ``i >= 4`` to the word ``t<i>`` and back, so random token ids (``sglang.bench_serving
--dataset-name random-ids``) survive decode -> encode exactly and generated ids can be read back from text.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

#: Special tokens of the dummy tokenizer (ids 0..3); every other id i is the word f"t{i}".
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2

#: Why every dummy model has head_dim 256 on every layer (recorded in each run's report).
HEAD_DIM_WHY = (
    "head_dim 256 on every layer (real full-attention layers: 512): trtllm_mha on sm_90 runs FlashInfer XQA "
    "decode, which has no head_dim 512 with speculative decoding, and fmha_v2 has no sm_90 prefill kernel for "
    "512; a text-only gemma4_text config also carries one head_dim in SGLang 0.5.23"
)

#: The Gemma 4 dummy models' RMSNorm epsilon (the real checkpoints' is 1e-6); NORM_EPS_WHY says why.
DUMMY_RMS_NORM_EPS = 1e-30

#: Why the Gemma 4 dummy models use a tiny RMSNorm epsilon (recorded in each run's report).
NORM_EPS_WHY = (
    f"rms_norm_eps {DUMMY_RMS_NORM_EPS:g} (real: 1e-6): --load-format dummy fills every parameter and persistent "
    "buffer with U(-1e-3, 1e-3), the per-layer `layer_scalar` buffer included (SGLang 0.5.23 gemma4_causal.py "
    "multiplies each layer's output by it; the real checkpoints carry its value), and the norm weights too "
    "(Gemma 4 norms scale by w, not 1+w), so each layer shrinks the residual stream about 1000x; with eps 1e-6 "
    "the next layer's norms cannot undo that (mean(x^2) << eps), and by layer 12 the stream is about 1e-36 "
    "(bf16/fp32 denormal range): all logits 0, greedy token id 0, routing on a vanishing stream. A tiny eps "
    "makes every norm renormalise, so activations stay around 1e-6..1e-3 and logits around 1e-4 in every layer "
    "(same kernels, shapes and routing code; only the numbers are healthy)"
)


@dataclass(frozen=True)
class MoE:
    experts: int
    top_k: int
    intermediate: int


class _WeightFree:
    """What every weight-free model shares: its report record (its fields, its layer pattern, its architecture)."""

    architecture: ClassVar[str]

    def layer_types(self) -> list[str]:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)  # type: ignore[call-overload]  # every subclass is a dataclass
        out["layer_types"] = self.layer_types()
        out["architecture"] = self.architecture
        return out


@dataclass(frozen=True)
class DummyModel(_WeightFree):
    """One weight-free Gemma 4 variant: the target's shapes and its assistant draft's."""

    has_draft: ClassVar[bool] = True  # the frozen-KV MTP assistant
    server_args: ClassVar[tuple[str, ...]] = ()  # server flags the weight-free model needs (none)
    architecture: ClassVar[str] = "Gemma4ForCausalLM"

    name: str
    like: str  # the public checkpoint whose shapes it follows
    layers: int
    hidden: int
    intermediate: int
    q_heads: int
    kv_heads_sliding: int
    kv_heads_full: int
    sliding_window: int
    kv_shared_layers: int = 0
    ple_dim: int = 0  # per-layer embeddings (E2B/E4B)
    moe: MoE | None = None
    head_dim: int = 256
    vocab: int = 262144
    full_every: int = 6  # 5 sliding layers, then 1 full
    draft_layers: int = 4
    draft_hidden: int = 1024
    rms_norm_eps: float = DUMMY_RMS_NORM_EPS
    deviations: tuple[str, ...] = field(default=(HEAD_DIM_WHY, NORM_EPS_WHY))

    def with_layers(self, layers: int | None) -> DummyModel:
        """The same model with ``layers`` decoder layers (KV-shared tail scaled to the same fraction)."""
        if layers is None or layers == self.layers:
            return self
        if layers < self.full_every:
            raise ValueError(f"{self.name}: at least {self.full_every} layers (one sliding/full group), got {layers}")
        shared = round(self.kv_shared_layers * layers / self.layers)
        # KV-shared layers read the KV of the last non-shared layer of their type: keep one of each type.
        shared = min(shared, layers - self.full_every)
        why = f"{layers} layers instead of {self.layers} (shorter CUDA-graph capture; same 5:1 pattern"
        why += f", {shared} KV-shared)" if self.kv_shared_layers else ")"
        return replace(self, layers=layers, kv_shared_layers=shared, deviations=self.deviations + (why,))

    def layer_types(self) -> list[str]:
        types = ["full_attention" if (i + 1) % self.full_every == 0 else "sliding_attention"
                 for i in range(self.layers)]  # fmt: skip
        types[-1] = "full_attention"
        return types

    def text_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "model_type": "gemma4_text",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.q_heads,
            # Full-attention layers read num_key_value_heads, sliding layers the swa_* fields.
            "num_key_value_heads": self.kv_heads_full,
            "swa_num_key_value_heads": self.kv_heads_sliding,
            "head_dim": self.head_dim,
            "global_head_dim": self.head_dim,
            "swa_head_dim": self.head_dim,
            "swa_v_head_dim": self.head_dim,
            # An empty per-layer override keeps transformers from building per-layer head dims (see HEAD_DIM_WHY).
            "per_layer_config": {},
            "sliding_window": self.sliding_window,
            "layer_types": self.layer_types(),
            "num_kv_shared_layers": self.kv_shared_layers,
            "hidden_size_per_layer_input": self.ple_dim,
            "vocab_size_per_layer_input": self.vocab if self.ple_dim else 0,
            "max_position_embeddings": 131072,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1000000.0},
            },  # fmt: skip
            "hidden_activation": "gelu_pytorch_tanh",
            "final_logit_softcapping": 30.0,
            # Every Gemma 4 norm reads this, the draft's too (NORM_EPS_WHY: why not the real 1e-6).
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": True,
            "pad_token_id": PAD_ID,
            "eos_token_id": EOS_ID,
            "bos_token_id": BOS_ID,
            "dtype": "bfloat16",
        }
        if self.moe is not None:
            cfg.update(enable_moe_block=True, num_experts=self.moe.experts, top_k_experts=self.moe.top_k,
                       moe_intermediate_size=self.moe.intermediate)  # fmt: skip
        return cfg

    def target_config(self) -> dict[str, Any]:
        return {**self.text_config(), "architectures": ["Gemma4ForCausalLM"]}

    def draft_config(self) -> dict[str, Any]:
        """The frozen-KV MTP assistant: every layer reads the target's KV (all KV-shared), so its attention
        heads and head_dim are the target's."""
        n = self.draft_layers
        text = {
            **self.text_config(),
            "hidden_size": self.draft_hidden,
            "intermediate_size": 4 * self.draft_hidden,
            "num_hidden_layers": n,
            "layer_types": ["sliding_attention"] * (n - 1) + ["full_attention"],
            "num_kv_shared_layers": n,
            "hidden_size_per_layer_input": 0,
            "vocab_size_per_layer_input": 0,
            # The assistant's attention split in the form SGLang 0.5.23 reads for a nested text_config: its config
            # loader (_apply_gemma4_attention_overrides) rebuilds swa_* from the sliding layers'
            # num_key_value_heads and the full layers' per_layer_config override, and drops swa_* fields given
            # directly. With them alone the draft's sliding layers got the full layers' KV heads and failed on
            # the target's SWA pool (26B-A4B-like: 2 heads viewing an 8-head SWA cache).
            "num_key_value_heads": self.kv_heads_sliding,
            "per_layer_config": {
                str(i): {"num_key_value_heads": self.kv_heads_full, "head_dim": self.head_dim}
                for i in range(n - 1, n)
            },
        }
        for key in ("swa_num_key_value_heads", "swa_head_dim", "swa_v_head_dim"):
            text.pop(key)
        for key in ("enable_moe_block", "num_experts", "top_k_experts", "moe_intermediate_size"):
            text.pop(key, None)  # the assistants are dense
        return {
            "architectures": ["Gemma4AssistantForCausalLM"],
            "model_type": "gemma4_assistant",
            "dtype": "bfloat16",
            "text_config": text,
            "backbone_hidden_size": self.hidden,
            "use_ordered_embeddings": False,
            "num_centroids": 2048,
            "centroid_intermediate_top_k": 32,
            "tie_word_embeddings": True,
        }

    def summary(self) -> str:
        moe = f", MoE {self.moe.experts} experts top-{self.moe.top_k}" if self.moe else ""
        ple = f", PLE {self.ple_dim}" if self.ple_dim else ""
        return (f"like {self.like}: {self.layers} layers ({self.kv_shared_layers} KV-shared), hidden {self.hidden}, "
                f"{self.q_heads} q heads, kv {self.kv_heads_sliding} sliding / {self.kv_heads_full} full, head_dim "
                f"{self.head_dim}, window {self.sliding_window}{moe}{ple}")  # fmt: skip


#: Why the GPT-OSS-like model is bf16 (recorded in each run's report).
GPTOSS_BF16_WHY = (
    "bf16 experts, no quantization_config (the real checkpoint's experts are MXFP4): SGLang 0.5.23 then runs "
    "the unquantized MoE, the path --load-format dummy initialises without MXFP4 scales, with "
    "--moe-runner-backend triton (GPTOSS_MOE_WHY); attention, the KV pool and the allocator are the same"
)

#: The flags a weight-free GPT-OSS server gets, and why (recorded in each run's report).
GPTOSS_SERVER_ARGS = ("--moe-runner-backend", "triton")
GPTOSS_MOE_WHY = (
    "--moe-runner-backend triton: for an unquantized GPT-OSS SGLang 0.5.23 picks the triton_kernel MoE runner "
    "whenever a triton_kernels package is importable (model_overrides/gpt_oss.py), and its top-k then calls "
    "`routing`, which layers/moe/topk.py defines only if `triton_kernels.tensor` / `triton_kernels.topk` import; "
    "with a triton_kernels that does not match the installed Triton (seen with Triton 3.6 on an H200) every "
    "start-up dies in the first forward with NameError: name 'routing' is not defined. The triton runner is "
    "SGLang's plain fused-MoE path and needs nothing extra"
)


@dataclass(frozen=True)
class GptOssModel(_WeightFree):
    """A weight-free GPT-OSS-like model (``GptOssForCausalLM``): sliding-window (128) and full attention layers
    alternating, learned attention sinks, a top-k MoE in every layer, no draft.

    Why this architecture: it is the one in SGLang 0.5.23 that both gets the hybrid SWA memory pool and is
    served on fa3, with a plain config.json and nothing else (read from 0.5.23's source):

    * ``GptOssForCausalLM`` is in ``SWA_SINK_ARCHS`` (configs/model_config.py), so ``is_hybrid_swa_model`` is
      true and ``get_hybrid_layer_ids`` splits the layers by ``layer_types``; no override sets
      ``disable_hybrid_swa_memory`` for it (only Gemma 2/3, Exaone, Olmo 2 and Step3p ones do), so the KV cache
      configurator builds ``SWAKVPool`` and ``SWATokenToKVPoolAllocator`` (mem_cache/kv_cache_configurator.py).
    * model_hook.py accepts it on triton, trtllm_mha, fa3, fa4 (not flashinfer), and its override
      (arg_groups/model_overrides/gpt_oss.py, ``_gpt_oss_overrides``) picks fa3 on sm90 and trtllm_mha on sm100
      when no backend is given.
    * The others, as 0.5.23 has them: Gemma 4 is refused on fa3 (model_hook.py); Exaone 4 accepts fa3 but its
      override turns hybrid SWA memory off (model_overrides/exaone.py); Llama 4's hybrid layers are chunked
      attention in a multimodal ``...ForConditionalGeneration``; Step 3.5 gets fa3 and the SWA pool too, but its
      config class is SGLang's own (configs/step3p5.py, not in transformers) and its checkpoints carry MTP
      layers. GPT-OSS has transformers' ``GptOssConfig`` and fa3 is what SGLang picks for it on Hopper.

    Shapes follow openai/gpt-oss-20b's config.json (hidden 2880, 64 q / 8 kv heads of 64, window 128, YaRN RoPE,
    SwiGLU limit 7, attention biases, vocab 201088) except what :attr:`deviations` lists: fewer layers and experts
    (start-up time and memory; the pattern and top-4 stay), bf16 experts.
    """

    has_draft: ClassVar[bool] = False
    architecture: ClassVar[str] = "GptOssForCausalLM"
    #: Server flags the weight-free model needs (GPTOSS_MOE_WHY); a user's own flag of the same name wins.
    server_args: ClassVar[tuple[str, ...]] = GPTOSS_SERVER_ARGS

    name: str
    like: str
    layers: int
    real_layers: int
    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    sliding_window: int
    experts: int
    real_experts: int
    top_k: int
    head_dim: int = 64
    vocab: int = 201088
    deviations: tuple[str, ...] = ()

    def _layers_why(self, layers: int) -> str:
        return (f"{layers} layers instead of {self.real_layers} (shorter start-up and CUDA-graph capture; same "
                f"alternating sliding/full pattern)")  # fmt: skip

    def with_layers(self, layers: int | None) -> GptOssModel:
        """The same model with ``layers`` decoder layers (the alternating pattern kept)."""
        if layers is None or layers == self.layers:
            return self
        if layers < 2:
            raise ValueError(f"{self.name}: at least 2 layers (one sliding/full pair), got {layers}")
        old = self._layers_why(self.layers)
        kept = tuple(d for d in self.deviations if d != old)
        new = () if layers == self.real_layers else (self._layers_why(layers),)
        return replace(self, layers=layers, deviations=kept + new)

    def layer_types(self) -> list[str]:
        # openai/gpt-oss-*: even layers slide, odd layers attend to everything (transformers' GptOssConfig default)
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.layers)]

    def target_config(self) -> dict[str, Any]:
        return {
            "architectures": [self.architecture],
            "model_type": "gpt_oss",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.q_heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.experts,
            "num_experts_per_tok": self.top_k,
            "experts_per_token": self.top_k,
            # SGLang's model uses sliding_window - 1 (HF's window includes the current token)
            "sliding_window": self.sliding_window,
            "layer_types": self.layer_types(),
            "swiglu_limit": 7.0,
            "hidden_act": "silu",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 131072,
            "initial_context_length": 4096,
            "rope_theta": 150000.0,
            "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": False, "original_max_position_embeddings": 4096},
            "router_aux_loss_coef": 0.9,
            "output_router_logits": False,
            "use_cache": True,
            "tie_word_embeddings": False,
            "pad_token_id": PAD_ID,
            "eos_token_id": EOS_ID,
            "bos_token_id": BOS_ID,
            "dtype": "bfloat16",
        }  # fmt: skip

    def summary(self) -> str:
        return (f"like {self.like}: {self.layers} layers (sliding window {self.sliding_window} / full, alternating), "
                f"hidden {self.hidden}, {self.q_heads} q heads, {self.kv_heads} kv heads, head_dim {self.head_dim}, "
                f"MoE {self.experts} experts top-{self.top_k}, attention sinks, no draft")  # fmt: skip


AnyDummyModel = DummyModel | GptOssModel

_GPTOSS_LAYERS = 8
_GPTOSS_EXPERTS = 8

#: Shapes of the public checkpoints (HF config.json values: layers, hidden, heads, windows, KV sharing, PLE,
#: experts; kernels/README.md lists them too), as far as a weight-free text-only model on SGLang 0.5.23 can
#: follow them.
VARIANTS: dict[str, AnyDummyModel] = {
    m.name: m
    for m in (
        DummyModel(name="e4b", like="google/gemma-4-E4B-it", layers=42, hidden=2560, intermediate=10240,
                   q_heads=8, kv_heads_sliding=2, kv_heads_full=2, sliding_window=512, kv_shared_layers=18,
                   ple_dim=256),
        DummyModel(name="26b-a4b", like="google/gemma-4-26B-A4B-it", layers=30, hidden=2816, intermediate=2112,
                   q_heads=16, kv_heads_sliding=8, kv_heads_full=2, sliding_window=1024,
                   moe=MoE(experts=128, top_k=8, intermediate=704)),
        DummyModel(name="31b", like="google/gemma-4-31B-it", layers=60, hidden=5376, intermediate=21504,
                   q_heads=32, kv_heads_sliding=16, kv_heads_full=4, sliding_window=1024),
        GptOssModel(name="gptoss", like="openai/gpt-oss-20b", layers=_GPTOSS_LAYERS, real_layers=24, hidden=2880,
                    intermediate=2880, q_heads=64, kv_heads=8, sliding_window=128, experts=_GPTOSS_EXPERTS,
                    real_experts=32, top_k=4,
                    deviations=(f"{_GPTOSS_LAYERS} layers instead of 24 (shorter start-up and CUDA-graph capture; "
                                f"same alternating sliding/full pattern)",
                                f"{_GPTOSS_EXPERTS} experts instead of 32, top-4 as the real model (expert weights "
                                f"are most of its memory; routing and the MoE kernels are the same)",
                                GPTOSS_BF16_WHY, GPTOSS_MOE_WHY)),
    )
}  # fmt: skip


def variant(name: str, layers: int | None = None) -> AnyDummyModel:
    try:
        base = VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown dummy model {name!r}; known: {', '.join(VARIANTS)}") from None
    return base.with_layers(layers)


@dataclass(frozen=True)
class ModelDirs:
    target: Path
    draft: Path | None  # None: the model has no draft (GPT-OSS-like)
    model: AnyDummyModel

    def to_json(self) -> dict[str, Any]:
        return {"target": str(self.target), "draft": None if self.draft is None else str(self.draft),
                "model": self.model.to_json()}  # fmt: skip


def write_tokenizer(directory: Path, vocab: int) -> None:
    """A word-level tokenizer over ``t4 .. t<vocab-1>`` plus the four specials; ids round-trip through text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    words = {tok: i for i, tok in enumerate(SPECIALS)}
    words.update({f"t{i}": i for i in range(len(SPECIALS), vocab)})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordPiece's decoder joins words with one space (no "##" continuation pieces exist here).
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.save(str(directory / "tokenizer.json"))
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "<eos>",
        "bos_token": "<bos>", "unk_token": "<unk>", "model_max_length": 131072, "add_bos_token": False,
    })  # fmt: skip


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_model_dirs(dest: Path | str, model: AnyDummyModel) -> ModelDirs:
    """Write ``dest/target`` and, for a model with a draft, ``dest/draft``; returns their paths. Existing files are
    replaced.

    Raises ``OSError`` (with the path) when ``dest`` cannot be written; the CLI turns it into one line.
    """
    dest = Path(dest).expanduser().absolute()
    dirs = ModelDirs(dest / "target", dest / "draft" if model.has_draft else None, model)
    generation = {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID], "pad_token_id": PAD_ID, "do_sample": False}
    todo = [(dirs.target, model.target_config())]
    if isinstance(model, DummyModel) and dirs.draft is not None:
        todo.append((dirs.draft, model.draft_config()))
    for d, cfg in todo:
        d.mkdir(parents=True, exist_ok=True)
        _write_json(d / "config.json", cfg)
        _write_json(d / "generation_config.json", generation)
        write_tokenizer(d, model.vocab)
    _write_json(dest / "kvtrap-model.json", {"written_by": "kvtrap repro models", **dirs.to_json()})
    return dirs
