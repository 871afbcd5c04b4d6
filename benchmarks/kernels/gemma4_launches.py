"""GPU kernels per Gemma 4 decoder layer in SGLang 0.5.23's own model code, KVTRAP_GEMMA4_KERNELS off vs on.

Builds SGLang's real ``Gemma4TextModel`` (the small real-structure configs of ``tests/helpers/gemma4_world.py``:
E4B-like with PLE and KV sharing, 26B-A4B-like MoE, 31B-like dense; 4 layers, hidden 64) on one CUDA GPU, runs
one decode step (2 requests) under ``torch.profiler`` with the switch off, then on (the same model, patched in
place), and counts the GPU kernels launched inside each decoder layer's forward, attention core excluded
(SGLang's ``TorchNativeAttnBackend`` here, which a server replaces with trtllm_mha/fa3). Each layer's forward
and the backend's forward are wrapped in profiler ranges; a kernel belongs to the innermost range whose CPU
launch it came from. The count is a property of the code path, not of the shapes, so small shapes suffice;
an op that launches more kernels at other shapes (e.g. MoE runners) is named in the results.

  python benchmarks/kernels/gemma4_launches.py --out benchmarks/results

Needs a CUDA GPU and SGLang's full runtime (``sglang.srt`` with its CUDA kernels).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LAYER_RANGE = "kvtrap.bench.layer"
ATTN_RANGE = "kvtrap.bench.attn_core"


def _ranges(runner: Any) -> None:
    """Profiler ranges around every decoder layer and around the attention backend's forward."""
    import torch

    open_ranges: list[Any] = []

    def enter(name: str):
        def hook(*_a: Any, **_k: Any) -> None:
            rf = torch.autograd.profiler.record_function(name)
            rf.__enter__()
            open_ranges.append(rf)

        return hook

    def leave(*_a: Any, **_k: Any) -> None:
        open_ranges.pop().__exit__(None, None, None)

    # the world's recording hooks copy tensors inside the layers: drop them, only the ranges stay
    for module in runner.model.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    for i, layer in enumerate(runner.model.layers):
        layer.register_forward_pre_hook(enter(f"{LAYER_RANGE}{i}"), with_kwargs=True)
        layer.register_forward_hook(leave)
    backend_forward = runner.backend.forward

    def attn(*a: Any, **k: Any) -> Any:
        with torch.autograd.profiler.record_function(ATTN_RANGE):
            return backend_forward(*a, **k)

    runner.backend.forward = attn


#: Host-side launch calls the profiler records (CUDA runtime for torch's kernels, driver API for Triton's).
LAUNCHES = (
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaLaunchCooperativeKernel",
)


def _within(t: float, spans: list[tuple[float, float]]) -> bool:
    return any(a <= t <= b for a, b in spans)


def count(runner: Any, layers: int) -> dict[str, Any]:
    """Kernel launches per layer (attention core excluded) and in the attention core, over one decode step.

    A launch belongs to a layer when its host-side launch call starts inside that layer's profiler range, and to
    the attention core when it also starts inside the backend's range: timestamps on the one host thread, so no
    reliance on the profiler linking device kernels to ops.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and os.environ.get("KVTRAP_TEST_DEVICE") == "cuda"
    runner.run(("prefill", "decode"))  # warm-up: JIT, autotune, lazy plans
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        runner.run(("decode",))
        sync()
    events = prof.events()
    spans = {int(e.name[len(LAYER_RANGE) :]): (e.time_range.start, e.time_range.end)
             for e in events if e.name.startswith(LAYER_RANGE)}  # fmt: skip
    attn = [(e.time_range.start, e.time_range.end) for e in events if e.name == ATTN_RANGE]
    launches = [e for e in events if e.name in LAUNCHES]
    per_layer: dict[int, int] = {}
    in_attn: dict[int, int] = {}
    for i, (a, b) in sorted(spans.items()):
        mine = [e for e in launches if a <= e.time_range.start <= b]
        in_attn[i] = sum(_within(e.time_range.start, attn) for e in mine)
        per_layer[i] = len(mine) - in_attn[i]
    kernels = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    return {
        "per_layer": per_layer,
        "attention_core": in_attn,
        "whole_step": len(launches),
        "device_kernels": len(kernels),
        "kernel_names": dict(Counter(kernels)),
        "layers": layers,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--variants", nargs="+", default=["e4b", "moe", "dense"])
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="run the code path on the CPU (counts are 0 there)"
    )
    a = ap.parse_args()
    os.environ["KVTRAP_TEST_DEVICE"] = "cpu" if a.cpu_smoke else "cuda"
    os.environ["SGLANG_ROPE_CACHE_FP32"] = "1"
    if a.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if not a.cpu_smoke and not torch.cuda.is_available():
        print("gemma4_launches: needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    from sglang.test.layer_ut_utils import init_single_process_dist

    init_single_process_dist(master_port=int(os.environ.get("KVTRAP_TEST_PORT", "29741")))
    if a.cpu_smoke:
        import sglang.srt.layers.rotary_embedding.base as rope_base

        rope_base._is_cpu = True  # as tests/helpers/gemma4_world.py does on a CPU host
    from kvtrap.kernels import sglang_gemma4
    from kvtrap.repro.report import versions

    # by file, not through sys.path: the repository root on sys.path makes its kernels/ folder shadow the
    # PyPI package transformers probes for
    spec = importlib.util.spec_from_file_location(
        "gemma4_world", ROOT / "tests" / "helpers" / "gemma4_world.py"
    )
    assert spec is not None and spec.loader is not None
    world = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(world)

    results: dict[str, Any] = {}
    for v in a.variants:
        runner = world.Runner(v)
        _ranges(runner)
        sglang_gemma4.disable()
        off = count(runner, world.LAYERS)
        sglang_gemma4.enable()
        on = count(runner, world.LAYERS)
        sglang_gemma4.disable()
        results[v] = {"off": off, "on": on}
        print(v, "off", off["per_layer"], "on", on["per_layer"], flush=True)
    device = torch.cuda.get_device_name(0) if not a.cpu_smoke else "cpu-smoke"
    data = {"device": device, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join([sys.executable, *sys.argv]), "versions": versions(), "results": results}  # fmt: skip
    slug = device.lower().replace("nvidia ", "nvidia-").replace(" ", "-")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"gemma4-launches-{slug}.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [f"# GPU kernels per Gemma 4 decoder layer, KVTRAP_GEMMA4_KERNELS off vs on, {device}", "",
             f"- date {data['date']}; command `{data['command']}`",
             "- versions: " + ", ".join(f"{k} {x}" for k, x in data["versions"].items() if x),
             "- one decode step (2 requests) of SGLang's Gemma4TextModel, 4 layers, hidden 64 (layer structure of the"
             " released variants); kernels launched inside each layer, attention core (TorchNativeAttnBackend)"
             " excluded", "",
             "| model | layer | off | on | attention core |", "|---|---|---|---|---|"]  # fmt: skip
    for v, r in results.items():
        for i, n_off in r["off"]["per_layer"].items():
            lines.append(
                f"| {v} | {i} | {n_off} | {r['on']['per_layer'].get(i)} | {r['off']['attention_core'][i]} |"
            )
        lines.append(
            f"| {v} | whole step: launch calls | {r['off']['whole_step']} | {r['on']['whole_step']} | |"
        )
        lines.append(
            f"| {v} | whole step: device kernels | {r['off']['device_kernels']} | {r['on']['device_kernels']} | |"
        )
    (a.out / f"gemma4-launches-{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
