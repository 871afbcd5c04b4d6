"""Armed host-check cost per layer call vs the unarmed call, on CPU, with real sglang==0.5.23 objects.

``--backend trtllm_mha`` (default) runs SGLang's real ``TRTLLMHAAttnBackend.forward_decode`` (partially
constructed backend, real SWAKVPool, real RadixAttention layers; see tests/helpers/sglang_world.py) up to the
FlashInfer launch, which does not exist on a CPU machine: the call writes K/V into the pool and stops at the
launch. ``--backend fa3`` runs SGLang's real ``FlashAttentionBackend.forward_decode`` on metadata built by its
own ``init_forward_metadata`` (tests/helpers/fa3_world.py), the FA3 launch replaced by a recorder that returns
zeros. ``--backend triton`` runs SGLang's real ``TritonAttnBackend.forward_decode`` the same way, up to its
decode kernel launch (a recorder stands there; see ``sglang_world.KernelRecorder``); ``--backend flashinfer``
runs SGLang's real ``FlashInferAttnBackend.forward_decode`` up to the planned wrapper's ``run`` (a recorder; see
``sglang_world._planned_wrapper``). Both sides (armed, unarmed) do exactly that; the difference is kvtrap's
wrapper and checks. Prints a table and writes JSON + markdown.

    python benchmarks/host_check_bench.py --out benchmarks/results
    python benchmarks/host_check_bench.py --backend fa3 --out benchmarks/results
    python benchmarks/host_check_bench.py --backend triton --out benchmarks/results
    python benchmarks/host_check_bench.py --backend flashinfer --out benchmarks/results
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _results import run_meta, write_results  # noqa: E402 - beside this script


def _call(backend, layer, fb, q, k, v) -> None:
    try:
        backend.forward_decode(q, k, v, layer, fb)
    except NameError:  # the FlashInfer launch: where a CPU machine stops (trtllm_mha)
        pass


def _new_forward(backend) -> None:
    """A new forward's metadata (same tensors, a new object): the first layer pays the value scans."""
    import copy

    backend.forward_metadata = copy.copy(backend.forward_metadata)


def _time_layers(backend, layers, fb, q, k, v, *, new_forward, reps: int) -> list[float]:
    per_call = []
    for _ in range(reps):
        if new_forward:
            _new_forward(backend)
        t0 = time.perf_counter_ns()
        for layer in layers:
            _call(backend, layer, fb, q, k, v)
        per_call.append((time.perf_counter_ns() - t0) / 1e3 / len(layers))
    return per_call


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--backend", choices=["trtllm_mha", "fa3", "triton", "flashinfer"], default="trtllm_mha")
    args = ap.parse_args()
    import os
    import warnings

    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: SGLang's Triton helpers run interpreted
    warnings.filterwarnings("ignore")
    from helpers import sglang_world as w
    from helpers import trapdumps as td

    import kvtrap

    if args.backend == "fa3":
        from helpers import fa3_world as fw

        world = fw.decode_world(seq_lens=(40, 100, 17, 30))
        fw.fa3_module().flash_attn_with_kvcache = fw.KernelRecorder()  # no FA3 kernel on a CPU machine
        layers, batch, backend, fb = world.layers, world.batch, world.backend, world.fb
    elif args.backend == "triton":
        pool, alloc, layers, batch, backend, fb = td.triton_world(seq_lens=(40, 100, 17, 30))
    elif args.backend == "flashinfer":
        pool, alloc, layers, batch, backend, fb = td.flashinfer_world(seq_lens=(40, 100, 17, 30))
    else:
        pool, alloc, layers, batch, backend, fb = td.decode_world(seq_lens=(40, 100, 17, 30))
        w.set_write_locs(backend, alloc, fb)
    q, k, v = w.qkv(len(batch.seq_lens))
    rows = {}
    for name, new_forward in (("steady (same forward)", False), ("new forward each pass", True)):
        _time_layers(backend, layers, fb, q, k, v, new_forward=new_forward, reps=20)  # warm-up
        unarmed = _time_layers(backend, layers, fb, q, k, v, new_forward=new_forward, reps=args.reps)
        with tempfile.TemporaryDirectory() as tmp, kvtrap.armed(dump_dir=tmp):
            _time_layers(backend, layers, fb, q, k, v, new_forward=new_forward, reps=20)
            armed = _time_layers(backend, layers, fb, q, k, v, new_forward=new_forward, reps=args.reps)
        u, a = statistics.median(unarmed), statistics.median(armed)
        rows[name] = {"unarmed_us_per_layer": round(u, 2), "armed_us_per_layer": round(a, 2),
                      "overhead_us_per_layer": round(a - u, 2), "ratio": round(a / u, 3)}
    command = ("python benchmarks/host_check_bench.py" + ("" if args.backend == "trtllm_mha" else f" --backend {args.backend}")
               + " --out benchmarks/results")  # fmt: skip
    meta = run_meta("host_check_bench.py", ("kvtrap", "sglang", "torch"), command=command, layers=len(layers),
                    batch=len(batch.seq_lens), reps=args.reps,
                    note="CPU tensors: the value scan's host sync is a CPU op here; on a GPU it is one device sync "
                         "(~20-40 us) per table per forward, measured in benchmarks/results/guard-*.md")
    lines = ["| case | unarmed us/layer | armed us/layer | overhead us/layer | ratio |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['unarmed_us_per_layer']} | {r['armed_us_per_layer']} | "
                     f"{r['overhead_us_per_layer']} | {r['ratio']} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        stem = "host-check-cpu" if args.backend == "trtllm_mha" else f"host-check-{args.backend}-cpu"
        write_results(args.out, stem, f"Armed host-check cost per {args.backend} layer call (CPU)", meta, rows,
                      table)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
