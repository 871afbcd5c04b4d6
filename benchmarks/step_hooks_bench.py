"""kvtrap's host cost per decode step outside the allocator, with real sglang==0.5.23 objects on the CPU.

What runs on the host once or more per decode step in the measured server configuration (frozen-KV MTP 3 steps /
4 draft tokens, trtllm_mha, page 64, decode CUDA graphs, prefill eager; see benchmarks/results/step-hooks-cpu.md
for the list and the SGLang lines behind it). Target verify and the draft loop are graph replays: the wrapped
``init_forward_metadata_in_graph`` / ``update_trtllm_mha_graph_metadata`` / ``forward_decode`` run at capture only,
and the replay prep (``init_forward_metadata_out_graph``) is not wrapped for trtllm_mha. What is left:

* ``process_batch_result_decode`` (kvtrap's drain point, :mod:`kvtrap.capture.hooks.step_drain`), once per step:
  the device guard's records of the target and the draft backend (two states) and the allocator's drain-mode
  record. SGLang's own method needs a scheduler: the wrapper is timed around a no-op original (stated), so the
  number is kvtrap's alone. The step result's ``copy_done`` is a stand-in event whose ``synchronize`` returns at
  once (a CUDA event that has passed costs about as much); the guard records' pinned host counter is a CPU tensor
  of the same shape (what ``publish_`` fills on a GPU); the allocator record is a CPU one (no CUDA event to query:
  on a GPU host each ready slot adds one ``cudaEventQuery``). Two variants: no allocator check since the last
  drain, and one (a snapshot to read, as after a step that allocated or freed SWA pages).
* ``frozen_kv_target_view`` (SGLang's own context manager, real draft ``TRTLLMHAAttnBackend``, real target
  ``SWAKVPool``, real ``ForwardBatch``), once per step around the draft graph's replay prep: one read and two
  writes of ``token_to_kv_pool``, which the #26957 fix's descriptor sees (:mod:`kvtrap.capture.fixes.sglang_26957`).
* ``free_group_begin`` + ``free_group_end`` with nothing freed in between (SGLang's ``maybe_evict_swa``, every
  decode step when no request leaves its window): real ``SWATokenToKVPoolAllocator``, drain mode.

Armed as the server was (``KVTRAP_ALLOCATOR_TRAP`` is ``drain`` here because ``auto`` picks it on CUDA; the other
settings are the defaults). Prints a table; ``--out`` writes JSON + markdown; ``--profile`` prints cProfile's top
entries of the armed loops.

    python benchmarks/step_hooks_bench.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _results import run_meta, write_results  # noqa: E402 - beside this script

BS = 8  # requests in the decode batch (the server run's concurrency 8)


class _PassedEvent:
    """Stand-in for the step result's ``copy_done`` CUDA event once it has passed."""

    def synchronize(self) -> None:
        return None


def _world():
    import torch
    from helpers import sglang_world as w
    from sglang.srt.speculative.frozen_kv_mtp_utils import frozen_kv_target_view

    pool = w.make_pool(full_pages=256, swa_pages=128)
    alloc = w.make_allocator(pool)
    batch = w.allocate_requests(alloc, [w.PAGE_SIZE + 3] * BS)
    target = w.make_backend(pool, alloc)
    draft = w.make_draft_backend(w.make_draft_runner(pool, alloc), pool)
    fb = w.make_forward_batch(batch)
    ctx = w.frozen_kv_context(pool)
    return SimpleNamespace(w=w, torch=torch, pool=pool, alloc=alloc, batch=batch, target=target, draft=draft, fb=fb,
                           ctx=ctx, view=frozen_kv_target_view)  # fmt: skip


def _guard_states(world) -> None:
    """The two guard states a server has after capture (target and draft backend), on the synced drain path."""
    import torch

    from kvtrap.capture.hooks import device_guard

    for backend in (world.target, world.draft):
        state = device_guard._state(backend, torch.device("cpu"))
        state.record.host_counter = torch.zeros(1, dtype=torch.int32)  # the pinned copy publish_() fills on a GPU


def _cases(world):
    from sglang.srt.managers.scheduler_components.batch_result_processor import SchedulerBatchResultProcessor

    from kvtrap.capture.deferred import Findings
    from kvtrap.capture.hooks import allocator, step_drain
    from kvtrap.capture.session import current

    processor = object.__new__(SchedulerBatchResultProcessor)
    result = SimpleNamespace(copy_done=_PassedEvent())

    def noop(self, batch, result):  # SGLang's method, stubbed: the scheduler it needs is not built here
        return None

    drain = step_drain._before_decode_results(noop)

    def decode_drain(armed: bool):
        f = drain if armed else noop
        return lambda: f(processor, None, result)

    def decode_drain_after_check(armed: bool):
        # one checked call since the last drain (its bookkeeping, timed on both sides): a snapshot to read
        cpu = world.torch.device("cpu")
        found = allocator._findings_for(world.alloc, current(), cpu) if armed else Findings(cpu)
        f = drain if armed else noop

        def run():
            found.begin(lambda a, f: None)
            found.snapshot(current=True)
            f(processor, None, result)

        return run

    def target_view(armed: bool):
        view, fb, ctx, draft = world.view, world.fb, world.ctx, world.draft

        def run():
            with view(fb, ctx, draft):
                pass

        return run

    def empty_group(armed: bool):
        alloc = world.alloc

        def run():
            alloc.free_group_begin()
            alloc.free_group_end()

        return run

    return {
        "process_batch_result_decode: drain point, no allocator check since the last drain": (decode_drain, 1),
        "process_batch_result_decode: drain point, one allocator check to read": (decode_drain_after_check, 1),
        "frozen_kv_target_view: 1 read + 2 writes of draft token_to_kv_pool": (target_view, 1),
        "free_group_begin + free_group_end, nothing freed (maybe_evict_swa)": (empty_group, 1),
    }


def _time(fn, inner: int, reps: int) -> float:
    """Median us per call over ``reps`` samples of ``inner`` calls."""
    for _ in range(inner * 5):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter_ns() - t0) / inner / 1e3)
    return statistics.median(samples)


def _profile(fn, n: int, top: int) -> str:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--inner", type=int, default=200)
    ap.add_argument("--profile", action="store_true", help="print cProfile's top entries of each armed loop")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1")  # drain-mode allocator kernels on CPU tensors (setup only)
    import warnings

    warnings.filterwarnings("ignore")
    import kvtrap

    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        world = _world()
        cases = _cases(world)
        unarmed = {name: _time(make(False), args.inner, args.reps) for name, (make, _) in cases.items()}
        with kvtrap.armed(dump_dir=tmp, allocator_trap="drain"):
            world.w.allocate_requests(world.alloc, [world.w.PAGE_SIZE])  # the allocator's drain record exists
            _guard_states(world)
            for name, (make, per_step) in cases.items():
                fn = make(True)
                armed = _time(fn, args.inner, args.reps)
                rows[name] = {"unarmed_us": round(unarmed[name], 2), "armed_us": round(armed, 2),
                              "kvtrap_us": round(armed - unarmed[name], 2), "calls_per_step": per_step}  # fmt: skip
                if args.profile:
                    print(f"== {name}\n{_profile(fn, 20000, 25)}")
    lines = ["| per-step call | calls per step | unarmed us | armed us | kvtrap us per call |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['calls_per_step']} | {r['unarmed_us']} | {r['armed_us']} | {r['kvtrap_us']} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        meta = run_meta("step_hooks_bench.py", ("kvtrap", "sglang", "torch", "triton"), device="cpu", batch=BS,
                        reps=f"{args.reps} x {args.inner} calls",
                        note="median host us per call, CPU only; CUDA work stubbed as said in the script's docstring")
        write_results(args.out, "step-hooks-cpu", "kvtrap's host cost per decode step outside the allocator (cpu)",
                      meta, rows, table)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
