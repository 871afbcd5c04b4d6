"""Free-path check cost per SGLang free call, with real sglang==0.5.23 objects (CPU, or a CUDA GPU).

Each rep allocates requests through the real ``SWATokenToKVPoolAllocator.alloc_extend`` (not timed) and
times one free call: ``free`` of a 3-page request, ``free_swa_segment`` of 2 out-of-window pages (window
eviction), and a free group releasing 4 requests. Sides: unarmed, armed with ``KVTRAP_FREE_CHECKS=off``,
armed with the checks on in call mode (``KVTRAP_ALLOCATOR_TRAP=call``: host syncs at the call) and in drain
mode (``drain``: device work only). The time is the host's, from the call to its return, with the device
idle before each call (on a GPU: ``torch.cuda.synchronize()`` first). In a server a call-mode sync also waits
for the forward running on the GPU; that part is not in these numbers. Prints a table, writes JSON + markdown.

    python benchmarks/free_path_bench.py --out benchmarks/results                 # CPU
    python benchmarks/free_path_bench.py --device cuda --out benchmarks/results   # GPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def _cases(w):
    ps = w.PAGE_SIZE

    def free_request(alloc):
        slots = w.allocate_requests(alloc, [3 * ps]).token_slots[0]
        return lambda: alloc.free(slots), lambda: None

    def evict_window(alloc):
        slots = w.allocate_requests(alloc, [3 * ps]).token_slots[0]
        return (lambda: alloc.free_swa_segment(slots[: 2 * ps], start_pos=0),
                lambda: alloc.free_full_segment(slots[: 2 * ps], start_pos=0) or alloc.free_segment(slots[2 * ps:], start_pos=2 * ps))

    def free_group(alloc):
        batch = w.allocate_requests(alloc, [ps + 3, 2 * ps, 3 * ps - 1, ps])

        def run():
            alloc.free_group_begin()
            for slots in batch.token_slots:
                alloc.free(slots)
            alloc.free_group_end()

        return run, lambda: None

    return {"free (1 request, 3 pages)": free_request, "free_swa_segment (2 pages, window eviction)": evict_window,
            "free group (4 requests, 8 pages)": free_group}


def _time(alloc, make, reps: int, sync) -> list[float]:
    out = []
    for _ in range(reps):
        call, cleanup = make(alloc)
        sync()
        t0 = time.perf_counter_ns()
        call()
        out.append((time.perf_counter_ns() - t0) / 1e3)
        cleanup()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=500)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from helpers import sglang_world as w

    import kvtrap

    if args.device == "cuda" and not torch.cuda.is_available():
        print("free_path_bench: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in _cases(w).items():
            sides = {}
            for side, ctx in (("unarmed", nullcontext()), ("armed_free_checks_off", kvtrap.armed(dump_dir=tmp, free_checks="off")),
                              ("armed_checks_call", kvtrap.armed(dump_dir=tmp, allocator_trap="call")),
                              ("armed_checks_drain", kvtrap.armed(dump_dir=tmp, allocator_trap="drain"))):  # fmt: skip
                with ctx:
                    alloc = w.make_allocator(w.make_pool(device=args.device), device=args.device)
                    _time(alloc, make, 30, sync)  # warm-up
                    sides[side] = round(statistics.median(_time(alloc, make, args.reps, sync)), 1)
            for mode in ("call", "drain"):
                sides[f"{mode}_cost_us"] = round(sides[f"armed_checks_{mode}"] - sides["armed_free_checks_off"], 1)
            rows[name] = sides
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {d: metadata.version(d) for d in ("kvtrap", "sglang", "torch")},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python benchmarks/free_path_bench.py", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "page_size": w.PAGE_SIZE, "reps": args.reps,
        "note": "median host us per free call, device idle before each call. On CPU a host sync is a CPU op, so "
                "call and drain mode cost about the same; on a GPU call mode also waits for its own kernels, and in a "
                "server for the running forward (not measured here).",
    }  # fmt: skip
    lines = ["| free call | unarmed us | armed, checks off us | checks on, call mode us | checks on, drain mode us |"
             " call cost us | drain cost us |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        lines.append(f"| {name} | {r['unarmed']} | {r['armed_free_checks_off']} | {r['armed_checks_call']} | "
                     f"{r['armed_checks_drain']} | {r['call_cost_us']} | {r['drain_cost_us']} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        from _results import write_results

        slug = "cpu" if args.device == "cpu" else meta["device"].lower().replace("nvidia ", "nvidia-").replace(" ", "-")
        write_results(args.out, f"free-path-{slug}", f"Free-path check cost per SWA allocator free call ({meta['device']})",
                      meta, rows, table)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
