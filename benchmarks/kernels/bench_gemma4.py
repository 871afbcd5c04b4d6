"""Benchmark the fused Gemma 4 kernels on the GPU: CUDA-graph replay timed with CUDA events.

For each kernel and M in {1, 8, 32, 64, 128, 256, 8192}: the eager torch op sequence it replaces
(``kvtrap.kernels.references``), ``torch.compile`` of that same sequence (Inductor's own fusion), the fused
kernel, and SGLang 0.5.23's kernel where upstream has one. Every variant is captured ``R`` times back to back
in one CUDA graph, the graph replayed ``REPLAYS`` times between two events, and the per-call median over
``TRIALS`` such measurements reported. GB/s counts the fewest bytes the fused kernel must move (each input
read once, each output written once, weights included) and is set against a measured device-to-device copy
(bytes read + written).

Usage: python benchmarks/kernels/bench_gemma4.py --out OUT.json   (and --render OUT.json OUT.md locally)
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

MS = (1, 8, 32, 64, 128, 256, 8192)


def _import_kernels() -> None:
    """Use the installed ``kvtrap.kernels``; fall back to mapping ``kernels/`` by path (device machine)."""
    try:
        import kvtrap.kernels  # noqa: F401
    except ImportError:
        import types

        root = Path(__file__).resolve().parents[2]
        pkg = types.ModuleType("kvtrap")
        pkg.__path__ = [str(root / "kvtrap")]
        sys.modules.setdefault("kvtrap", pkg)
        sub = types.ModuleType("kvtrap.kernels")
        sub.__path__ = [str(root / "kernels")]
        sys.modules["kvtrap.kernels"] = sub


def capture(fn: Callable[[], Any], reps: int) -> Any:
    """``fn`` warmed up on a side stream (3 calls: compiles, allocator pools), then captured as a CUDA graph
    of ``reps`` back-to-back calls and replayed once."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    return g


def time_graph(fn: Callable[[], Any], m: int, trials: int = 5) -> float:
    """Median microseconds per call of ``fn`` under CUDA-graph replay."""
    import torch

    # 50 back-to-back calls per graph at decode sizes: the launch-floor kernels differ by tens of ns.
    reps = 50 if m <= 256 else 3
    replays = 20 if m <= 256 else 10
    g = capture(fn, reps)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    per_call = []
    for _ in range(trials):
        start.record()
        for _ in range(replays):
            g.replay()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) * 1e3 / (replays * reps))
    del g
    return statistics.median(per_call)


def copy_bandwidth() -> float:
    import torch

    n = 1 << 29  # 2**29 bf16 elements = 1 GiB per buffer, far beyond L2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    # ``copy_`` of same-dtype contiguous tensors is a cudaMemcpy (a memcpy graph node), measured at
    # ~2.77 TB/s on the H200, below what kernels reach; an elementwise kernel copy (``mul`` by 1) is the
    # roof a Triton kernel competes with. Best of three each; report the faster.
    us_memcpy = min(time_graph(lambda: b.copy_(a), 8192) for _ in range(3))
    us_kernel = min(time_graph(lambda: torch.mul(a, 1, out=b), 8192) for _ in range(3))
    print(f"copy: memcpy {2 * n * 2 / us_memcpy / 1e3:.0f} GB/s, kernel {2 * n * 2 / us_kernel / 1e3:.0f} GB/s")
    us = min(us_memcpy, us_kernel)
    return 2 * n * 2 / (us * 1e-6) / 1e9


def build_cases() -> dict[str, dict[str, Any]]:
    """name -> {make(m) -> dict of variant callables (no-arg), bytes(m), shape note}."""
    import torch
    from kvtrap.kernels import references as ref
    from kvtrap.kernels.cross_layer_norm import post_ffn_dense_next_norm, post_ffn_moe_next_norm
    from kvtrap.kernels.ple_tail import (
        gelu_tanh_mul,
        ple_tail,
        rmsnorm_add,
        rmsnorm_residual_scalar,
        rmsnorm_residual_scalar_next_norm,
    )
    from kvtrap.kernels.qkv_norm_rope import qkv_norm_rope
    from kvtrap.kernels.routing import gemma4_fused_routing
    from kvtrap.kernels.triple_norm import post_attn_pair_rmsnorm, post_attn_triple_rmsnorm

    try:
        from sglang.kernels.ops.moe.gemma4_routing import gemma4_fused_routing as sgl_routing
    except Exception as e:  # noqa: BLE001
        print("no SGLang routing:", e)
        sgl_routing = None
    try:
        from sglang.kernels.ops.layernorm import gemma4_fused_ops as sgl_ops
    except Exception as e:  # noqa: BLE001
        print("no SGLang gemma4_fused_ops:", e)
        sgl_ops = None

    bf = torch.bfloat16
    compiled: dict[str, Callable[..., Any]] = {}

    def comp(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        if name not in compiled:
            compiled[name] = torch.compile(f, dynamic=False)
        return compiled[name]

    def act(m: int, n: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(m, n, device="cuda") * scale).to(bf)

    def wt(n: int) -> torch.Tensor:
        return (torch.rand(n, device="cuda") + 0.5).to(bf)

    scal = torch.tensor([0.75], device="cuda").to(bf)

    def routing(m: int) -> dict[str, Callable[[], Any]]:
        lg, s = act(m, 128, 2.0), torch.rand(128, device="cuda") + 0.5
        v = {
            "eager": lambda: ref.routing_eager(lg, s, 8),
            "compile": lambda: comp("routing", ref.routing_eager)(lg, s, 8),
            "fused": lambda: gemma4_fused_routing(lg, s, 8),
        }
        if sgl_routing is not None:
            v["sglang"] = lambda: sgl_routing(lg, s, 8)
        return v

    def rms_add(m: int, n: int = 2560) -> dict[str, Callable[[], Any]]:
        x, r, w = act(m, n, 2.0), act(m, n), wt(n)
        return {
            "eager": lambda: ref.rmsnorm_add_ref(x, w, r),
            "compile": lambda: comp("rmsnorm_add", ref.rmsnorm_add_ref)(x, w, r),
            "fused": lambda: rmsnorm_add(x, w, r),
        }

    def gelu(m: int) -> dict[str, Callable[[], Any]]:
        pli = (torch.randn(m, 42, 256, device="cuda")).to(bf)
        ple, g = pli[:, 17, :], act(m, 256, 3.0)
        return {
            "eager": lambda: ref.gelu_tanh_mul_ref(g, ple),
            "compile": lambda: comp("gelu", ref.gelu_tanh_mul_ref)(g, ple),
            "fused": lambda: gelu_tanh_mul(g, ple),
        }

    def res_scalar(m: int, n: int = 2560) -> dict[str, Callable[[], Any]]:
        x, r, w = act(m, n, 2.0), act(m, n), wt(n)
        v = {
            "eager": lambda: ref.rmsnorm_residual_scalar_ref(x, w, r, scal),
            "compile": lambda: comp("res_scalar", ref.rmsnorm_residual_scalar_ref)(x, w, r, scal),
            "fused": lambda: rmsnorm_residual_scalar(x, w, r, scal),
        }
        if sgl_ops is not None:
            v["sglang"] = lambda: sgl_ops.gemma_rmsnorm_residual_scalar(x, w, r, scal, 1e-6)
        return v

    def tail(m: int, n: int = 2560, d: int = 256) -> dict[str, Callable[[], Any]]:
        """The whole PLE tail incl. its two GEMMs: eager 7 + 2 launches; torch.compile of the same code;
        fused = our 3 kernels + the same two F.linear (cuBLAS) calls."""
        h, r, w_ff, w_ple = act(m, n, 2.0), act(m, n), wt(n), wt(n)
        ple = torch.randn(m, 42, d, device="cuda").to(bf)[:, 17, :]
        w_gate, w_proj = act(d, n, n**-0.5), act(n, d, d**-0.5)
        args = (h, r, ple, w_ff, w_gate, w_proj, w_ple, scal)
        return {
            "eager": lambda: ref.ple_tail_ref(*args),
            "compile": lambda: comp("ple_tail", ref.ple_tail_ref)(*args),
            "fused": lambda: ple_tail(*args),
        }

    def triple(m: int, n: int = 2816) -> dict[str, Callable[[], Any]]:
        x, r = act(m, n, 2.0), act(m, n, 8.0)
        ws = [wt(n) for _ in range(4)]
        return {
            "eager": lambda: ref.post_attn_triple_rmsnorm_ref(x, r, *ws),
            "compile": lambda: comp("triple", ref.post_attn_triple_rmsnorm_ref)(x, r, *ws),
            "fused": lambda: post_attn_triple_rmsnorm(x, r, *ws),
        }

    sgl_rmsnorm = _sglang_rmsnorm() if sgl_ops is not None else None
    sgl_add_rmsnorm = _sglang_fused_add_rmsnorm() if sgl_ops is not None else None

    def pair(m: int, n: int = 2560) -> dict[str, Callable[[], Any]]:
        """A dense layer's post-attention norm + pre-FFN add-norm (E2B/E4B, 31B): eager = the torch op
        sequence; SGLang = its JIT CUDA rmsnorm then its in-place JIT fused_add_rmsnorm (stand-ins for the
        sgl_kernel pair a server's layer runs: same math; the residual buffer keeps growing across calls,
        which leaves the time alone)."""
        x, r, wp, wf = act(m, n, 2.0), act(m, n, 8.0), wt(n), wt(n)
        v = {
            "eager": lambda: ref.post_attn_pair_rmsnorm_ref(x, r, wp, wf),
            "compile": lambda: comp(f"pair{n}", ref.post_attn_pair_rmsnorm_ref)(x, r, wp, wf),
            "fused": lambda: post_attn_pair_rmsnorm(x, r, wp, wf),
        }
        if sgl_rmsnorm is not None and sgl_add_rmsnorm is not None:
            h, rs = torch.empty_like(x), r.clone()

            def sgl_pair() -> None:
                sgl_rmsnorm(x, wp, out=h, eps=1e-6)
                sgl_add_rmsnorm(h, rs, wf, 1e-6)

            v["sglang"] = sgl_pair
        return v

    def ple_next(m: int, n: int = 2560) -> dict[str, Callable[[], Any]]:
        """A PLE layer's last step + the next layer's input norm (E2B/E4B cross-layer): eager = 3 + 1 torch
        launches; ``before`` = what a server ran there before this fusion (kvtrap's rmsnorm_residual_scalar,
        then SGLang's JIT CUDA rmsnorm standing in for the next layer's input_layernorm)."""
        x, r, w, wn = act(m, n, 2.0), act(m, n), wt(n), wt(n)
        v = {
            "eager": lambda: ref.rmsnorm_residual_scalar_next_norm_ref(x, w, r, scal, wn),
            "compile": lambda: comp("ple_next", ref.rmsnorm_residual_scalar_next_norm_ref)(x, w, r, scal, wn),
            "fused": lambda: rmsnorm_residual_scalar_next_norm(x, w, r, scal, wn),
        }
        if sgl_rmsnorm is not None:
            v["before"] = lambda: _then_norm(rmsnorm_residual_scalar(x, w, r, scal), wn)
        return v

    def _then_norm(stream: Any, w_next: Any) -> tuple[Any, Any]:
        nxt = torch.empty_like(stream)
        sgl_rmsnorm(stream, w_next, out=nxt, eps=1e-6)
        return stream, nxt

    def dense(m: int, n: int = 5376) -> dict[str, Callable[[], Any]]:
        x, r, w, wn = act(m, n), act(m, n, 8.0), wt(n), wt(n)
        v = {
            "eager": lambda: ref.post_ffn_dense_next_norm_native_ref(x, r, w, scal, wn),
            "compile": lambda: comp("dense", ref.post_ffn_dense_next_norm_native_ref)(x, r, w, scal, wn),
            "fused": lambda: post_ffn_dense_next_norm(x, r, w, scal, wn),
        }
        if sgl_ops is not None:  # upstream's half of the pair
            v["sglang_part"] = lambda: sgl_ops.gemma_rmsnorm_residual_scalar(x, w, r, scal, 1e-6)
            if sgl_rmsnorm is not None:  # + the next layer's input norm: the whole pair as SGLang runs it
                v["sglang"] = lambda: _then_norm(sgl_ops.gemma_rmsnorm_residual_scalar(x, w, r, scal, 1e-6), wn)
        return v

    def moe(m: int, n: int = 2816) -> dict[str, Callable[[], Any]]:
        x1, x2, r = act(m, n), act(m, n, 3.0), act(m, n, 8.0)
        w1, w2, w3, wn = (wt(n) for _ in range(4))
        v = {
            "eager": lambda: ref.post_ffn_moe_next_norm_native_ref(x1, x2, r, w1, w2, w3, scal, wn),
            "compile": lambda: comp("moe", ref.post_ffn_moe_next_norm_native_ref)(x1, x2, r, w1, w2, w3, scal, wn),
            "fused": lambda: post_ffn_moe_next_norm(x1, x2, r, w1, w2, w3, scal, wn),
        }
        if sgl_ops is not None:
            v["sglang_part"] = lambda: sgl_ops.gemma_dual_rmsnorm_residual_scalar(x1, w1, x2, w2, w3, r, scal)
            if sgl_rmsnorm is not None:
                v["sglang"] = lambda: _then_norm(
                    sgl_ops.gemma_dual_rmsnorm_residual_scalar(x1, w1, x2, w2, w3, r, scal), wn)
        return v

    sgl_rope = _sglang_rope()

    def qkv(m: int, hq: int, hkv: int, d: int, shared: bool = False) -> dict[str, Callable[[], Any]]:
        """Attention input of one layer: eager = the torch op sequence (norms, reshapes, RoPE; dummy K on a
        KV-shared layer); SGLang = gemma_qkv_rmsnorm (in place on the split views) + the k/v reshape copies +
        its JIT CUDA RoPE (``sglang_part``: gemma_qkv_rmsnorm alone, when the RoPE cannot be built)."""
        full = d == 512
        qkv_buf = act(m, (hq + 2 * hkv) * d, 2.0)
        q, k, v = qkv_buf.split([hq * d, hkv * d, hkv * d], dim=-1)
        if shared:
            k = v = None
        qw, kw = wt(d), wt(d)
        cache = ref.gemma4_cos_sin_cache(d, 32768, 1e6 if full else 1e4, 0.25 if full else 1.0, device="cuda")
        pos = torch.randint(0, 32768, (m,), device="cuda")
        rot = 64 if full else None
        args = (q, k, v, qw, kw, cache, pos, hq, hkv, d)
        name = f"qkv{hq}-{hkv}-{d}-{shared}"
        out = {
            "eager": lambda: ref.qkv_norm_rope_ref(*args),
            "compile": lambda: comp(name, ref.qkv_norm_rope_ref)(*args),
            "fused": lambda: qkv_norm_rope(*args, rotary_angles=rot),
        }
        if sgl_ops is None:
            return out
        # upstream mutates its inputs: give it its own buffer (values stay bounded: norm then rotation)
        sb = qkv_buf.clone()
        sq, sk, sv = sb.split([hq * d, hkv * d, hkv * d], dim=-1)
        kvh = 0 if shared else hkv

        def sgl_norm() -> None:
            sgl_ops.gemma_qkv_rmsnorm(sq, None if shared else sk, None if shared else sv, qw, None if shared else kw,
                                      num_q_heads=hq, num_kv_heads=kvh, head_dim=d, eps=1e-6)

        out["sglang_part"] = sgl_norm
        if sgl_rope is not None:
            def sgl_all() -> None:
                sgl_norm()
                if shared:
                    kk = torch.zeros_like(sq[:, : hkv * d])
                else:
                    kk = sk.reshape(-1, hkv, d)
                    sv.reshape(-1, hkv, d)
                sgl_rope(positions=pos, q=sq.view(m, -1, d), k=kk.reshape(m, -1, d), cos_sin_cache=cache,
                         is_neox=True)

            out["sglang"] = sgl_all
        return out

    def qkv_bytes(hq: int, hkv: int, d: int, shared: bool = False) -> Callable[[int], int]:
        heads = hq if shared else hq + 2 * hkv
        cs = (64 if d == 512 else d // 2) * 2 * 4
        return lambda m: 2 * m * heads * d * 2 + m * (cs + 8) + 2 * d * 2

    return {
        "qkv_norm_rope 31B sliding (32 q / 16 kv heads, D=256)": {
            "make": lambda m: qkv(m, 32, 16, 256), "bytes": qkv_bytes(32, 16, 256)},
        "qkv_norm_rope 31B full (32 q / 4 kv heads, D=512, 64 of 256 angles rotate)": {
            "make": lambda m: qkv(m, 32, 4, 512), "bytes": qkv_bytes(32, 4, 512)},
        "qkv_norm_rope KV-shared E4B sliding: q only (8 q heads, D=256; upstream: + dummy K RoPE)": {
            "make": lambda m: qkv(m, 8, 2, 256, shared=True), "bytes": qkv_bytes(8, 2, 256, True)},
        "routing E=128 K=8 bf16": {"make": routing, "bytes": lambda m: m * 128 * 2 + m * 8 * 8 + 128 * 4},
        "rmsnorm_add N=2560 (E4B)": {"make": rms_add, "bytes": lambda m: 3 * m * 2560 * 2 + 2560 * 2},
        "gelu_tanh_mul 256, strided ple (E4B)": {"make": gelu, "bytes": lambda m: 3 * m * 256 * 2},
        "rmsnorm_residual_scalar N=2560 (E4B)": {"make": res_scalar, "bytes": lambda m: 3 * m * 2560 * 2 + 2560 * 2},
        "PLE tail whole, 3 kernels + 2 GEMMs (E4B)": {"make": tail, "bytes": None},
        "post_attn_triple_rmsnorm N=2816 (26B)": {"make": triple, "bytes": lambda m: 6 * m * 2816 * 2 + 4 * 2816 * 2},
        "post_attn_pair_rmsnorm N=2560 (E4B)": {"make": pair, "bytes": lambda m: 4 * m * 2560 * 2 + 2 * 2560 * 2},
        "post_attn_pair_rmsnorm N=5376 (31B)": {"make": lambda m: pair(m, 5376),
                                                "bytes": lambda m: 4 * m * 5376 * 2 + 2 * 5376 * 2},
        "rmsnorm_residual_scalar_next_norm N=2560 (E4B)": {"make": ple_next,
                                                           "bytes": lambda m: 4 * m * 2560 * 2 + 2 * 2560 * 2},
        "post_ffn_dense_next_norm N=5376 (31B)": {"make": dense, "bytes": lambda m: 4 * m * 5376 * 2 + 2 * 5376 * 2},
        "post_ffn_moe_next_norm N=2816 (26B)": {"make": moe, "bytes": lambda m: 5 * m * 2816 * 2 + 4 * 2816 * 2},
    }


def _sglang_jit(label: str, load: Callable[[], Callable[..., Any]], warm: Callable[[Callable[..., Any]], None]
                ) -> Callable[..., Any] | None:
    """One of SGLang's JIT CUDA kernels (built with nvcc on first use): ``load()`` imports it, ``warm(f)``
    builds it with a first call. ``None`` (said on stdout) when nvcc is missing or the build fails."""
    import os
    import shutil

    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if not (shutil.which("nvcc") or os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))):
        print(f"no SGLang {label}: nvcc not found, its JIT CUDA kernel cannot be built here")
        return None
    try:
        import torch

        f = load()
        t0 = time.time()
        warm(f)
        torch.cuda.synchronize()
        print(f"SGLang {label} JIT ready ({time.time() - t0:.1f}s)")
        return f
    except Exception as e:  # noqa: BLE001
        print(f"no SGLang {label}:", f"{type(e).__name__}: {e}"[:400])
        return None


def _sglang_rmsnorm() -> Callable[..., Any] | None:
    """SGLang's JIT CUDA RMSNorm (``sglang.kernels.ops.layernorm.norm.rmsnorm``): the stand-in for the next
    layer's ``input_layernorm``, which a server runs through ``sgl_kernel.rmsnorm`` (not importable on the
    device machine). Both compute ``x * rsqrt(mean(x^2) + eps) * w``."""
    import torch

    def load() -> Callable[..., Any]:
        from sglang.kernels.ops.layernorm.norm import rmsnorm

        return rmsnorm

    def warm(f: Callable[..., Any]) -> None:
        for n in (5376, 2816):
            x = torch.ones(2, n, device="cuda", dtype=torch.bfloat16)
            f(x, torch.ones(n, device="cuda", dtype=torch.bfloat16), out=torch.empty_like(x), eps=1e-6)

    return _sglang_jit("rmsnorm", load, warm)


def _sglang_fused_add_rmsnorm() -> Callable[..., Any] | None:
    """SGLang's JIT CUDA fused add + RMSNorm (``sglang.kernels.ops.layernorm.norm.fused_add_rmsnorm``, in
    place: residual += x, x = norm(residual)): the stand-in for ``sgl_kernel.fused_add_rmsnorm``, which a
    server's ``pre_feedforward_layernorm(h, residual)`` runs."""
    import torch

    def load() -> Callable[..., Any]:
        from sglang.kernels.ops.layernorm.norm import fused_add_rmsnorm

        return fused_add_rmsnorm

    def warm(f: Callable[..., Any]) -> None:
        for n in (2560, 5376):
            x = torch.ones(2, n, device="cuda", dtype=torch.bfloat16)
            f(x, x.clone(), torch.ones(n, device="cuda", dtype=torch.bfloat16), 1e-6)

    return _sglang_jit("fused_add_rmsnorm", load, warm)


def _sglang_rope() -> Callable[..., Any] | None:
    """SGLang's CUDA RoPE (``apply_rope_with_cos_sin_cache_inplace``)."""
    import torch

    def load() -> Callable[..., Any]:
        from sglang.kernels.ops.attention.rope import apply_rope_with_cos_sin_cache_inplace

        return apply_rope_with_cos_sin_cache_inplace

    def warm(f: Callable[..., Any]) -> None:
        q = torch.zeros(1, 1, 256, device="cuda", dtype=torch.bfloat16)
        f(positions=torch.zeros(1, dtype=torch.int64, device="cuda"), q=q, k=q.clone(),
          cos_sin_cache=torch.zeros(4, 256, device="cuda"), is_neox=True)

    return _sglang_jit("RoPE", load, warm)


def sweep_qkv(ms: tuple[int, ...]) -> list[dict[str, Any]]:
    import torch
    from kvtrap.kernels import references as ref
    from kvtrap.kernels.qkv_norm_rope import qkv_norm_rope

    rows = []
    for hq, hkv, d in ((32, 16, 256), (32, 4, 512)):
        cache = ref.gemma4_cos_sin_cache(d, 4096, 1e4, 1.0 if d == 256 else 0.25, device="cuda")
        rot = 64 if d == 512 else None
        for m in ms:
            qkv_buf = (torch.randn(m, (hq + 2 * hkv) * d, device="cuda")).to(torch.bfloat16)
            q, k, v = qkv_buf.split([hq * d, hkv * d, hkv * d], dim=-1)
            w = torch.ones(d, device="cuda", dtype=torch.bfloat16)
            pos = torch.randint(0, 4096, (m,), device="cuda")
            for hb, nw in ((1, 1), (1, 2), (2, 2), (2, 4), (4, 4), (8, 4), (8, 8)):
                a = (q, k, v, w, w, cache, pos, hq, hkv, d)
                us = time_graph(lambda a=a, hb=hb, nw=nw, rot=rot: qkv_norm_rope(
                    *a, rotary_angles=rot, heads_per_program=hb, num_warps=nw), m)
                rows.append({"m": m, "d": d, "heads_per_program": hb, "num_warps": nw, "us": us})
                print("qkv sweep", rows[-1], flush=True)
    return rows


def time_interleaved(fns: dict[str, Callable[[], Any]], m: int, trials: int = 20,
                     reps: int | None = None) -> dict[str, list[float]]:
    """Per-call microseconds of each variant in each of ``trials`` rounds. Every variant is captured once
    as a graph of ``reps`` back-to-back calls; each round replays every graph once, in an order rotated by
    one per round, so slow drift of clocks or of the launch floor hits all variants alike and two variants
    are compared trial by trial (paired) instead of through two medians taken seconds apart."""
    import torch

    reps = reps or (50 if m <= 256 else 10)
    graphs = {name: capture(fn, reps) for name, fn in fns.items()}
    torch.cuda.synchronize()
    names = list(graphs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(2):  # warm-up rounds, not recorded
        for n in names:
            graphs[n].replay()
    for t in range(trials):
        order = names[t % len(names):] + names[: t % len(names)]
        ev = {n: (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for n in order}
        for n in order:
            ev[n][0].record()
            graphs[n].replay()
            ev[n][1].record()
        torch.cuda.synchronize()
        for n in order:
            times[n].append(ev[n][0].elapsed_time(ev[n][1]) * 1e3 / reps)
    del graphs
    return times


def _ab_rows(case: str, m: int, times: dict[str, list[float]], base: str | None,
             nbytes: int | None = None) -> list[dict[str, Any]]:
    """Median and spread per variant; against ``base``: median of the per-trial ratios base / variant
    (> 1: variant faster) and the number of trials the variant was faster."""
    rows = []
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10)
        row = {"case": case, "m": m, "variant": name, "median": statistics.median(ts), "p10": q[0], "p90": q[-1],
               "min": min(ts), "max": max(ts), "trials": len(ts)}
        if base is not None and name != base:
            ratios = [b / v for b, v in zip(times[base], ts, strict=True)]
            row["x_base"] = statistics.median(ratios)
            row["x_base_p10"] = statistics.quantiles(ratios, n=10)[0]
            row["wins"] = sum(r > 1 for r in ratios)
        if nbytes is not None:
            row["gbps"] = nbytes / row["median"] / 1e3
        rows.append(row)
        print("ab", row, flush=True)
    return rows


# Launch shapes (XBLOCK, num_warps) at which Inductor's own generated gelu*mul kernel is also timed: a superset
# of the configs its pointwise autotuner picks from, so the comparison does not hinge on which one it chose.
INDUCTOR_LAUNCHES = ((128, 1), (128, 2), (128, 4), (256, 2), (256, 4), (256, 8), (512, 4), (512, 8), (1024, 4),
                     (1024, 8), (2048, 8))
# (block_m, num_warps) of the fused kernel timed beside its launch rule (N = 256: 256 / (32 num_warps / block_m)
# elements per thread).
GELU_AB = ((1, 2), (1, 4), (1, 8), (2, 4), (2, 8), (4, 4), (4, 8), (8, 8))


def _inductor_kernel(prefix: str, marker: str) -> tuple[Any, Any]:
    """The most recently compiled Inductor kernel named ``prefix...`` whose source contains ``marker``: its
    CachingAutotuner (``.launchers[0].config`` is the config its autotuner chose) and a freshly loaded copy of
    its Triton JITFunction (Inductor drops the Python function behind ``.fn`` once compiled, so the kernel's
    generated file is loaded again to launch it at other shapes)."""
    import importlib.util

    from torch._inductor.codecache import PyCodeCache

    for mod in reversed(PyCodeCache.modules):
        for name, obj in vars(mod).items():
            if name.startswith(prefix) and marker in getattr(getattr(obj, "fn", None), "src", ""):
                spec = importlib.util.spec_from_file_location(f"_inductor_copy_{name}", obj.filename)
                copy = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(copy)
                return obj, getattr(copy, name).fn
    raise LookupError(f"no compiled Inductor kernel {prefix}* with {marker!r}")


def ab_gelu(ms: tuple[int, ...]) -> list[dict[str, Any]]:
    """gelu_tanh_mul (E4B: 256 wide, strided per_layer_input) against Inductor, interleaved: torch.compile of
    the eager pair as it runs by default (its autotuner's pick, named in the label), Inductor's generated
    kernel launched directly at every INDUCTOR_LAUNCHES shape, and the fused kernel at its launch rule.
    ``best_inductor`` rows: the fused kernel against the fastest Inductor launch of that M (paired ratios)."""
    import torch
    import triton
    from kvtrap.kernels import references as ref
    from kvtrap.kernels.ple_tail import _gelu_config, gelu_tanh_mul

    torch._dynamo.config.cache_size_limit = 64
    rows = []
    for m in ms:
        torch._dynamo.reset()  # one fresh compile (and autotune) per M
        ind = torch.compile(ref.gelu_tanh_mul_ref, dynamic=False)
        pli = torch.randn(m, 42, 256, device="cuda").to(torch.bfloat16)
        ple, g = pli[:, 17, :], (torch.randn(m, 256, device="cuda") * 3).to(torch.bfloat16)
        ind(g, ple)
        n = m * 256
        kern, jit = _inductor_kernel("triton_poi_fused_gelu_mul", f"xnumel = {n}\n")
        cfg = kern.launchers[0].config
        pick = f"XBLOCK={cfg.kwargs.get('XBLOCK')} {cfg.num_warps}w"
        rule = _gelu_config(m, 256)
        fns: dict[str, Callable[[], Any]] = {f"inductor ({pick})": lambda g=g, ple=ple, ind=ind: ind(g, ple)}
        for xb, nw in INDUCTOR_LAUNCHES:
            if xb > max(n, 256) or (n > 256 * 256 and xb < 1024):
                continue

            def launch(g=g, ple=ple, xb=xb, nw=nw, jit=jit, n=n) -> torch.Tensor:
                out = torch.empty_like(g)
                jit[(triton.cdiv(n, xb),)](g, ple, out, n, XBLOCK=xb, num_warps=nw)
                return out

            fns[f"inductor kernel {xb}x{nw}w"] = launch
        fused = f"fused rule {rule[0]}x{rule[1]}w"
        fns[fused] = lambda g=g, ple=ple: gelu_tanh_mul(g, ple)
        for bm, nw in GELU_AB:
            if (bm, nw) != rule and m % bm == 0 and not (m > 256 and bm * 256 < 1024):
                fns[f"fused {bm}x{nw}w"] = lambda g=g, ple=ple, bm=bm, nw=nw: gelu_tanh_mul(
                    g, ple, block_m=bm, num_warps=nw)
        want = ref.gelu_tanh_mul_ref(g, ple).float()
        for name, f in fns.items():
            err = (f().float() - want).abs().max().item()
            if err > 0.0625 * max(1.0, want.abs().max().item()):  # a wrong launch must not pass as fast
                raise AssertionError(f"{name} at M={m}: max error {err}")
        times = time_interleaved(fns, m, trials=30)
        base = next(iter(fns))
        rows += _ab_rows("gelu_tanh_mul 256 strided", m, times, base, 3 * m * 256 * 2)
        ind_names = [k for k in fns if k.startswith("inductor")]
        best = min(ind_names, key=lambda k: statistics.median(times[k]))
        pair = {best: times[best], fused: times[fused]}
        for r in _ab_rows("gelu_tanh_mul 256 strided", m, pair, best):
            if r["variant"] == fused:
                rows.append(dict(r, variant=f"{fused} vs best Inductor ({best})", best_inductor=True))
    return rows


# (heads per program, num_warps, token-major grid); None = launch_config's choice at that M.
QKV_AB = ((None, None, False), (None, None, True), (4, 4, False), (4, 4, True), (8, 8, True), (16, 8, False),
          (16, 8, True), (16, 4, True), (4, 2, True), (2, 2, True))
# E4B KV-shared q-only (8 heads of 256): all heads in one program at 2 / 4 / 8 warps.
QKV_AB_QONLY = ((8, 2, True), (8, 4, True), (8, 8, True))


def ab_qkv(ms: tuple[int, ...]) -> list[dict[str, Any]]:
    """qkv_norm_rope launch shapes interleaved, with the main table's inputs (32768-row cos/sin cache, random
    positions, distinct weights): the 31B sliding shape at every M given (all QKV_AB shapes at M = 8192,
    rule vs token-major below), the full shape rule vs token-major at M = 8192, the KV-shared q-only shape
    at M = 8192 with the QKV_AB_QONLY shapes."""
    import torch
    from kvtrap.kernels import references as ref
    from kvtrap.kernels.qkv_norm_rope import launch_config, qkv_norm_rope

    rows = []
    bf = torch.bfloat16
    for hq, hkv, d, shared in ((32, 16, 256, False), (32, 4, 512, False), (8, 2, 256, True)):
        full = d == 512
        cache = ref.gemma4_cos_sin_cache(d, 32768, 1e6 if full else 1e4, 0.25 if full else 1.0, device="cuda")
        rot = 64 if full else None
        heads = hq if shared else hq + 2 * hkv
        cs = (64 if full else d // 2) * 2 * 4
        for m in ms if (hq, hkv, d) == (32, 16, 256) else (8192,):
            buf = (torch.randn(m, (hq + 2 * hkv) * d, device="cuda") * 2).to(bf)
            q, k, v = buf.split([hq * d, hkv * d, hkv * d], dim=-1)
            if shared:
                k = v = None
            qw, kw = ((torch.rand(d, device="cuda") + 0.5).to(bf) for _ in range(2))
            pos = torch.randint(0, 32768, (m,), device="cuda")
            a = (q, k, v, qw, kw, cache, pos, hq, hkv, d)
            rule = launch_config(m, d, heads)
            if m != 8192 or full:
                combos = QKV_AB[:2]
            else:
                combos = QKV_AB_QONLY if shared else QKV_AB
                combos = QKV_AB[:2] + tuple(c for c in combos if c != (*rule, True))
            fns: dict[str, Callable[[], Any]] = {}
            for hb, nw, tm in combos:
                label = f"{'rule ' if hb is None else ''}{hb or rule[0]}h x{nw or rule[1]}w {'token-major' if tm else '2-D'}"
                fns[label] = lambda a=a, hb=hb, nw=nw, tm=tm, rot=rot: qkv_norm_rope(
                    *a, rotary_angles=rot, heads_per_program=hb, num_warps=nw, token_major=tm)
            for f in fns.values():
                f()
            nbytes = 2 * m * heads * d * 2 + m * (cs + 8) + 2 * d * 2
            name = f"qkv {hq}/{hkv} D={d}{' q-only' if shared else ''}"
            rows += _ab_rows(name, m, time_interleaved(fns, m), next(iter(fns)), nbytes)
    return rows


def sweep_routing(ms: tuple[int, ...]) -> list[dict[str, Any]]:
    import torch
    from kvtrap.kernels.routing import gemma4_fused_routing

    rows = []
    s = torch.rand(128, device="cuda") + 0.5
    for m in ms:
        lg = (torch.randn(m, 128, device="cuda") * 2).to(torch.bfloat16)
        for bm, nw in ((1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (8, 2), (8, 4), (16, 4)):
            us = time_graph(lambda lg=lg, bm=bm, nw=nw: gemma4_fused_routing(lg, s, 8, block_m=bm, num_warps=nw), m)
            rows.append({"m": m, "block_m": bm, "num_warps": nw, "us": us})
    return rows


def sweep_row_warps(ms: tuple[int, ...]) -> list[dict[str, Any]]:
    import torch
    from kvtrap.kernels import _launch
    from kvtrap.kernels.cross_layer_norm import post_ffn_dense_next_norm
    from kvtrap.kernels.triple_norm import post_attn_triple_rmsnorm

    rows = []
    bf = torch.bfloat16
    scal = torch.ones(1, device="cuda", dtype=bf)
    for m in ms:
        for n in (2560, 2816, 5376):
            x, r = torch.randn(m, n, device="cuda").to(bf), torch.randn(m, n, device="cuda").to(bf)
            w = torch.ones(n, device="cuda", dtype=bf)
            for nw in (2, 4, 8, 16, 32):
                _launch.NUM_WARPS_OVERRIDE = nw
                try:
                    t_dense = time_graph(lambda x=x, r=r, w=w: post_ffn_dense_next_norm(x, r, w, scal, w), m)
                    t_trip = time_graph(lambda x=x, r=r, w=w: post_attn_triple_rmsnorm(x, r, w, w, w, w), m)
                finally:
                    _launch.NUM_WARPS_OVERRIDE = None
                rows.append({"m": m, "n": n, "num_warps": nw, "dense_us": t_dense, "triple_us": t_trip})
    return rows


def sweep_gelu(ms: tuple[int, ...]) -> list[dict[str, Any]]:
    import torch
    from kvtrap.kernels.ple_tail import gelu_tanh_mul

    rows = []
    for m in ms:
        pli = torch.randn(m, 42, 256, device="cuda").to(torch.bfloat16)
        ple, g = pli[:, 17, :], torch.randn(m, 256, device="cuda").to(torch.bfloat16)
        for bm, nw in ((1, 1), (1, 2), (2, 2), (4, 2), (4, 4), (8, 4), (16, 4), (16, 8), (32, 8)):
            us = time_graph(lambda g=g, ple=ple, bm=bm, nw=nw: gelu_tanh_mul(g, ple, block_m=bm, num_warps=nw), m)
            rows.append({"m": m, "block_m": bm, "num_warps": nw, "us": us})
    return rows


def sweep_moe_warps(ms: tuple[int, ...]) -> list[dict[str, Any]]:
    import torch
    from kvtrap.kernels import _launch
    from kvtrap.kernels.cross_layer_norm import post_ffn_moe_next_norm

    rows = []
    bf, n = torch.bfloat16, 2816
    scal = torch.ones(1, device="cuda", dtype=bf)
    w = torch.ones(n, device="cuda", dtype=bf)
    for m in ms:
        x1, x2, r = (torch.randn(m, n, device="cuda").to(bf) for _ in range(3))
        for nw in (4, 8, 16):
            for early in (False, True):
                _launch.NUM_WARPS_OVERRIDE = nw
                try:
                    us = time_graph(lambda x1=x1, x2=x2, r=r, e=early: post_ffn_moe_next_norm(
                        x1, x2, r, w, w, w, scal, w, early_r=e), m)
                finally:
                    _launch.NUM_WARPS_OVERRIDE = None
                rows.append({"m": m, "n": n, "num_warps": nw, "early_r": early, "us": us,
                             "gbps": (5 * m * n * 2 + 4 * n * 2) / us / 1e3})
    return rows


def sweep_early_w(ms: tuple[int, ...]) -> list[dict[str, Any]]:
    """The two E2B/E4B layer-override kernels with the second weight loaded with the row (early_w) or after
    the reductions, N = 2560 (the launch rule: early at M <= 256, as measured for the cross-layer kernels)."""
    import torch
    from kvtrap.kernels.ple_tail import rmsnorm_residual_scalar_next_norm
    from kvtrap.kernels.triple_norm import post_attn_pair_rmsnorm

    n, bf = 2560, torch.bfloat16
    rows = []
    for m in ms:
        x, r = torch.randn(m, n, device="cuda").to(bf), torch.randn(m, n, device="cuda").to(bf)
        w1, w2 = (torch.rand(n, device="cuda") + 0.5).to(bf), (torch.rand(n, device="cuda") + 0.5).to(bf)
        s = torch.tensor([0.75], device="cuda").to(bf)
        for early in (False, True):
            pair_us = time_graph(
                lambda a=(x, r, w1, w2), e=early: post_attn_pair_rmsnorm(*a, early_w=e), m)
            next_us = time_graph(
                lambda a=(x, w1, r, s, w2), e=early: rmsnorm_residual_scalar_next_norm(*a, early_w=e), m)
            rows.append({"m": m, "n": n, "early_w": early, "pair_us": pair_us, "ple_next_us": next_us})
            print("early_w sweep", rows[-1], flush=True)
    return rows


def _compiled(jit: Any) -> dict[int, tuple[int, int, int]]:
    """id -> (registers per thread, spills, warps) of every compiled variant of a Triton kernel."""
    out = {}
    try:
        for cache in jit.device_caches.values():
            for k in cache[0].values():
                out[id(k)] = (int(k.n_regs), int(k.n_spills), int(k.metadata.num_warps))
    except Exception:  # noqa: BLE001  (a Triton internals change must not lose the timings)
        pass
    return out


# (split, low_reg, evict_first, num_warps, early_r) at M = 8192: the committed default first, then one knob
# at a time; (False, False, False, ...) is the previous kernel's row layout.
XL_DENSE = ((True, True, False, 8, True), (True, True, False, 4, True), (False, False, False, 4, True),
            (True, False, False, 8, True), (True, True, True, 8, True), (True, True, False, 16, True))
XL_MOE = ((True, True, False, 4, True), (True, True, False, 8, True), (False, False, False, 8, True),
          (True, False, False, 4, True), (True, True, True, 4, True), (True, True, False, 4, False))


def sweep_cross_layer(ms: tuple[int, ...]) -> list[dict[str, Any]]:
    """Launch knobs of the two cross-layer kernels at their real widths, with ptxas register counts."""
    import torch
    from kvtrap.kernels import cross_layer_norm as xl

    rows = []
    bf = torch.bfloat16
    scal = torch.tensor([0.75], device="cuda").to(bf)
    for kind, n, combos, jit in (("dense", 5376, XL_DENSE, xl._dense_next_kernel),
                                 ("moe", 2816, XL_MOE, xl._moe_next_kernel)):  # fmt: skip
        ws = [(torch.rand(n, device="cuda") + 0.5).to(bf) for _ in range(4)]  # distinct, as in the model
        for m in ms:
            x1, x2, r = (torch.randn(m, n, device="cuda").to(bf) for _ in range(3))
            for split, low, ev, nw, early in combos:
                kw = {"split": split, "low_reg": low, "evict_first": ev, "num_warps": nw}
                if kind == "dense":
                    def fn(x1=x1, r=r, kw=kw, ws=ws):  # noqa: ANN202
                        return xl.post_ffn_dense_next_norm(x1, r, ws[0], scal, ws[1], **kw)
                    nbytes = 4 * m * n * 2 + 2 * n * 2
                else:
                    def fn(x1=x1, x2=x2, r=r, kw=kw, early=early, ws=ws):  # noqa: ANN202
                        return xl.post_ffn_moe_next_norm(x1, x2, r, *ws[:3], scal, ws[3], early_r=early, **kw)
                    nbytes = 5 * m * n * 2 + 4 * n * 2
                before = _compiled(jit)
                fn()
                new = [v for k, v in _compiled(jit).items() if k not in before]
                us = time_graph(fn, m)
                rows.append({"kernel": kind, "m": m, "n": n, "split": split, "low_reg": low, "evict_first": ev,
                             "num_warps": nw, "early_r": early, "us": us, "gbps": nbytes / us / 1e3,
                             "regs": new[0][0] if new else None, "spills": new[0][1] if new else None})
                print("xl", rows[-1], flush=True)
    return rows


def dump_inductor(path: Path) -> None:
    """Compile the eager dense / MoE cross-layer sequences at M = 8192 with Inductor's generated code logged
    (run with TORCH_LOGS=output_code; the code goes to stderr) and record their kernels' times."""
    import torch
    from kvtrap.kernels import references as ref

    bf = torch.bfloat16
    scal = torch.tensor([0.75], device="cuda").to(bf)
    m = 8192
    for n, f, k in ((5376, ref.post_ffn_dense_next_norm_native_ref, 1),
                    (2816, ref.post_ffn_moe_next_norm_native_ref, 2)):  # fmt: skip
        xs = [torch.randn(m, n, device="cuda").to(bf) for _ in range(k + 1)]
        ws = [(torch.rand(n, device="cuda") + 0.5).to(bf) for _ in range(k + 2)]
        args = (*xs, *ws[:-1], scal, ws[-1]) if k == 2 else (xs[0], xs[1], ws[0], scal, ws[1])
        g = torch.compile(f, dynamic=False)
        g(*args)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                g(*args)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=8)
        with path.open("a") as fh:
            fh.write(f"== {f.__name__} N={n} M={m}\n{table}\n")


SWEEPS = {
    "routing": ("routing_sweep", sweep_routing, (1, 64, 256, 8192)),
    "gelu": ("gelu_sweep", sweep_gelu, (1, 64, 128, 256, 8192)),
    "row": ("row_warps_sweep", sweep_row_warps, (1, 256, 8192)),
    "moe": ("moe_warps_sweep", sweep_moe_warps, (1, 256, 8192)),
    "xl": ("cross_layer_sweep", sweep_cross_layer, (8192,)),
    "qkv": ("qkv_sweep", sweep_qkv, (1, 256, 8192)),
    "ab_gelu": ("ab_gelu", ab_gelu, MS),
    "ab_qkv": ("ab_qkv", ab_qkv, (1, 8, 256, 8192)),
    "early_w": ("early_w_sweep", sweep_early_w, (1, 8, 64, 256, 8192)),
}


def run(out: Path, ms: tuple[int, ...], sweeps: tuple[str, ...], only: str = "") -> dict[str, Any]:
    import torch
    import triton

    torch._dynamo.config.cache_size_limit = 64
    try:
        import sglang

        sgl_version = sglang.__version__
    except Exception:  # noqa: BLE001
        sgl_version = None
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "sglang": sgl_version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "method": "CUDA-graph replay, CUDA events; per-call median of 5 trials; bf16 activations",
        "cases": {},
    }
    result["copy_gbps"] = copy_bandwidth()
    print(f"device {result['device']}  copy {result['copy_gbps']:.0f} GB/s", flush=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))

    save()
    for name, case in build_cases().items():
        if only and not any(tok in name for tok in only.split(",")):
            continue
        rows = []
        for m in ms:
            t0 = time.time()
            variants = case["make"](m)
            row: dict[str, Any] = {"m": m}
            for vname, fn in variants.items():
                try:
                    row[vname] = time_graph(fn, m)
                except Exception as e:  # noqa: BLE001
                    row[vname] = None
                    row[vname + "_error"] = f"{type(e).__name__}: {e}"[:300]
            ok = row.get("fused") and case["bytes"] is not None
            row["fused_gbps"] = case["bytes"](m) / (row["fused"] * 1e-6) / 1e9 if ok else None
            rows.append(row)
            print(name, row, f"({time.time() - t0:.1f}s)", flush=True)
            result["cases"][name] = rows
            save()
        torch.cuda.empty_cache()
    for key, fn, ms_ in (SWEEPS[name] for name in sweeps):
        try:
            result[key] = fn(ms_)
        except Exception as e:  # noqa: BLE001
            result[key + "_error"] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()
        save()
    result["copy_gbps_end"] = copy_bandwidth()
    result["copy_gbps"] = max(result["copy_gbps"], result["copy_gbps_end"])
    save()
    return result


def render(result: dict[str, Any]) -> str:
    copy = result["copy_gbps"]
    lines = [
        f"# Fused Gemma 4 kernels: {result['device']}",
        "",
        f"torch {result['torch']}, triton {result['triton']}, sglang {result['sglang']}; {result['date']}.",
        f"Command: `{result['command']}`. Method: {result['method']}.",
        f"Measured device-to-device copy (1 GiB; best of cudaMemcpy and an elementwise copy kernel, at the"
        f" start and end of the run): {copy:.0f} GB/s (read + write).",
        "",
    ]
    for key, run_ in result.get("qkv_runs", {}).items():
        lines.append(f"The `qkv_norm_rope` {'rows come' if key == 'main_rows' else 'launch sweep comes'} from a later run:"
                     f" {run_['device']}, torch {run_['torch']}, triton {run_['triton']}, sglang {run_['sglang']};"
                     f" {run_['date']}; `{run_['command']}`; copy {run_['copy_gbps']:.0f} GB/s.")
    lines += [
        "",
        "Times in microseconds per call. `x Ind` = compile time / fused time (> 1: fused faster);",
        "`x SGL` = SGLang kernel time / fused time (for the cross-layer kernels: upstream's post-FFN kernel followed",
        "by SGLang's JIT CUDA rmsnorm for the next layer's input norm, the pair the fused kernel replaces; where that",
        "JIT kernel cannot be built, `sglang_part`, the post-FFN kernel alone; for `qkv_norm_rope` the SGLang column is the whole",
        "upstream sequence: gemma_qkv_rmsnorm + k/v reshape copies + its JIT CUDA RoPE, plus the dummy K on",
        "KV-shared layers); `before` (where shown) = what a server ran at that place before the fusion, `x before` =",
        "before time / fused time; `%copy` = fused GB/s over the copy rate.",
        "",
    ]
    for name, rows in result["cases"].items():
        has_sgl = any("sglang" in r or "sglang_part" in r for r in rows)
        has_before = any("before" in r for r in rows)
        lines += [f"## {name}", ""]
        hdr = "| M | eager | compile | fused |" + (" SGLang |" if has_sgl else "") + (" before |" if has_before else "")
        hdr += " x eager | x Ind |" + (" x SGL |" if has_sgl else "") + (" x before |" if has_before else "")
        hdr += " fused GB/s | %copy |"
        lines += [hdr, "|" + "---|" * (hdr.count("|") - 1)]
        for r in rows:
            f = r.get("fused")
            sg = r.get("sglang", r.get("sglang_part"))

            def fmt(v: float | None) -> str:
                return "-" if v is None else f"{v:.2f}"

            def ratio(a: float | None, b: float | None) -> str:
                return "-" if a is None or b is None else f"{a / b:.2f}"

            cells = [str(r["m"]), fmt(r.get("eager")), fmt(r.get("compile")), fmt(f)]
            if has_sgl:
                cells.append(fmt(sg))
            if has_before:
                cells.append(fmt(r.get("before")))
            cells += [ratio(r.get("eager"), f), ratio(r.get("compile"), f)]
            if has_sgl:
                cells.append(ratio(sg, f))
            if has_before:
                cells.append(ratio(r.get("before"), f))
            gb = r.get("fused_gbps")
            cells += [fmt(gb) if gb is None else f"{gb:.0f}", "-" if gb is None else f"{100 * gb / copy:.0f}%"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if "routing_sweep" in result:
        lines += ["## Routing launch sweep (us)", "", "| M | block_m | warps | us |", "|---|---|---|---|"]
        lines += [f"| {r['m']} | {r['block_m']} | {r['num_warps']} | {r['us']:.2f} |" for r in result["routing_sweep"]]
        lines.append("")
    if "gelu_sweep" in result:
        lines += ["## gelu_tanh_mul launch sweep (us)", "", "| M | block_m | warps | us |", "|---|---|---|---|"]
        lines += [f"| {r['m']} | {r['block_m']} | {r['num_warps']} | {r['us']:.2f} |" for r in result["gelu_sweep"]]
        lines.append("")
    if "moe_warps_sweep" in result:
        lines += ["## post_ffn_moe_next_norm warps / residual-load sweep (N=2816)", "",
                  "| M | warps | early_r | us | GB/s | %copy |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['m']} | {r['num_warps']} | {r.get('early_r', False)} | {r['us']:.2f} | {r['gbps']:.0f} |"
                  f" {100 * r['gbps'] / copy:.0f}% |" for r in result["moe_warps_sweep"]]
        lines.append("")
    if "cross_layer_sweep" in result:
        lines += ["## Cross-layer kernels: launch-knob sweep (first row of each kernel = the committed default)", "",
                  "`regs`: registers per thread of the variant compiled for that row (None: compiled earlier in",
                  "the run, so not attributed).", "",
                  "| kernel | M | N | split | low_reg | evict_first | warps | early_r | regs (ptxas) | us | GB/s | %copy |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['kernel']} | {r['m']} | {r['n']} | {r['split']} | {r['low_reg']} | {r['evict_first']} |"
                  f" {r['num_warps']} | {r['early_r'] if r['kernel'] == 'moe' else '-'} | {r['regs']} |"
                  f" {r['us']:.2f} | {r['gbps']:.0f} | {100 * r['gbps'] / copy:.0f}% |"
                  for r in result["cross_layer_sweep"]]
        lines.append("")
    if "early_w_sweep" in result:
        lines += ["## E2B/E4B layer-override kernels: weight-load sweep (N=2560, us)", "",
                  "| M | early_w | post_attn_pair_rmsnorm | rmsnorm_residual_scalar_next_norm |", "|---|---|---|---|"]
        lines += [f"| {r['m']} | {r['early_w']} | {r['pair_us']:.2f} | {r['ple_next_us']:.2f} |"
                  for r in result["early_w_sweep"]]
        lines.append("")
    if "qkv_sweep" in result:
        lines += ["## qkv_norm_rope launch sweep (31B; us)", "", "| M | D | heads/program | warps | us |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['m']} | {r['d']} | {r['heads_per_program']} | {r['num_warps']} | {r['us']:.2f} |"
                  for r in result["qkv_sweep"]]
        lines.append("")
    for key, title in (("ab_gelu", "gelu_tanh_mul vs Inductor, interleaved"),
                       ("ab_qkv", "qkv_norm_rope launch shapes, interleaved")):
        if key not in result:
            continue
        ab_run = result.get("ab_runs", result)  # a later run merged into this file, or this run itself
        ab_copy = ab_run["copy_gbps"]
        lines += [f"## {title} (us per call)", "",
                  f"Run: {ab_run['device']}, torch {ab_run['torch']}, triton {ab_run['triton']}; {ab_run['date']};"
                  f" `{ab_run['command']}`; `%copy` against that run's copy rate, {ab_copy:.0f} GB/s.", "",
                  "Each variant a CUDA graph of 50 calls (10 at M = 8192), replayed once per round in rotating"
                  f" order, {result[key][0]['trials']} rounds. `p10-p90`: spread of the per-call times; `x base` / `p10`: median and"
                  " 10th percentile of the per-round ratios base / variant (> 1: variant faster; base = the first"
                  " row of each M, Inductor for gelu, the launch rule for qkv); `wins`: rounds the variant was"
                  " faster than the base.", "",
                  "| case | M | variant | median | p10-p90 | x base | p10 | wins | GB/s | %copy |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result[key]:
            xb = f"{r['x_base']:.3f}" if "x_base" in r else "-"
            xp = f"{r['x_base_p10']:.3f}" if "x_base_p10" in r else "-"
            wins = f"{r['wins']}/{r['trials']}" if "wins" in r else "-"
            gb = r.get("gbps")
            lines.append(f"| {r['case']} | {r['m']} | {r['variant']} | {r['median']:.3f} | {r['p10']:.3f}-{r['p90']:.3f}"
                         f" | {xb} | {xp} | {wins} | {'-' if gb is None else f'{gb:.0f}'} |"
                         f" {'-' if gb is None else f'{100 * gb / ab_copy:.1f}%'} |")
        lines.append("")
    if "row_warps_sweep" in result:
        lines += ["## Row-kernel warps sweep (us)", "", "| M | N | warps | dense | triple |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['m']} | {r['n']} | {r['num_warps']} | {r['dense_us']:.2f} | {r['triple_us']:.2f} |"
            for r in result["row_warps_sweep"]
        ]
        lines.append("")
    for key, val in result.get("earlier", {}).items():
        lines += [f"## {key} (earlier run, not re-measured here)", "", val["note"], ""]
        lines += val["md"]
        lines.append("")
    lines += goals(result)
    return "\n".join(lines)


def goals(result: dict[str, Any]) -> list[str]:
    """The issue's goals checked mechanically against this run's rows (plus notes added by hand)."""
    copy = result["copy_gbps"]
    out = ["## Goals against this run (computed from the tables above)", ""]
    for name, rows in result["cases"].items():
        worst = min(rows, key=lambda r: (r["compile"] or 0) / (r["fused"] or 1))
        lost = [r["m"] for r in rows if r.get("compile") and r.get("fused") and r["compile"] < r["fused"]]
        line = (f"- {name}: vs torch.compile min {worst['compile'] / worst['fused']:.2f}x (M = {worst['m']}); "
                + ("faster or equal at every M" if not lost else f"**slower at M = {lost}**"))
        big = [r for r in rows if r["m"] == 8192 and r.get("fused_gbps")]
        if big and not name.startswith("routing"):
            pct = 100 * big[0]["fused_gbps"] / copy
            line += f"; M = 8192: {pct:.0f}% of copy" + (" (>= 80%)" if pct >= 80 else " (**< 80%**)")
        ratios = [r["sglang"] / r["fused"] for r in rows if r.get("sglang") and r.get("fused")]
        if ratios:
            line += f"; vs SGLang {min(ratios):.2f}-{max(ratios):.2f}x" + (" (**slower at some M**)" if min(ratios) < 1 else "")
        before = [r["before"] / r["fused"] for r in rows if r.get("before") and r.get("fused")]
        if before:
            line += (f"; vs the path it replaces in a server {min(before):.2f}-{max(before):.2f}x"
                     + (" (**slower at some M**)" if min(before) < 1 else ""))
        out.append(line)
    vs_default = [r for r in result.get("ab_gelu", []) if r["variant"].startswith("fused rule") and "x_base" in r
                  and not r.get("best_inductor")]
    vs_best = [r for r in result.get("ab_gelu", []) if r.get("best_inductor")]
    if vs_default and vs_best:
        lost = sorted({r["m"] for r in vs_default + vs_best if r["x_base"] <= 1.0})
        out.append("- gelu_tanh_mul interleaved (paired medians): vs torch.compile as it runs "
                   + ", ".join(f"M={r['m']} {r['x_base']:.3f}x" for r in vs_default)
                   + "; vs the fastest launch of Inductor's own kernel "
                   + ", ".join(f"M={r['m']} {r['x_base']:.3f}x" for r in vs_best) + "; "
                   + ("faster at every M" if not lost else f"**not faster at M = {lost}**"))
    for r in result.get("ab_qkv", []):
        if r["variant"].startswith("rule") and r["m"] == 8192 and r.get("gbps") and "token-major" in r["variant"]:
            ab_copy = result.get("ab_runs", result)["copy_gbps"]
            pct = 100 * r["gbps"] / ab_copy
            out.append(f"- {r['case']} interleaved, M = 8192, launch rule ({r['variant']}): {pct:.1f}% of copy"
                       + (" (>= 80%)" if pct >= 80 else " (**< 80%**)"))
    out += [""] + result.get("notes", [])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write results JSON here (runs the benchmark; needs CUDA)")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated M values")
    ap.add_argument("--sweeps", nargs="?", const=",".join(SWEEPS), default="",
                    help=f"also sweep launch configs: comma-separated subset of {','.join(SWEEPS)} (default all)")
    ap.add_argument("--cases", default="", help="comma-separated substrings: time only matching cases")
    ap.add_argument("--sweeps-only", action="store_true", help="run only the sweeps (no main tables)")
    ap.add_argument("--inductor", type=Path, help="append Inductor's kernel times for the cross-layer"
                    " sequences here (set TORCH_LOGS=output_code to log its code) and exit")
    ap.add_argument("--render", nargs=2, type=Path, metavar=("JSON", "MD"), help="render a results JSON")
    args = ap.parse_args()
    if args.render:
        args.render[1].write_text(render(json.loads(args.render[0].read_text())) + "\n")
        return
    if args.out is None:
        ap.error("--out or --render required")
    _import_kernels()
    if args.inductor:
        dump_inductor(args.inductor)
        return
    sweeps = tuple(x for x in args.sweeps.split(",") if x)
    ms = () if args.sweeps_only else tuple(int(m) for m in args.ms.split(","))
    res = run(args.out, ms, sweeps, args.cases)
    print(render(res))


if __name__ == "__main__":
    main()
