"""Per-layer hidden-state stats of a weight-free Gemma 4 model in a real SGLang engine (``--load-format dummy``).

Settles on a GPU why the 26B-A4B-like dummy model generated token id 0 everywhere: it prints, for each rms_norm_eps
given, the dummy-initialised constants that matter (``layer_scalar``, norm weights, router scale, per-expert
scale), then for the prefill and the first decode step each decoder layer's output (NaN / inf counts, abs max,
rms), the final (normed) hidden state, the logits (NaN count, abs max, rows whose logits are all equal) and the
greedy tokens with their log-probabilities (all-equal logits give log(1/262144) = -12.4766 for every token).

Expected with eps 1e-6 (the real checkpoints' value, kvtrap's before NORM_EPS_WHY): layer outputs shrinking about
1000x per layer to ~1e-36 or 0 by layer 12, logits 0. With kvtrap's eps (repro/models.py DUMMY_RMS_NORM_EPS):
layer outputs ~1e-6 in every layer, logits ~1e-4, varied tokens.

Needs a CUDA GPU and SGLang's full runtime; about a minute per eps value (no CUDA graphs, 12 layers):

  python benchmarks/diag_dummy_moe.py                       # 26b-a4b, 12 layers, eps 1e-6 and kvtrap's
  python benchmarks/diag_dummy_moe.py --variant e4b --eps 1e-6

How: the model runs in SGLang's scheduler process (started with spawn), so this script writes a
``sitecustomize.py`` into a temporary directory put first on PYTHONPATH; it wraps Gemma 4's decoder layer,
text model and causal-LM ``forward`` in that process to print the stats (stderr, lines starting ``[diag]``).
Nothing in SGLang is changed on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

HOOK = r'''
import importlib.abc, importlib.util, os, sys

_TARGET = "sglang.srt.models.gemma4_causal"
_MAX_FORWARDS = int(os.environ.get("DIAG_MAX_FORWARDS", "2"))
_state = {"forwards": 0, "consts": False}


def _say(msg):
    print("[diag] " + msg, file=sys.stderr, flush=True)


def _stats(t):
    import torch
    if isinstance(t, (tuple, list)):
        t = t[0]
    f = t.detach().double()  # float64: squares of ~1e-36 values underflow in fp32
    fin = f[torch.isfinite(f)]
    amax = fin.abs().max().item() if fin.numel() else float("nan")
    rms = fin.pow(2).mean().sqrt().item() if fin.numel() else float("nan")
    return (f"shape={tuple(t.shape)} {t.dtype} nan={int(torch.isnan(f).sum())} inf={int(torch.isinf(f).sum())} "
            f"zeros={int((f == 0).sum())} absmax={amax:.3e} rms={rms:.3e}")


def _live():
    import torch
    return not torch.cuda.is_current_stream_capturing() and _state["forwards"] <= _MAX_FORWARDS


def _consts(model):
    cfg = model.config
    _say(f"config rms_norm_eps={cfg.rms_norm_eps} layers={cfg.num_hidden_layers} "
         f"moe={getattr(cfg, 'enable_moe_block', False)} ple={getattr(cfg, 'hidden_size_per_layer_input', 0)}")
    for layer in model.layers:
        if not hasattr(layer, "layer_scalar"):
            continue
        ls = layer.layer_scalar.detach().float().flatten().tolist()
        w = layer.input_layernorm.weight.detach().float().abs()
        extra = ""
        if getattr(layer, "router", None) is not None:
            extra = (f" router.scale absmax={layer.router.scale.detach().float().abs().max().item():.3e}"
                     f" per_expert_scale absmax={layer.moe.per_expert_scale.detach().float().abs().max().item():.3e}")
        _say(f"{layer.prefix}: layer_scalar={ls} input_layernorm.weight absmax={w.max().item():.3e} "
             f"mean|w|={w.mean().item():.3e}{extra}")


def _patch(mod):
    Layer, Text, LM = mod.Gemma4DecoderLayer, mod.Gemma4TextModel, mod.Gemma4ForCausalLM
    layer_fwd, text_fwd, lm_fwd = Layer.forward, Text.forward, LM.forward

    def layer_forward(self, *a, **k):
        out = layer_fwd(self, *a, **k)
        if _live():
            _say(f"forward {_state['forwards']} {self.prefix} out: {_stats(out)}")
        return out

    def text_forward(self, *a, **k):
        if not _state["consts"]:
            _state["consts"] = True
            _consts(self)
        out = text_fwd(self, *a, **k)
        if _live():
            _say(f"forward {_state['forwards']} final norm out: {_stats(out)}")
        return out

    def lm_forward(self, *a, **k):
        import torch
        if not torch.cuda.is_current_stream_capturing():
            _state["forwards"] += 1
        out = lm_fwd(self, *a, **k)
        logits = getattr(out, "next_token_logits", None)
        if logits is not None and _live():
            f = logits.detach().float()
            flat = (f.max(-1).values == f.min(-1).values).sum().item()
            _say(f"forward {_state['forwards']} logits: {_stats(f)} rows_all_equal={flat}/{f.shape[0]} "
                 f"argmax={f.argmax(-1).tolist()[:16]}")
        return out

    Layer.forward, Text.forward, LM.forward = layer_forward, text_forward, lm_forward
    _say("patched " + _TARGET)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _Finder())
'''


def main() -> int:
    from kvtrap.repro.models import DUMMY_RMS_NORM_EPS, variant, write_model_dirs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="26b-a4b")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-6, DUMMY_RMS_NORM_EPS])
    ap.add_argument("--attention-backend", default="trtllm_mha")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=4)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kvtrap-diag-"))
    (work / "sitecustomize.py").write_text(HOOK)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    import sglang

    rng = random.Random(0)
    prompts = [[rng.randrange(4, 262144) for _ in range(rng.randrange(16, 64))] for _ in range(args.prompts)]
    for eps in args.eps:
        dirs = write_model_dirs(work / f"eps{eps:g}", variant(args.variant, args.layers))
        cfg_path = dirs.target / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["rms_norm_eps"] = eps
        cfg_path.write_text(json.dumps(cfg, indent=1))
        print(f"\n===== {args.variant}, {args.layers} layers, rms_norm_eps {eps:g} =====", flush=True)
        engine = sglang.Engine(
            model_path=str(dirs.target), load_format="dummy", attention_backend=args.attention_backend,
            page_size=64, cuda_graph_backend_decode="disabled", cuda_graph_backend_prefill="disabled",
            mem_fraction_static=0.8, max_total_tokens=32768, context_length=2048, max_running_requests=8,
            log_level="warning",
        )  # fmt: skip
        try:
            outs = engine.generate(input_ids=prompts, sampling_params={"temperature": 0.0,
                                   "max_new_tokens": args.new_tokens}, return_logprob=True)  # fmt: skip
            for i, o in enumerate(outs):
                meta = o.get("meta_info", {})
                lps = [round(t[0], 4) if t[0] is not None else None for t in meta.get("output_token_logprobs", [])]
                ids = o.get("output_ids") or [t[1] for t in meta.get("output_token_logprobs", [])]
                print(f"prompt {i} ({len(prompts[i])} ids): greedy ids {ids} logprobs {lps}", flush=True)
        finally:
            engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
