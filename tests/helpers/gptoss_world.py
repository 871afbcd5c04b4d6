"""What SGLang 0.5.23 makes of kvtrap's weight-free GPT-OSS-like model dir, on the CPU, in a fresh process.

Run as a script (``tests/repro/test_gptoss_model.py`` does): ``gptoss_world.py MODEL_DIR OUT.json``. Everything
is SGLang's own code on the written ``config.json``:

* ``resolved``: ``ServerArgs(..., attention_backend="fa3", disable_radix_cache=True).resolve_once()`` (the whole
  server-argument resolution pipeline a launch runs, model_hook.py's backend check included), then
  ``resolved_dict()`` and the ``ModelConfig`` it built (``model_config_of``): hybrid SWA, layer split, window,
  sinks.
* ``default``: the same without a backend (device "cuda"). SGLang picks GPT-OSS's backend in
  ``_gpt_oss_overrides`` from ``get_platform()``; a CPU host is not sm90, so for the ``sm90`` run that module's
  ``get_platform`` answers ``is_sm90`` / ``is_sm100`` as an H100/H200 would and everything else as the real platform
  does (the override and the rest of the pipeline are SGLang's, unchanged); ``sm80`` the same as an sm80 GPU
  (neither), the control; ``this_host`` unpatched, with ``host``: the real platform's two answers. (sm100 cannot be shown this way: its pick, trtllm_mha, is then checked by attention_hook.py against
  the real platform.)
* ``refused``: ``attention_backend="flashinfer"``, which model_hook.py asserts against.
* ``model``: ``GptOssForCausalLM`` built from the loaded config on the ``meta`` device (no memory, no weights)
  after publishing the fa3 server args as SGLang's launcher does (gloo, world size 1): each layer's window,
  sinks and expert shapes.

A separate process because resolution sets process-wide state (environment variables, the runtime context, torch
distributed) that would leak into the rest of the test session.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

KEYS = ("attention_backend", "prefill_attention_backend", "decode_attention_backend", "page_size",
        "disable_hybrid_swa_memory", "swa_full_tokens_ratio", "disable_radix_cache", "moe_runner_backend",
        "quantization", "load_format")  # fmt: skip


def _resolve(model_dir: str, backend: str | None, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    from sglang.srt.server_args import ServerArgs

    # page 64 as the scenarios pass it (kvtrap's free-path checks need pages)
    args = ServerArgs(model_path=model_dir, load_format="dummy", attention_backend=backend, device=device,
                      disable_radix_cache=True, page_size=64)  # fmt: skip
    args.resolve_once()
    resolved = args.resolved_dict()
    return args, {k: resolved.get(k) for k in KEYS}


class _AsIf:
    """The real platform, except the two compute-capability answers of the GPU being pretended."""

    def __init__(self, real: Any, sm: int) -> None:
        self._real, self.is_sm90, self.is_sm100 = real, sm == 90, sm == 100

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _default_on(model_dir: str, sm: int | None) -> str:
    """The backend SGLang resolves when none is given, on an sm90 GPU (None: this host as it is). Device
    "cuda": with "cpu" SGLang's CPU hook (platform_hook.py) picks a CPU backend before the model override runs."""
    import sglang.srt.arg_groups.model_overrides.gpt_oss as override

    real = override.get_platform
    if sm is not None:
        override.get_platform = lambda: _AsIf(real(), sm)
    try:
        _, resolved = _resolve(model_dir, None, device="cuda")
    finally:
        override.get_platform = real
    return resolved["attention_backend"]


def _host_platform() -> dict[str, bool]:
    """The compute-capability answers of this host's real platform (what ``this_host``'s pick follows)."""
    from sglang.srt.runtime_context import get_platform

    p = get_platform()
    return {"is_sm90": bool(getattr(p, "is_sm90", False)), "is_sm100": bool(getattr(p, "is_sm100", False))}


def _model_facts(args: Any, model_config: Any) -> dict[str, Any]:
    import torch
    from sglang.srt.distributed import parallel_state
    from sglang.srt.distributed.parallel_state import init_distributed_environment, initialize_model_parallel
    from sglang.srt.runtime_context import SpawnRanks, get_exec, get_parallel, publish, reset_context

    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", os.environ.get("KVTRAP_TEST_PORT", "29773")),
                 ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):  # fmt: skip
        os.environ.setdefault(k, v)
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo")
    reset_context()
    publish(args, role="test", ranks=SpawnRanks(world_rank=0))
    get_parallel().override_permanently(world_group=parallel_state._WORLD)
    initialize_model_parallel(backend="gloo")
    # Without CUDA or SGLang's CPU engine, RotaryEmbedding would import vLLM's RoPE op (gemma4_world.py does the same)
    import sglang.srt.layers.rotary_embedding.base as rope_base

    rope_base._is_cpu = True
    from sglang.srt.models.gpt_oss import GptOssForCausalLM

    with torch.device("meta"):
        model = GptOssForCausalLM(model_config.hf_config)
    layers = []
    for layer in model.model.layers:
        attn = layer.self_attn
        layers.append({
            "window": attn.attn.sliding_window_size, "sinks": list(attn.sinks.shape), "sinks_dtype": str(attn.sinks.dtype),
            "q_heads": attn.attn.tp_q_head_num, "kv_heads": attn.attn.tp_k_head_num, "head_dim": attn.attn.head_dim,
            "experts": {n: list(p.shape) for n, p in layer.mlp.named_parameters()},
        })  # fmt: skip
    return {"class": type(model).__name__, "published_backend": get_exec().kernel.attention_backend,
            "window": model.get_attention_sliding_window_size(), "layers": layers}  # fmt: skip


def main(model_dir: str, out_path: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from sglang.srt.arg_groups.model_override_base import model_config_of

    args, resolved = _resolve(model_dir, "fa3")
    mc = model_config_of(args)
    out: dict[str, Any] = {
        "resolved": resolved,
        "model_config": {
            "architectures": list(mc.hf_config.architectures), "config_class": type(mc.hf_config).__name__,
            "is_hybrid_swa": mc.is_hybrid_swa, "is_hybrid_swa_compress": mc.is_hybrid_swa_compress,
            "swa_attention_layer_ids": mc.swa_attention_layer_ids,
            "full_attention_layer_ids": mc.full_attention_layer_ids, "sliding_window_size": mc.sliding_window_size,
            "has_attention_sinks": mc.has_attention_sinks, "head_dim": mc.head_dim,
            "num_kv_heads": mc.get_num_kv_heads(1), "num_hidden_layers": mc.num_hidden_layers,
            "dtype": str(mc.dtype), "quantization": mc.quantization, "context_len": mc.context_len,
            "rope_parameters": dict(mc.hf_config.rope_parameters),
        },
        "default": {"sm90": _default_on(model_dir, 90), "sm80": _default_on(model_dir, 80),
                    "this_host": _default_on(model_dir, None), "host": _host_platform()},
    }  # fmt: skip
    try:
        _resolve(model_dir, "flashinfer")
        out["refused"] = None
    except AssertionError as exc:
        out["refused"] = str(exc)
    out["model"] = _model_facts(args, mc)
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
