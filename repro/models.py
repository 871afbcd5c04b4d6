"""Weight-free Gemma 4 models for the server repros: configs + a tokenizer, no weights, no hub.

``kvtrap repro NAME --dummy-weights`` (or ``kvtrap repro models write DIR``) writes a target model dir and
its frozen-KV MTP "assistant" draft dir, each with a ``config.json``, a ``generation_config.json`` and a
word-level tokenizer, and the server starts with ``--load-format dummy`` (SGLang initialises the weights
itself). Any GPU that runs SGLang can then run kvtrap's server scenarios without downloading anything.

The shapes follow the public Gemma 4 checkpoints' config.json values (the ``VARIANTS`` table below; the MoE and
31B MLP widths are approximate, which only changes GEMM sizes) except where a weight-free text-only model on
SGLang 0.5.23 cannot follow them;
every such deviation is listed in :attr:`DummyModel.deviations` and recorded in the run's report:

* head_dim 256 on every layer (the real full-attention layers use 512): FlashInfer's XQA decode kernel,
  which trtllm_mha runs on sm_90, refuses head_dim 512 with speculative decoding, and fmha_v2 has no sm_90
  prefill kernel for it; a text-only ``gemma4_text`` config also carries one head_dim for all layers in
  SGLang 0.5.23 (it flattens per-layer head dims only for the multimodal ``gemma4`` model type).
* fewer layers on request (``layers=``): CUDA-graph capture time grows with the layer count; the
  sliding/full pattern (5:1, last layer full) and the KV-shared tail keep their proportions.

The tokenizer maps id ``i >= 4`` to the word ``t<i>`` and back, so random token ids (``sglang.bench_serving
--dataset-name random-ids``) survive decode -> encode exactly and generated ids can be read back from text.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

#: Special tokens of the dummy tokenizer (ids 0..3); every other id i is the word f"t{i}".
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2

#: Why every dummy model has head_dim 256 on every layer (recorded in each run's report).
HEAD_DIM_WHY = (
    "head_dim 256 on every layer (real full-attention layers: 512): trtllm_mha on sm_90 runs FlashInfer XQA "
    "decode, which has no head_dim 512 with speculative decoding, and fmha_v2 has no sm_90 prefill kernel for "
    "512; a text-only gemma4_text config also carries one head_dim in SGLang 0.5.23"
)


@dataclass(frozen=True)
class MoE:
    experts: int
    top_k: int
    intermediate: int


@dataclass(frozen=True)
class DummyModel:
    """One weight-free Gemma 4 variant: the target's shapes and its assistant draft's."""

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
    deviations: tuple[str, ...] = field(default=(HEAD_DIM_WHY,))

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
            "rms_norm_eps": 1e-6,
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

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["layer_types"] = self.layer_types()
        return out


#: Shapes of the public checkpoints (HF config.json values: layers, hidden, heads, windows, KV sharing, PLE,
#: experts; kernels/README.md lists them too), as far as a weight-free text-only model on SGLang 0.5.23 can
#: follow them.
VARIANTS: dict[str, DummyModel] = {
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
    )
}  # fmt: skip


def variant(name: str, layers: int | None = None) -> DummyModel:
    try:
        base = VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown dummy model {name!r}; known: {', '.join(VARIANTS)}") from None
    return base.with_layers(layers)


@dataclass(frozen=True)
class ModelDirs:
    target: Path
    draft: Path
    model: DummyModel

    def to_json(self) -> dict[str, Any]:
        return {"target": str(self.target), "draft": str(self.draft), "model": self.model.to_json()}


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


def write_model_dirs(dest: Path | str, model: DummyModel) -> ModelDirs:
    """Write ``dest/target`` and ``dest/draft``; returns their paths. Existing files are replaced.

    Raises ``OSError`` (with the path) when ``dest`` cannot be written; the CLI turns it into one line.
    """
    dest = Path(dest).expanduser().absolute()
    dirs = ModelDirs(dest / "target", dest / "draft", model)
    generation = {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID], "pad_token_id": PAD_ID, "do_sample": False}
    for d, cfg in ((dirs.target, model.target_config()), (dirs.draft, model.draft_config())):
        d.mkdir(parents=True, exist_ok=True)
        _write_json(d / "config.json", cfg)
        _write_json(d / "generation_config.json", generation)
        write_tokenizer(d, model.vocab)
    _write_json(dest / "kvtrap-model.json", {"written_by": "kvtrap repro models", **dirs.to_json()})
    return dirs
