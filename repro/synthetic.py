"""``kvtrap repro synthetic``: SGLang #26957 without weights, on a real paged-attention kernel.

The state, at E4B-like sizes (page 64, 2 KV heads, head dim 256, sliding window 512): a full KV pool
of ``--full-pages`` pages and an SWA pool of ``--swa-pages`` (much smaller, as SGLang sizes it for the
window), a batch whose requests hold high full-pool pages (the pool is ~85% full, as in the report),
and the #26957 index-space mix-up: the SWA layer is handed the *full-pool* page table while it reads
the SWA pool's K/V buffers. The victim is SGLang's own Triton decode attention
(``sglang.kernels.ops.attention.decode_attention``), fed the page table expanded to token slots.

Three runs, each a separate step of the report:

1. ``unarmed`` (child process): the kernel reads past the SWA buffers and the process dies with
   ``CUDA error: an illegal memory access was encountered``;
2. ``armed``: kvtrap's trtllm_mha checks (the same :func:`kvtrap.capture.verdict.judge_layer` the SGLang
   hook runs) raise :class:`kvtrap.KVTrapError` before the launch, with a dump that
   ``kvtrap dump explain`` attributes to #26957;
3. ``--fix``: the SWA layer gets the SWA-translated table (what kvtrap's lockstep fix restores in a
   server): the check passes and the kernel completes.

SGLang's memory pools and attention backends do not import where ``sgl_kernel`` is missing (the GPU
machine here), so this repro builds the tables and buffers itself and describes the backend state in
the dump; the server repros (``e4b-summarize``...) exercise the real classes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtrap.repro.scenarios import ComponentContext, ComponentResult, Needs, Scenario, register

PAGE = 64
KV_HEADS, Q_HEADS, HEAD_DIM, WINDOW = 2, 8, 256, 512


@dataclass(frozen=True)
class Shape:
    full_pages: int = 8192  # 512k tokens: 64 requests x 8k, the summarize workload
    swa_pages: int = 640  # window 512 = 8 pages per request x 64 requests + headroom
    bs: int = 8
    seq_len: int = 8000
    fill: float = 0.85  # fraction of the full pool in use before this batch's pages

    def pages_per_req(self) -> int:
        return (self.seq_len + PAGE - 1) // PAGE


def build(shape: Shape, device: str = "cuda") -> dict[str, Any]:
    """Buffers and tables of the failing state (everything on ``device``)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    ppr = shape.pages_per_req()
    first_free = int(shape.full_pages * shape.fill)
    if first_free + shape.bs * ppr > shape.full_pages:
        raise ValueError("the batch does not fit the full pool at this fill; lower --fill or --bs")
    full_ids = torch.arange(first_free, first_free + shape.bs * ppr, dtype=torch.int32).reshape(shape.bs, ppr)
    full_ids = full_ids[:, torch.randperm(ppr, generator=g)]  # pages are not in order in a real pool
    # SWA slots of the last window's pages (the only ones an SWA layer keeps); others go back to page 0
    swa_ids = torch.zeros_like(full_ids)
    window_pages = (WINDOW + PAGE - 1) // PAGE + 1
    swa_ids[:, -window_pages:] = (
        torch.arange(shape.bs * window_pages, dtype=torch.int32).reshape(shape.bs, window_pages) % shape.swa_pages
    ) + 1
    rows = (shape.swa_pages + 1) * PAGE  # SGLang: size + page_size rows, page 0 is padding
    dtype = torch.bfloat16
    return {
        "page_table": full_ids.to(device),
        "swa_page_table": swa_ids.to(device),
        "cache_seqlens": torch.full((shape.bs,), shape.seq_len, dtype=torch.int32, device=device),
        "k_swa": torch.randn(rows, KV_HEADS, HEAD_DIM, dtype=dtype, device=device),
        "v_swa": torch.randn(rows, KV_HEADS, HEAD_DIM, dtype=dtype, device=device),
        "q": torch.randn(shape.bs, Q_HEADS, HEAD_DIM, dtype=dtype, device=device),
    }


def attend(state: dict[str, Any], table: Any, shape: Shape) -> Any:
    """SGLang's Triton decode attention over the SWA buffers with ``table`` (token slots = page*64+i)."""
    import torch
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

    bs, seq = shape.bs, shape.seq_len
    offs = torch.arange(PAGE, dtype=torch.int64, device=table.device)
    slots = (table.to(torch.int64)[:, :, None] * PAGE + offs).reshape(bs, -1)[:, :seq].reshape(-1)
    kv_indptr = (torch.arange(bs + 1, dtype=torch.int32) * seq).to(table.device)
    splits = 8
    out = torch.zeros(bs, Q_HEADS, HEAD_DIM, dtype=state["q"].dtype, device=table.device)
    logits = torch.empty(bs, Q_HEADS, splits, HEAD_DIM, dtype=torch.float32, device=table.device)
    lse = torch.empty(bs, Q_HEADS, splits, dtype=torch.float32, device=table.device)
    num_splits = torch.full((bs,), splits, dtype=torch.int32, device=table.device)
    decode_attention_fwd(
        state["q"], state["k_swa"], state["v_swa"], out, kv_indptr, slots, logits, lse, num_splits, splits,
        HEAD_DIM**-0.5, 1.0, 1.0, page_size=PAGE,
    )
    torch.cuda.synchronize()
    return out


def layer_check(state: dict[str, Any], shape: Shape, *, fixed: bool):
    """The :class:`LayerSnapshot` the SGLang hook would build for the draft's first SWA layer."""
    from kvtrap.capture.sglang_view import LayerSnapshot
    from kvtrap.record.context import BackendState, LivePool, PoolPages, TableInfo

    handed = "swa_page_table" if fixed else "page_table"
    drift = {} if fixed else {
        "_swa_kv_pool": "None, but the live pool is SWAKVPool (the target's, swapped in by the view)",
        "use_sliding_window_kv_pool": "False, but the live pool is an SWA pool",
        "_swa_full_to_swa_mapping": "None, but the live pool has a full->SWA mapping",
    }
    swa_pages, full_pages = shape.swa_pages + 1, shape.full_pages + 1
    return LayerSnapshot(
        where="TRTLLMHAAttnBackend.forward_decode (synthetic #26957 state)",
        layer_id=0,
        layer_type="swa",
        window=WINDOW,
        index_in_pool=0,
        page_size=PAGE,
        bound=swa_pages,
        handed_name=handed,
        tables={"page_table": state["page_table"], "swa_page_table": state["swa_page_table"] if fixed else None},
        cache_seqlens=state["cache_seqlens"],
        drift=drift,
        pools={"full": PoolPages(pages=full_pages, rows=full_pages * PAGE),
               "swa": PoolPages(pages=swa_pages, rows=swa_pages * PAGE)},
        backend=BackendState(
            class_="TRTLLMHAAttnBackend",
            use_sliding_window_kv_pool=fixed,
            swa_kv_pool="SWAKVPool (target)" if fixed else None,
            swa_kv_pool_is_live=fixed,
            has_swa_full_to_swa_mapping=fixed,
            swa_mapping_is_live=fixed,
            max_context_len=None,  # no server here: unknown, as on a backend without the attribute
            speculative_num_draft_tokens=None,
        ),
        live_pool=LivePool(class_="SWAKVPool", id="synthetic"),
        table_bounds={
            "page_table": TableInfo(pool="full", bound=full_pages, handed_to_layer=not fixed,
                                    shape=list(state["page_table"].shape)),
            **({"swa_page_table": TableInfo(pool="swa", bound=swa_pages, handed_to_layer=True,
                                            shape=list(state["swa_page_table"].shape))} if fixed else {}),
        },
        forward_mode="DECODE",
    )


def check(state: dict[str, Any], shape: Shape, config: Any, *, fixed: bool) -> None:
    """kvtrap's checks for the SWA layer, as the SGLang hook runs them (raises KVTrapError + dump)."""
    from kvtrap.capture import checks
    from kvtrap.capture.session import Session
    from kvtrap.capture.verdict import judge_layer

    view = layer_check(state, shape, fixed=fixed)
    scan = checks.scan_page_table(view.tables[view.handed_name], view.cache_seqlens, PAGE, view.bound)
    verdict = judge_layer(view, scan)
    if verdict is not None:  # raises KVTrapError with a dump in raise mode
        Session(config).report(verdict.violation, verdict.context, verdict.tensors,
                               safe_to_continue=verdict.safe_to_continue)


def armed_step(state: dict[str, Any], shape: Shape, config: Any, *, fixed: bool) -> Any:
    """Run kvtrap's checks for the SWA layer, then (if nothing trapped) the kernel."""
    check(state, shape, config, fixed=fixed)
    return attend(state, state["swa_page_table" if fixed else "page_table"], shape)


# ---------------------------------------------------------------------------------- component
def _parse(extra: tuple[str, ...]) -> Shape:
    p = argparse.ArgumentParser(prog="kvtrap repro synthetic", add_help=False)
    p.add_argument("--full-pages", type=int, default=Shape.full_pages)
    p.add_argument("--swa-pages", type=int, default=Shape.swa_pages)
    p.add_argument("--bs", type=int, default=Shape.bs)
    p.add_argument("--seq-len", type=int, default=Shape.seq_len)
    p.add_argument("--fill", type=float, default=Shape.fill)
    ns, unknown = p.parse_known_args(list(extra))
    if unknown:
        raise SystemExit(f"kvtrap repro synthetic: unknown options {' '.join(unknown)} "
                         "(known: --full-pages --swa-pages --bs --seq-len --fill)")
    return Shape(ns.full_pages, ns.swa_pages, ns.bs, ns.seq_len, ns.fill)


def _shape_args(shape: Shape) -> list[str]:
    return ["--full-pages", str(shape.full_pages), "--swa-pages", str(shape.swa_pages), "--bs", str(shape.bs),
            "--seq-len", str(shape.seq_len), "--fill", str(shape.fill)]


def run_synthetic(ctx: ComponentContext) -> ComponentResult:
    from kvtrap.config import Config

    shape = _parse(ctx.extra_args)
    config = Config.from_env(ctx.env, dump_dir=str(ctx.dump_dir), mode="raise")
    fixed = ctx.fix is True
    details: dict[str, Any] = {"shape": shape.__dict__, "fixed": fixed}

    if not fixed:
        _unarmed_child(ctx, shape, details)
    return _armed(ctx, shape, config, fixed, details)


def _unarmed_child(ctx: ComponentContext, shape: Shape, details: dict[str, Any]) -> None:
    """Step 1: the raw fault, in a child process (it poisons its CUDA context)."""
    child = subprocess.run(
        [sys.executable, "-m", "kvtrap.repro.synthetic", "--unarmed", *_shape_args(shape)],
        capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("KVTRAP_")},
    )
    raw = (child.stdout + child.stderr).strip()
    ctx.log(f"[unarmed child] exit {child.returncode}")
    for line in raw.splitlines()[-8:]:
        ctx.log(f"[unarmed child] {line}")
    details["unarmed"] = {
        "returncode": child.returncode,
        "illegal_address": "an illegal memory access was encountered" in raw,
        "tail": raw.splitlines()[-3:],
    }


def _armed(ctx: ComponentContext, shape: Shape, config: Any, fixed: bool, details: dict[str, Any]) -> ComponentResult:
    """Steps 2/3, in this process: trapped before the launch (or, fixed, a clean launch)."""
    import torch

    from kvtrap import KVTrapError

    state = build(shape)
    try:
        out = armed_step(state, shape, config, fixed=fixed)
    except KVTrapError as err:
        ctx.log(f"[armed] {err}")
        details["armed"] = {"trapped": True, "kind": err.violation.kind, "dump": str(err.dump_path)}
        details["after_trap_cuda_ok"] = bool(torch.ones(4, device="cuda").sum().item() == 4)
        explanation = _explain(err.dump_path)
        details["explain"] = explanation
        for line in explanation:
            ctx.log(f"[explain] {line}")
        return ComponentResult(outcome="TRAPPED", details=details, log_text=str(err))
    ctx.log(f"[armed{' + fix' if fixed else ''}] no trap; kernel completed, output finite: "
            f"{bool(torch.isfinite(out).all())}")
    details["armed"] = {"trapped": False, "output_finite": bool(torch.isfinite(out).all())}
    return ComponentResult(outcome="CLEAN", details=details)


def _explain(dump: Path | None) -> list[str]:
    if dump is None:
        return ["no dump was written"]
    from kvtrap.record.dumpfile import load_dump
    from kvtrap.report.explain import explain

    findings = explain(load_dump(dump))
    if not findings:
        return ["no rule matched"]
    return [f"{f.rule} ({f.confidence}): {f.title}" for f in findings]


register(
    Scenario(
        name="synthetic",
        kind="component",
        description=(
            "weight-free SGLang #26957: an SWA layer handed full-pool page ids at 85% fill, on SGLang's "
            "Triton decode attention (unarmed crash in a child, then armed trap + explain)"
        ),
        needs=Needs(gpu="any CUDA GPU (sm80+); no weights", min_gpu_mem_gib=2, requires_gpu=True),
        component=run_synthetic,
        tags=("weight-free", "sglang-26957"),
    )
)


def _unarmed_main(argv: list[str]) -> int:
    """The child: launch the kernel with the mixed-up table and no checks. Expected to die."""
    shape = _parse(tuple(argv))
    state = build(shape)
    attend(state, state["page_table"], shape)
    print("unarmed launch completed without a fault (the out-of-range reads landed in mapped memory)")
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--unarmed":
        sys.exit(_unarmed_main(args[1:]))
    print("usage: python -m kvtrap.repro.synthetic --unarmed [shape options]", file=sys.stderr)
    sys.exit(2)
