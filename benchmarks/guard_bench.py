"""Benchmark the device guard against the launch floor, a host-sync check and a real decode step.

Usage: python benchmarks/guard_bench.py --out benchmarks/results [--quick]

Times (CUDA events, median of several repetitions; graph numbers are per launch from a graph holding
``--per-graph`` launches):
* guard launch for bs in {1, 8, 64, 256} x widths {64, 512, 1024} pages (every column live: the worst
  case), under CUDA-graph replay and eager;
* (a) an empty Triton kernel, the launch floor, the same two ways;
* (b) the host-sync check ``(pt >= n).any().item()`` (eager only: it cannot be captured);
* (c) a 30-layer decode step of SGLang's Triton decode attention at E4B-like shapes (8 q heads,
  2 kv heads, head dim 256, page size 64, 8k tokens per request) with and without the guard, replayed
  as a CUDA graph (the guard is captured in the same graph: the capture proves it does no host sync);
* (d) ``--sections fused``: SGLang's in-graph metadata builder (``update_trtllm_mha_graph_metadata``)
  alone, kvtrap's fused builder + guard (``kvtrap.capture.guard.fused_metadata``), and the builder followed by
  the separate guard, each under CUDA-graph replay at the same bs x widths, full tables and with the
  SWA table; the fused path's *added* time is (fused - builder), compared with the empty-kernel floor.
* (e) ``--sections variants``: the fused build's launch shapes (columns per step, warps:
  ``FUSED_VARIANTS``) against SGLang's builder in the same cells; written to
  guard-<device>-fused-variants.json / .md only.
* (f) ``--sections ragged``: the ragged guard (``guard_ragged_``, triton's ``kv_indptr`` / ``kv_indices``) for bs
  in ``--bs`` x tokens per request in ``--ragged-tokens`` (every id live and in range), over an ids buffer as
  large as SGLang's ``cuda_graph_kv_indices`` (``--ragged-max-bs`` x the longest request), under CUDA-graph
  replay and eager, against the empty-kernel floor; written to guard-<device>-ragged.json / .md only.
Writes guard-<device>.json and guard-<device>.md into ``--out``. Sections not run keep what those files
already hold (the fused section is merged into them: key ``fused`` / a marked block in the .md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import triton

from kvtrap.capture.guard import GuardRecord, guard_page_table_
from kvtrap.capture.guard.ragged_kernel import guard_ragged_, splits_for


@triton.jit
def _empty_kernel(x_ptr):
    pass


def _empty(x: torch.Tensor) -> None:
    _empty_kernel[(1,)](x)


def _graph_time_us(fn, per_graph: int, reps: int, iters: int) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(per_graph):
            fn()
    g.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            g.replay()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) * 1e3 / (iters * per_graph))
    del g
    return statistics.median(out)


def _eager_time_us(fn, reps: int, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e6 / iters)
    return statistics.median(out)


def _table(bs: int, width: int, num_pages: int, ps: int) -> tuple[torch.Tensor, torch.Tensor]:
    pt = torch.randint(1, num_pages, (bs, width), dtype=torch.int32, device="cuda")
    sl = torch.full((bs,), width * ps, dtype=torch.int32, device="cuda")
    return pt, sl


def bench_guard(args: argparse.Namespace) -> list[dict]:
    ps, num_pages = 64, 1_000_000
    rec = GuardRecord(64)
    x = torch.zeros(1, device="cuda")
    floor_graph = _graph_time_us(lambda: _empty(x), args.per_graph, args.reps, args.iters)
    floor_eager = _eager_time_us(lambda: _empty(x), args.reps, args.iters * 10)
    rows = []
    for bs in args.bs:
        for width in args.widths:
            pt, sl = _table(bs, width, num_pages, ps)

            def guard(pt: torch.Tensor = pt, sl: torch.Tensor = sl) -> None:
                guard_page_table_(pt, sl, ps, num_pages, rec, 0, 0)

            def host_check(pt: torch.Tensor = pt) -> None:
                (pt >= num_pages).any().item()

            g = _graph_time_us(guard, args.per_graph, args.reps, args.iters)
            e = _eager_time_us(guard, args.reps, args.iters * 10)
            h = _eager_time_us(host_check, args.reps, args.iters * 10)
            assert rec.drain().total == 0  # valid tables: nothing recorded, nothing redirected
            row = {
                "bs": bs, "width_pages": width,
                "guard_graph_us": g, "empty_graph_us": floor_graph, "graph_ratio": g / floor_graph,
                "guard_eager_us": e, "empty_eager_us": floor_eager, "eager_ratio": e / floor_eager,
                "host_sync_check_us": h,
            }
            print(
                f"guard bs={bs:4d} width={width:5d}: graph {g:7.2f} us ({g / floor_graph:4.2f}x floor "
                f"{floor_graph:.2f}) | eager {e:7.2f} us ({e / floor_eager:4.2f}x floor {floor_eager:.2f}) "
                f"| host-sync check {h:7.2f} us",
                flush=True,
            )
            rows.append(row)
    return rows


def bench_decode(args: argparse.Namespace) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers.victim import PagedDecode  # the same victim the GPU tests use

    rows = []
    for bs in args.bs:
        dec = PagedDecode(bs, args.seq_len, layers=args.layers)
        rec = GuardRecord(64)
        plain = _graph_time_us(partial(dec.step, None), 1, args.reps, args.decode_iters)

        def guarded_step(dec: PagedDecode = dec, rec: GuardRecord = rec) -> None:
            dec.build_()
            dec.guard_(rec)
            dec.expand_()
            dec.attend()

        guarded = _graph_time_us(guarded_step, 1, args.reps, args.decode_iters)
        g_alone = _graph_time_us(partial(dec.guard_, rec), args.per_graph, args.reps, args.iters)
        torch.cuda.synchronize()
        assert rec.drain().total == 0
        overhead = guarded - plain
        row = {
            "bs": bs, "layers": args.layers, "seq_len": args.seq_len, "width_pages": dec.width,
            "step_us": plain, "step_guarded_us": guarded, "overhead_us": overhead,
            "overhead_pct": 100 * overhead / plain, "guard_alone_us": g_alone,
            "guard_alone_pct": 100 * g_alone / plain,
        }
        print(
            f"decode bs={bs:4d} ({args.layers} layers, {args.seq_len} tok): step {plain:9.1f} us | "
            f"guarded {guarded:9.1f} us | diff {overhead:+7.2f} us ({row['overhead_pct']:+.3f}%) | "
            f"guard alone {g_alone:.2f} us ({row['guard_alone_pct']:.3f}%)",
            flush=True,
        )
        rows.append(row)
        del dec
        torch.cuda.empty_cache()
    return rows


def _builder_world(bs: int, width: int, ps: int, swa: bool) -> tuple[dict, dict]:
    """One in-graph build at the worst case (every column live), as SGLang's backend calls it."""
    full_pages = bs * width + 1
    pages = (torch.randperm(full_pages - 1, device="cuda") + 1).reshape(bs, width)
    r2t = torch.zeros(bs + 1, width * ps, dtype=torch.int32, device="cuda")
    r2t[1:] = (pages[:, :, None] * ps + torch.arange(ps, device="cuda")).reshape(bs, -1).to(torch.int32)
    kw: dict = dict(
        req_pool_indices=torch.arange(1, bs + 1, device="cuda"),
        seq_lens=torch.full((bs,), width * ps, dtype=torch.int64, device="cuda"),
        req_to_token=r2t,
        cache_seqlens=torch.zeros(bs, dtype=torch.int32, device="cuda"),
        cu_seqlens_k=torch.zeros(bs + 1, dtype=torch.int32, device="cuda"),
        page_table=torch.zeros(bs, width, dtype=torch.int32, device="cuda"),
        bs=bs, seqlen_offset=0, max_seq_pages=width, page_size=ps,
    )
    bounds = {"full": full_pages, "swa": 0, "mapping": None}
    if swa:
        swa_pages = max(2, full_pages // 4)
        fp = torch.arange(full_pages, device="cuda")
        sp = torch.where(fp > 0, 1 + fp % (swa_pages - 1), 0)
        mapping = torch.zeros((full_pages - 1) * ps + ps + 1, dtype=torch.int64, device="cuda")
        mapping[: full_pages * ps] = (sp[:, None] * ps + torch.arange(ps, device="cuda")).reshape(-1)
        kw.update(
            swa_mapping=mapping, swa_page_table=torch.zeros_like(kw["page_table"]),
            out_cache_loc=r2t[1:, -1].to(torch.int64), swa_out_cache_loc=torch.zeros(bs, dtype=torch.int64,
                                                                                     device="cuda"),
        )
        bounds.update(swa=swa_pages, mapping=mapping)
    return kw, bounds


def _fused_cells(args: argparse.Namespace, ps: int):
    """Every (swa, bs, width) cell of the fused-build benchmarks: SGLang's builder inputs and bounds, a fresh
    guard record and the GuardSpec over it; freed after the caller is done with the cell."""
    from kvtrap.capture.guard.fused_metadata import GuardSpec

    for swa in (False, True):
        for bs in args.bs:
            for width in args.widths:
                kw, b = _builder_world(bs, width, ps, swa)
                rec = GuardRecord(64)
                spec = GuardSpec(rec, b["full"], rec.register_table("page_table", "full"),
                                 swa_bound=b["swa"] if swa else None,
                                 swa_table_id=rec.register_table("swa_page_table", "swa"), swa_mapping=b["mapping"])
                yield swa, bs, width, kw, b, rec, spec
                del kw, b, rec, spec
                torch.cuda.empty_cache()


def bench_fused(args: argparse.Namespace) -> list[dict]:
    from sglang.kernels.ops.attention.trtllm_mha_graph_metadata import update_trtllm_mha_graph_metadata

    from kvtrap.capture.guard.fused_metadata import GuardSpec, update_metadata_guarded_

    ps = 64
    x = torch.zeros(1, device="cuda")
    floor = _graph_time_us(lambda: _empty(x), args.per_graph, args.reps, args.iters)
    rows = []
    for swa, bs, width, kw, b, rec, spec in _fused_cells(args, ps):

        def builder(kw: dict = kw) -> None:
            update_trtllm_mha_graph_metadata(**kw)

        def fused(kw: dict = kw, spec: GuardSpec = spec) -> None:
            update_metadata_guarded_(spec=spec, **kw)

        def separate(kw: dict = kw, b: dict = b, rec: GuardRecord = rec, swa: bool = swa) -> None:
            update_trtllm_mha_graph_metadata(**kw)
            guard_page_table_(kw["page_table"], kw["cache_seqlens"], ps, b["full"], rec, 0)
            if swa:
                guard_page_table_(kw["swa_page_table"], kw["cache_seqlens"], ps, b["swa"], rec, 1,
                                  swa_mapping=b["mapping"], full_table=kw["page_table"])

        # one clean eager run of each: identical tables, nothing recorded
        fused()
        ref = {k: kw[k].clone() for k in ("page_table", "cache_seqlens", "cu_seqlens_k")}
        builder()
        assert all(torch.equal(ref[k], kw[k]) for k in ref)
        t_b = _graph_time_us(builder, args.per_graph, args.reps, args.iters)
        t_f = _graph_time_us(fused, args.per_graph, args.reps, args.iters)
        t_s = _graph_time_us(separate, args.per_graph, args.reps, args.iters)
        assert rec.drain().total == 0
        row = {
            "swa": swa, "bs": bs, "width_pages": width, "builder_graph_us": t_b, "fused_graph_us": t_f,
            "builder_plus_guard_graph_us": t_s, "fused_added_us": t_f - t_b,
            "separate_added_us": t_s - t_b, "empty_graph_us": floor,
            "fused_added_over_floor": (t_f - t_b) / floor, "separate_added_over_floor": (t_s - t_b) / floor,
        }
        print(
            f"fused swa={int(swa)} bs={bs:4d} width={width:5d}: builder {t_b:6.2f} | fused {t_f:6.2f} "
            f"(+{t_f - t_b:5.2f}, {(t_f - t_b) / floor:5.2f}x floor) | builder+guard {t_s:6.2f} "
            f"(+{t_s - t_b:5.2f}, {(t_s - t_b) / floor:5.2f}x) us; floor {floor:.2f}",
            flush=True,
        )
        rows.append(row)
    return rows


# (columns per loop step, warps) as a function of the table width, for ``--sections variants``; each
# replaces fused_metadata._row_config for its measurement (the library has no override parameter);
# "shipped" is what update_metadata_guarded_ picks by itself
FUSED_VARIANTS = {
    "row512": lambda w: (512, 4),  # SGLang's 512-column steps
    "row1024w4": lambda w: (1024 if w > 512 else 512, 4),  # wide rows in one step
    "row1024w8": lambda w: (1024 if w > 512 else 512, 8 if w > 512 else 4),
    "fit": lambda w: (min(triton.next_power_of_2(w), 1024), 2 if w <= 128 else 4 if w <= 512 else 8),
}


def bench_fused_variants(args: argparse.Namespace) -> list[dict]:
    """Launch shapes of the fused build (columns per step, warps), same cells."""
    from sglang.kernels.ops.attention.trtllm_mha_graph_metadata import update_trtllm_mha_graph_metadata

    from kvtrap.capture.guard import fused_metadata
    from kvtrap.capture.guard.fused_metadata import GuardSpec, update_metadata_guarded_

    ps = 64
    x = torch.zeros(1, device="cuda")
    floor = _graph_time_us(lambda: _empty(x), args.per_graph, args.reps, args.iters)
    rows = []
    for swa, bs, width, kw, _b, rec, spec in _fused_cells(args, ps):
        update_trtllm_mha_graph_metadata(**kw)
        ref = {k: kw[k].clone() for k in ("page_table", "cache_seqlens", "cu_seqlens_k")}
        t_b = _graph_time_us(lambda kw=kw: update_trtllm_mha_graph_metadata(**kw), args.per_graph,
                             args.reps, args.iters)
        row = {"swa": swa, "bs": bs, "width_pages": width, "builder_graph_us": t_b, "empty_graph_us": floor}
        shipped = fused_metadata._row_config
        for name, cfg in FUSED_VARIANTS.items():
            fused_metadata._row_config = lambda w, cfg=cfg: cfg(w)  # this variant's launch shape
            try:

                def fused(kw: dict = kw, spec: GuardSpec = spec) -> None:
                    update_metadata_guarded_(spec=spec, **kw)

                fused()
                assert all(torch.equal(ref[k], kw[k]) for k in ref), name
                row[name] = _graph_time_us(fused, args.per_graph, args.reps, args.iters)
            finally:
                fused_metadata._row_config = shipped
        row["builder_again_graph_us"] = _graph_time_us(
            lambda kw=kw: update_trtllm_mha_graph_metadata(**kw), args.per_graph, args.reps, args.iters)
        assert rec.drain().total == 0
        print(f"variants swa={int(swa)} bs={bs:4d} width={width:5d}: builder {t_b:5.2f}/"
              f"{row['builder_again_graph_us']:5.2f} | " + " | ".join(
                  f"{n} +{row[n] - t_b:5.2f}" for n in FUSED_VARIANTS) + f" | floor {floor:.2f}", flush=True)
        rows.append(row)
    return rows


def _variants_markdown(meta: dict, rows: list[dict]) -> str:
    names = list(FUSED_VARIANTS)
    lines = [
        "# Fused metadata build + guard: kernel variants (CUDA-graph replay, page size 64, every column live)",
        "",
        f"- date: {meta['date']}; device {meta['device']} ({meta['capability']}); torch {meta['torch']},"
        f" triton {meta['triton']}, sglang {meta['sglang']}, python {meta['python']}",
        f"- command: `{meta['command']}`",
        "- per launch, from a CUDA graph of 20 launches replayed; cells: added us over SGLang's builder (its time"
        " measured before the variants and again after them), and added / floor (empty Triton kernel).",
        "- variants (columns per step, warps, once-per-row check): step512 = (512, 4, per step: the first fused"
        " kernel); row512 = (512, 4, per row); row1024w4 = (1024 for width > 512 else 512, 4, per row);"
        " row1024w8 = the same with 8 warps for width > 512; fit = (next power of two of the width up to 1024,"
        " 2 / 4 / 8 warps, per row).",
        "",
        "| SWA | bs | width | builder us | builder again us | " + " | ".join(names) + " |",
        "|---|---|---|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        f = r["empty_graph_us"]
        cells = [f"{r[n] - r['builder_graph_us']:+.2f} ({(r[n] - r['builder_graph_us']) / f:+.2f}x)" for n in names]
        lines.append(f"| {'yes' if r['swa'] else 'no'} | {r['bs']} | {r['width_pages']} | {r['builder_graph_us']:.2f}"
                     f" | {r['builder_again_graph_us']:.2f} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


FUSED_BEGIN, FUSED_END = "<!-- fused:begin -->", "<!-- fused:end -->"


def _fused_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        FUSED_BEGIN,
        "## Fused metadata build + guard (CUDA-graph replay, page size 64, every column live)",
        "",
        f"- date: {meta['date']}; device {meta['device']} ({meta['capability']}); torch {meta['torch']},"
        f" triton {meta['triton']}, sglang {meta['sglang']}, python {meta['python']}",
        f"- command: `{meta['command']}`",
        f"- per launch, from a CUDA graph of {meta['per_graph']} launches replayed. builder: SGLang's"
        " `update_trtllm_mha_graph_metadata`; fused: `kvtrap.capture.guard.fused_metadata.update_metadata_guarded_`"
        " (same outputs + guard, one launch); builder + guard: SGLang's builder then `guard_page_table_` per"
        " table (the non-fused path). added = path - builder; floor = an empty Triton kernel in this run.",
        "",
        "| SWA | bs | width (pages) | builder us | fused us | fused added us | added / floor |"
        " builder + guard us | separate added us | added / floor | floor us |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {'yes' if r['swa'] else 'no'} | {r['bs']} | {r['width_pages']} | {r['builder_graph_us']:.2f} |"
            f" {r['fused_graph_us']:.2f} | {r['fused_added_us']:+.2f} | {r['fused_added_over_floor']:+.2f} |"
            f" {r['builder_plus_guard_graph_us']:.2f} | {r['separate_added_us']:+.2f} |"
            f" {r['separate_added_over_floor']:+.2f} | {r['empty_graph_us']:.2f} |"
        )
    lines += ["", FUSED_END, ""]
    return "\n".join(lines)


def _merge_fused(md_text: str, block: str) -> str:
    if FUSED_BEGIN in md_text and FUSED_END in md_text:
        head, rest = md_text.split(FUSED_BEGIN, 1)
        tail = rest.split(FUSED_END, 1)[1].lstrip("\n")
        return head + block + tail
    return md_text.rstrip("\n") + "\n\n" + block


def _markdown(meta: dict, guard_rows: list[dict], decode_rows: list[dict]) -> str:
    lines = [
        f"# Device guard benchmark: {meta['device']}",
        "",
        f"- date: {meta['date']}; torch {meta['torch']}, triton {meta['triton']}, sglang {meta['sglang']},"
        f" python {meta['python']}",
        f"- command: `{meta['command']}`",
        "- graph times: per launch, from a CUDA graph of "
        f"{meta['per_graph']} launches replayed; eager times: host loop, synchronised at the end.",
        "- goals: guard launch <= 1.5x the empty-kernel floor; <= 0.5% of the decode step; no host sync",
        "  inside capture (every graph below captured the guard).",
        "",
        "## Guard launch (page size 64, every column live)",
        "",
        "| bs | width (pages) | guard graph us | empty graph us | ratio | guard eager us | empty eager us | ratio |"
        " host-sync check us |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in guard_rows:
        lines.append(
            f"| {r['bs']} | {r['width_pages']} | {r['guard_graph_us']:.2f} | {r['empty_graph_us']:.2f} |"
            f" {r['graph_ratio']:.2f} | {r['guard_eager_us']:.2f} | {r['empty_eager_us']:.2f} |"
            f" {r['eager_ratio']:.2f} | {r['host_sync_check_us']:.2f} |"
        )
    lines += [
        "",
        "## Decode step (SGLang Triton decode attention, 8 q / 2 kv heads, head dim 256, CUDA graph)",
        "",
        "| bs | layers | tokens/request | step us | step + guard us | difference | guard alone us | guard alone % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in decode_rows:
        lines.append(
            f"| {r['bs']} | {r['layers']} | {r['seq_len']} | {r['step_us']:.1f} | {r['step_guarded_us']:.1f} |"
            f" {r['overhead_us']:+.2f} us ({r['overhead_pct']:+.3f}%) | {r['guard_alone_us']:.2f} |"
            f" {r['guard_alone_pct']:.3f}% |"
        )
    lines.append("")
    return "\n".join(lines)


def bench_ragged(args: argparse.Namespace) -> list[dict]:
    rows_bound = 10_000_000
    rec = GuardRecord(64)
    tid = rec.register_table("kv_indices", "full", ragged=True)
    x = torch.zeros(1, device="cuda")
    floor_graph = _graph_time_us(lambda: _empty(x), args.per_graph, args.reps, args.iters)
    floor_eager = _eager_time_us(lambda: _empty(x), args.reps, args.iters * 10)
    numel = args.ragged_max_bs * max(args.ragged_tokens)
    ids = torch.randint(0, rows_bound, (numel,), dtype=torch.int64, device="cuda")
    out = []
    for bs in args.bs:
        for tokens in args.ragged_tokens:
            if bs * tokens > numel:
                continue
            indptr = (torch.arange(bs + 1, dtype=torch.int32) * tokens).to("cuda")
            guard = partial(guard_ragged_, indptr, ids, rows_bound, rec, tid)
            g = _graph_time_us(guard, args.per_graph, args.reps, args.iters)
            e = _eager_time_us(guard, args.reps, args.iters * 10)
            assert rec.drain().total == 0  # every id in range: nothing recorded, nothing redirected
            out.append({"bs": bs, "tokens_per_request": tokens, "buffer_ids": numel,
                        "splits": splits_for(bs, numel), "guard_graph_us": g, "empty_graph_us": floor_graph,
                        "graph_ratio": g / floor_graph, "guard_eager_us": e, "empty_eager_us": floor_eager})
            print(f"ragged bs={bs:4d} tokens={tokens:6d}: graph {g:7.2f} us ({g / floor_graph:4.2f}x floor) | "
                  f"eager {e:7.2f} us", flush=True)
    return out


def _ragged_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Ragged device guard on {meta['device']}", "", f"`{meta['command']}`, {meta['date']}, torch"
             f" {meta['torch']}, triton {meta['triton']}, sglang {meta['sglang']}; every id live and in range;"
             " per launch", "", "| bs | tokens / request | splits | graph replay (us) | x floor | eager (us) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bs']} | {r['tokens_per_request']} | {r['splits']} | {r['guard_graph_us']:.2f} |"
                     f" {r['graph_ratio']:.2f} | {r['guard_eager_us']:.2f} |")
    if rows:
        lines += ["", f"Empty-kernel floor: {rows[0]['empty_graph_us']:.2f} us (graph), {rows[0]['empty_eager_us']:.2f}"
                  " us (eager)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--bs", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 512, 1024])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--per-graph", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--decode-iters", type=int, default=3)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--ragged-tokens", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--ragged-max-bs", type=int, default=256)
    ap.add_argument("--sections", nargs="+", choices=["guard", "decode", "fused", "variants", "ragged"],
                    default=["guard", "decode"])
    args = ap.parse_args()
    sections = set(args.sections) - ({"decode"} if args.skip_decode else set())

    import importlib.metadata as md

    try:
        sgl = md.version("sglang")
    except md.PackageNotFoundError:
        sgl = None
    device = torch.cuda.get_device_name()
    meta = {
        "device": device,
        "capability": "sm_{}{}".format(*torch.cuda.get_device_capability()),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "triton": triton.__version__, "sglang": sgl,
        "python": platform.python_version(), "command": "python " + " ".join(sys.argv),
        "per_graph": args.per_graph,
    }
    print(json.dumps(meta), flush=True)
    guard_rows = bench_guard(args) if "guard" in sections else None
    decode_rows = bench_decode(args) if "decode" in sections else []
    fused_rows = bench_fused(args) if "fused" in sections else None
    variant_rows = bench_fused_variants(args) if "variants" in sections else None
    ragged_rows = bench_ragged(args) if "ragged" in sections else None
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    args.out.mkdir(parents=True, exist_ok=True)
    if ragged_rows is not None:
        (args.out / f"guard-{slug}-ragged.json").write_text(json.dumps({"meta": meta, "rows": ragged_rows}, indent=2))
        (args.out / f"guard-{slug}-ragged.md").write_text(_ragged_markdown(meta, ragged_rows))
    json_path, md_path = args.out / f"guard-{slug}.json", args.out / f"guard-{slug}.md"
    data = json.loads(json_path.read_text()) if json_path.exists() else {}
    md_text = md_path.read_text() if md_path.exists() else ""
    if guard_rows is not None:
        data.update(meta=meta, guard=guard_rows, decode=decode_rows)
        md_text = _markdown(meta, guard_rows, decode_rows)
    if fused_rows is not None:
        data["fused"] = {"meta": meta, "rows": fused_rows}
        md_text = _merge_fused(md_text, _fused_markdown(meta, fused_rows))
    if variant_rows is not None:
        (args.out / f"guard-{slug}-fused-variants.json").write_text(
            json.dumps({"meta": meta, "rows": variant_rows}, indent=2))
        (args.out / f"guard-{slug}-fused-variants.md").write_text(_variants_markdown(meta, variant_rows))
    if guard_rows is None and fused_rows is None:
        print("wrote the variants / ragged files only", flush=True)
        return 0
    json_path.write_text(json.dumps(data, indent=2))
    md_path.write_text(md_text)
    print(f"wrote {args.out}/guard-{slug}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
