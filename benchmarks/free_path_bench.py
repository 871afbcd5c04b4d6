"""Free-path check cost per SGLang free call, on CPU, with real sglang==0.5.23 objects.

Each rep allocates requests through the real ``SWATokenToKVPoolAllocator.alloc_extend`` (not timed) and
times one free call: ``free`` of a 3-page request, ``free_swa_segment`` of 2 out-of-window pages (window
eviction), and a free group releasing 4 requests. Three sides: unarmed, armed with
``KVTRAP_FREE_CHECKS=off``, armed with ``on`` (the default). Prints a table and writes JSON + markdown.

    python benchmarks/free_path_bench.py --out benchmarks/results
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


def _time(alloc, make, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        call, cleanup = make(alloc)
        t0 = time.perf_counter_ns()
        call()
        out.append((time.perf_counter_ns() - t0) / 1e3)
        cleanup()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=500)
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    from helpers import sglang_world as w

    import kvtrap

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in _cases(w).items():
            sides = {}
            for side, ctx in (("unarmed", nullcontext()), ("armed_free_checks_off", kvtrap.armed(dump_dir=tmp, free_checks="off")),
                              ("armed_free_checks_on", kvtrap.armed(dump_dir=tmp))):
                with ctx:
                    alloc = w.make_allocator(w.make_pool())
                    _time(alloc, make, 30)  # warm-up
                    sides[side] = round(statistics.median(_time(alloc, make, args.reps)), 1)
            sides["checks_cost_us"] = round(sides["armed_free_checks_on"] - sides["armed_free_checks_off"], 1)
            rows[name] = sides
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {d: metadata.version(d) for d in ("kvtrap", "sglang", "torch")},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/free_path_bench.py --out benchmarks/results",
        "page_size": w.PAGE_SIZE, "reps": args.reps,
        "note": "median us per free call; CPU tensors (a host sync is a CPU op here; on a GPU each check adds "
                "device syncs: the scan's any() and unique() of the full pages). Machine shared with other jobs.",
    }
    lines = ["| free call | unarmed us | armed, checks off us | armed, checks on us | checks cost us |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['unarmed']} | {r['armed_free_checks_off']} | {r['armed_free_checks_on']} | "
                     f"{r['checks_cost_us']} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        from _results import write_results

        write_results(args.out, "free-path-cpu", "Free-path check cost per SWA allocator free call (CPU)", meta, rows,
                      table)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
