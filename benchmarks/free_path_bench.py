"""Free-path check cost per SGLang free call, with real sglang==0.5.23 objects (CPU, or a CUDA GPU).

Each rep allocates requests through the real ``SWATokenToKVPoolAllocator.alloc_extend`` (not timed) and
times one free call: ``free`` of a 3-page request, ``free_swa_segment`` of 2 out-of-window pages (window
eviction), and a free group releasing 4 requests. Sides: unarmed, armed with ``KVTRAP_FREE_CHECKS=off``,
armed with the checks on in call mode (``KVTRAP_ALLOCATOR_TRAP=call``: host syncs at the call) and in drain
mode (``drain``: device work only). The time is the host's, from the call to its return, with the device
idle before each call (on a GPU: ``torch.cuda.synchronize()`` first). In a server a call-mode sync also waits
for the forward running on the GPU; that part is not in these numbers. Prints a table, writes JSON + markdown.

A second table counts what each call dispatches (any origin: SGLang's own ops included): aten ops and Triton
launches. The count does not depend on the device, so it is the CPU's way to see what drain mode costs a GPU
host (each dispatch is several microseconds of CPU there). On CPU the drain-mode kernels run in Triton's
interpreter (set here), so the CPU's drain-mode times are not a cost figure; its op counts are.

    python benchmarks/free_path_bench.py --out benchmarks/results                 # CPU
    python benchmarks/free_path_bench.py --device cuda --out benchmarks/results   # GPU
    python benchmarks/free_path_bench.py --host-only --out benchmarks/results     # CPU, kvtrap's own host cost

``--host-only`` (CPU) measures what drain mode costs the host apart from the device: the two check kernels'
launches are replaced by no-ops (for the measurement only; the interpreter's run is not a host cost), so what is
left over unarmed is kvtrap's Python and its torch ops. Besides the free calls it times the allocations a decode
step makes (``alloc_decode`` of 8 requests, and ``alloc_extend`` of 4 tokens for each of 8, as MTP speculative
decoding allocates its draft tokens), and counts the aten ops kvtrap itself issues per call (the innermost
frame outside torch is kvtrap's; on a GPU host each is a dispatch of several microseconds). The Triton launch's
own host cost is not in it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _results import run_meta, write_results  # noqa: E402 - beside this script


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


def _count(alloc, make, reps: int) -> tuple[float, float]:
    """Mean aten ops and Triton launches dispatched per call (torch dispatch mode + Triton's launch entry)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.jit import KernelInterface

    counts = {"aten": 0, "triton": 0, "inside": 0}

    class _Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts["aten"] += not counts["inside"]  # the interpreter's own copies are not the launch's cost
            return func(*args, **(kwargs or {}))

    getitem = KernelInterface.__getitem__

    def launch(self, grid):
        run = getitem(self, grid)

        def counted(*args, **kwargs):
            counts["triton"] += 1
            counts["inside"] += 1
            try:
                return run(*args, **kwargs)
            finally:
                counts["inside"] -= 1

        return counted

    for _ in range(reps):
        call, cleanup = make(alloc)
        KernelInterface.__getitem__ = launch
        try:
            with _Ops():
                call()
        finally:
            KernelInterface.__getitem__ = getitem
        cleanup()
    return counts["aten"] / reps, counts["triton"] / reps


def _alloc_cases(w):
    ps, bs = w.PAGE_SIZE, 8

    def decode(alloc):
        import torch

        batch = w.allocate_requests(alloc, [ps + 3] * bs)
        seq = torch.full((bs,), ps + 4, dtype=torch.int64)
        last = torch.stack([slots[-1] for slots in batch.token_slots])
        out = []
        return (lambda: out.append(alloc.alloc_decode(seq, seq.clone(), last)),
                lambda: alloc.free(torch.cat([*batch.token_slots, *out])))

    def extend(alloc):
        import torch

        batch = w.allocate_requests(alloc, [ps + 3] * bs)
        prefix = torch.full((bs,), ps + 3, dtype=torch.int64)
        seq = prefix + 4
        last = torch.stack([slots[-1] for slots in batch.token_slots])
        out = []
        return (lambda: out.append(alloc.alloc_extend(prefix, prefix.clone(), seq, seq.clone(), last, 4 * bs)),
                lambda: alloc.free(torch.cat([*batch.token_slots, *out])))

    return {"alloc_decode (8 requests, 1 token each)": decode, "alloc_extend (8 requests, 4 draft tokens each)": extend}


def _kvtrap_ops(alloc, make, reps: int) -> float:
    """Mean aten ops per call that kvtrap's own code issues (the innermost frame outside torch is kvtrap's)."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    import kvtrap

    root = str(Path(kvtrap.__file__).parent)
    counts = [0]

    class _Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            frame = next((f for f in reversed(traceback.extract_stack()) if f"{os.sep}torch{os.sep}" not in f.filename
                          and f.filename != __file__), None)  # fmt: skip
            counts[0] += frame is not None and frame.filename.startswith(root)
            return func(*args, **(kwargs or {}))

    for _ in range(reps):
        call, cleanup = make(alloc)
        with _Ops():
            call()
        cleanup()
    return counts[0] / reps


def _host_only(args) -> int:
    """``--host-only``: kvtrap's own host time per allocator call in drain mode, the check launches stubbed."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch  # noqa: F401 - imported before SGLang, as a server does
    from helpers import sglang_world as w

    import kvtrap
    from kvtrap.capture import allocator_kernels

    class _NoLaunch:  # ``kernel[grid](...)`` that launches nothing
        def __getitem__(self, grid):
            return lambda *a, **k: None

    allocator_kernels._release_check_kernel = _NoLaunch()
    allocator_kernels._slot_check_kernel = _NoLaunch()
    cases = {**_alloc_cases(w), **_cases(w)}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in cases.items():
            r = {}
            for side, ctx in (("unarmed", nullcontext()), ("armed_free_checks_off", kvtrap.armed(dump_dir=tmp, free_checks="off", allocator_trap="drain")),
                              ("armed_drain", kvtrap.armed(dump_dir=tmp, allocator_trap="drain"))):  # fmt: skip
                with ctx:
                    alloc = w.make_allocator(w.make_pool(full_pages=256, swa_pages=128))
                    _time(alloc, make, 50, lambda: None)  # warm-up
                    r[side] = round(statistics.median(_time(alloc, make, args.reps, lambda: None)), 1)
                    if side != "unarmed":
                        r[f"{side}_kvtrap_ops"] = _kvtrap_ops(alloc, make, 10)
            r["drain_host_cost_us"] = round(r["armed_drain"] - r["unarmed"], 1)
            rows[name] = r
    note = ("median host us per call; the drain-mode check launches are no-ops here, so the armed cost is kvtrap's "
            "Python and torch ops alone (on CPU, where an aten op costs ~1-3 us; a GPU host pays several us per "
            "dispatch, hence the op counts). SGLang's own alloc kernels run in Triton's interpreter on CPU: the "
            "unarmed alloc times are not a GPU figure.")
    meta = run_meta("free_path_bench.py", ("kvtrap", "sglang", "torch", "triton"), device="cpu",
                    page_size=w.PAGE_SIZE, reps=args.reps, note=note)
    lines = ["| call | unarmed us | armed, free checks off us | armed, drain us | drain host cost us |"
             " kvtrap aten ops (off / drain) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        lines.append(f"| {name} | {r['unarmed']} | {r['armed_free_checks_off']} | {r['armed_drain']} | "
                     f"{r['drain_host_cost_us']} | {r['armed_free_checks_off_kvtrap_ops']:g} / "
                     f"{r['armed_drain_kvtrap_ops']:g} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_results(args.out, "free-path-cpu-host-only", "kvtrap's host cost per SWA allocator call, drain mode, "
                      "check launches stubbed (cpu)", meta, rows, table)  # fmt: skip
    return 0




def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=500)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--host-only", action="store_true", help="CPU: kvtrap's own host cost, check launches stubbed")
    args = ap.parse_args()
    if args.host_only:
        if args.device != "cpu":
            print("free_path_bench: --host-only runs on cpu", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # drain mode on CPU tensors (the launches are stubbed)
        return _host_only(args)
    if args.device == "cpu":  # the drain-mode kernels need it on CPU (before any kernel is decorated)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from helpers import sglang_world as w

    import kvtrap

    if args.device == "cuda" and not torch.cuda.is_available():
        print("free_path_bench: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    rows, ops = {}, {}
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
                    aten, launches = _count(alloc, make, 20)
                    ops.setdefault(name, {})[side] = {"aten_ops": aten, "triton_launches": launches}
            for mode in ("call", "drain"):
                sides[f"{mode}_cost_us"] = round(sides[f"armed_checks_{mode}"] - sides["armed_free_checks_off"], 1)
            rows[name] = sides
            rows[name]["dispatches_per_call"] = ops[name]
    note = ("median host us per free call, device idle before each call. On a GPU call mode also waits for its own "
            "kernels, and in a server for the running forward (not measured here). On CPU drain mode's kernel runs in "
            "Triton's interpreter: its CPU time is not a cost figure, its dispatch count is.")
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    meta = run_meta("free_path_bench.py", ("kvtrap", "sglang", "torch"), device=device, page_size=w.PAGE_SIZE,
                    reps=args.reps, note=note)
    lines = ["| free call | unarmed us | armed, checks off us | checks on, call mode us | checks on, drain mode us |"
             " call cost us | drain cost us |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        lines.append(f"| {name} | {r['unarmed']} | {r['armed_free_checks_off']} | {r['armed_checks_call']} | "
                     f"{r['armed_checks_drain']} | {r['call_cost_us']} | {r['drain_cost_us']} |")
    lines += ["", "Dispatched per free call (aten ops + Triton launches, any origin):", "",
              "| free call | unarmed | armed, checks off | checks on, call mode | checks on, drain mode |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name, sides in ops.items():
        cells = [f"{v['aten_ops']:g} + {v['triton_launches']:g}" for v in sides.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        slug = "cpu" if args.device == "cpu" else meta["device"].lower().replace("nvidia ", "nvidia-").replace(" ", "-")
        write_results(args.out, f"free-path-{slug}", f"Free-path check cost per SWA allocator free call ({meta['device']})",
                      meta, rows, table)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
