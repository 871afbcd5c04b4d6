"""``kvtrap doctor``: is kvtrap usable here, and does the trap really fire on this machine's SGLang?"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import click

from kvtrap import __version__
from kvtrap.config import ENV_ARM, ENV_FIELDS, Config, ConfigError, env_armed

MIN_SGLANG = (0, 5, 13)  # SWA allocator moved to mem_cache/allocator/swa.py; _resolve_swa_kv_pool exists
TESTED_SGLANG = ("0.5.23",)


@dataclass
class Check:
    name: str
    status: str  # "ok", "fail", "info"
    detail: str


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def parse_version(text: str) -> tuple[int, ...]:
    """Leading numeric release of a version string: '0.5.24.dev3+gabc' -> (0, 5, 24)."""
    out: list[int] = []
    for part in text.split("+")[0].split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        out.append(int(digits))
        if len(digits) != len(part):
            break
    return tuple(out)


def check_versions() -> list[Check]:
    checks = [Check("kvtrap", "info", __version__)]
    sgl = _version("sglang")
    if sgl is None:
        checks.append(Check("sglang", "fail", "not installed (pip install 'kvtrap[test]' installs the tested 0.5.23)"))
    else:
        v = parse_version(sgl)
        if v < MIN_SGLANG:
            checks.append(Check("sglang", "fail", f"{sgl} is older than the oldest supported 0.5.13"))
        elif sgl in TESTED_SGLANG:
            checks.append(Check("sglang", "ok", f"{sgl} (supported, tested)"))
        else:
            checks.append(Check("sglang", "ok", f"{sgl} (supported >= 0.5.13; tested: {', '.join(TESTED_SGLANG)})"))
    for dist, label in (("torch", "torch"), ("triton", "triton"), ("flashinfer-python", "flashinfer")):
        checks.append(Check(label, "info", _version(dist) or "not installed"))
    return checks


def check_gpu() -> Check:
    try:
        import torch
    except ImportError:
        return Check("gpu", "info", "torch not installed")
    if not torch.cuda.is_available():
        return Check("gpu", "info", "no CUDA device: host traps work; the device guard is off")
    idx = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(idx)
    return Check("gpu", "info", f"{torch.cuda.get_device_name(idx)} (sm_{major}{minor})")


def check_plugin() -> list[Check]:
    eps = [ep for ep in metadata.entry_points(group="sglang.srt.plugins") if ep.name == "kvtrap"]
    out = []
    if not eps:
        out.append(Check("plugin entry point", "fail", "sglang.srt.plugins:kvtrap not found; reinstall kvtrap"))
    elif eps[0].value != "kvtrap.plugin:register":
        out.append(Check("plugin entry point", "fail", f"points at {eps[0].value}, expected kvtrap.plugin:register"))
    else:
        out.append(Check("plugin entry point", "ok", "sglang.srt.plugins: kvtrap = kvtrap.plugin:register"))
    allow = os.environ.get("SGLANG_PLUGINS")
    if allow is not None and "kvtrap" not in [p.strip() for p in allow.split(",")]:
        out.append(Check("SGLANG_PLUGINS", "fail", f"whitelist {allow!r} excludes kvtrap"))
    try:
        state = "1: armed in every SGLang process" if env_armed() else "unset/0: SGLang runs without kvtrap"
        out.append(Check(ENV_ARM, "info", state))
    except ConfigError as exc:
        out.append(Check(ENV_ARM, "fail", str(exc)))
    return out


def check_settings(environ: Mapping[str, str] | None = None) -> list[Check]:
    """The ``KVTRAP_*`` settings an armed SGLang process would use, as the plugin would read them.

    A value the plugin would refuse (it then logs "kvtrap is NOT armed" and SGLang runs untrapped)
    fails here, and so does a dump directory the process could not write.
    """
    env = os.environ if environ is None else environ
    try:
        config = Config.from_env(env)
    except ConfigError as exc:
        return [Check("KVTRAP settings", "fail", f"{exc} (the SGLang plugin would log 'kvtrap is NOT armed')")]
    given = ", ".join(f"{var}={env[var]}" for var in ENV_FIELDS if env.get(var, "").strip()) or "defaults"
    out = [Check("KVTRAP settings", "ok",
                 f"{given}: mode={config.mode} guard={config.guard} fix={config.fix}"
                 + (f" inject={','.join(config.inject)}" if config.inject else ""))]
    out.append(_check_dump_dir(config.dump_dir))
    others = sorted(k for k in env if k.startswith("KVTRAP_") and k not in ENV_FIELDS)
    if others:
        out.append(Check("other KVTRAP_ variables", "info", f"{', '.join(others)} (not arming settings)"))
    return out


def _check_dump_dir(path: Path) -> Check:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the directory is made on the first dump: its nearest existing parent decides
    if not probe.is_dir():
        return Check("KVTRAP_DUMP_DIR", "fail", f"{path}: {probe} is not a directory; dumps could not be written")
    if not os.access(probe, os.W_OK | os.X_OK):
        return Check("KVTRAP_DUMP_DIR", "fail", f"{path}: {probe} is not writable; dumps could not be written")
    return Check("KVTRAP_DUMP_DIR", "ok", f"{path.resolve()} ({'exists' if probe == path else 'made on the first dump'})")


def check_targets() -> list[Check]:
    from kvtrap.capture.arming import all_targets
    from kvtrap.capture.patching import resolve

    # Targets listed under several modules (older SGLang layouts) need one module that resolves.
    by_method: dict[tuple[str, str], list[tuple[str, bool, str]]] = {}
    for target in all_targets():
        ok, why = resolve(target)
        by_method.setdefault((target.cls, target.attr), []).append((target.module, ok, why))
    out = []
    for (cls, attr), results in by_method.items():
        good = [m for m, ok, _ in results if ok]
        if good:
            out.append(Check(f"hook {cls}.{attr}", "ok", good[0]))
            continue
        in_source = [m for m, _, why in results if _needs_cuda_ops(why) and _defined_in_source(m, cls, attr)]
        if in_source:
            out.append(Check(f"hook {cls}.{attr}", "info", f"{in_source[0]}: the method is in SGLang's source, but"
                             " the module needs sgl_kernel's CUDA op library, which cannot load here (no CUDA);"
                             " the hook attaches where SGLang imports it"))
        else:
            out.append(Check(f"hook {cls}.{attr}", "fail", "; ".join(why for _, _, why in results)))
    return out


def _needs_cuda_ops(why: str) -> bool:
    """An import failure because sgl_kernel's compiled op library (``common_ops``) cannot load without CUDA
    (fa3's module imports sgl_kernel at import time): expected on a CPU-only machine, not a finding."""
    import torch

    return "common_ops" in why and not torch.cuda.is_available()


def _defined_in_source(module: str, cls: str, attr: str) -> bool:
    """Whether ``module``'s source defines ``cls.attr`` (read, not imported), so a rename still shows."""
    import ast
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
        origin = spec.origin if spec is not None else None
        tree = ast.parse(Path(origin).read_text()) if origin else None
    except (ImportError, OSError, SyntaxError, ValueError):
        return False
    for node in getattr(tree, "body", []):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == attr for n in node.body)
    return False


def use_cpu_allocator_path(alloc: object) -> bool:
    """Make a CPU-built SWA allocator take SGLang's torch path; True when that changed anything.

    SGLang decides per process whether its paged allocators launch Triton kernels
    (``current_platform.capabilities.supports_triton``): on a CUDA machine they do, and a Triton kernel
    cannot read the CPU tensors of the doctor's small pool ("Pointer argument ... cannot be accessed from
    Triton"). The doctor's pool stays on the CPU on purpose (no CUDA context, no GPU memory taken from a
    server running beside it), so it switches the sub-allocators to SGLang's own torch implementation of
    the same allocation, which the trap wraps exactly as it wraps the Triton one.
    """
    changed = False
    for name in ("full_attn_allocator", "swa_attn_allocator"):
        sub = getattr(alloc, name, None)
        if sub is not None and getattr(sub, "use_triton_kernels", False) and str(sub.device) == "cpu":
            sub.use_triton_kernels = False
            changed = True
    return changed


def prove_allocator_trap() -> Check:
    """Inject a real fault into a real CPU SWAKVPool + allocator, trap it, read the dump back."""
    import torch

    import kvtrap
    from kvtrap.record.dumpfile import load_dump

    try:
        from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

        try:
            from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
        except ImportError:  # SGLang < 0.5.13 layout
            from sglang.srt.mem_cache.swa_memory_pool import SWATokenToKVPoolAllocator
    except Exception as exc:
        return Check("allocator trap", "fail", f"cannot import SGLang's SWA pool/allocator: {exc}")
    page, full_pages, swa_pages = 16, 32, 8
    pool = SWAKVPool(
        size=full_pages * page, size_swa=swa_pages * page, page_size=page, dtype=torch.bfloat16,
        head_num=1, head_dim=8, swa_attention_layer_ids=[0], full_attention_layer_ids=[1], device="cpu",
    )
    alloc = SWATokenToKVPoolAllocator(
        size=pool.size, size_swa=pool.size_swa, page_size=page, dtype=torch.bfloat16, device="cpu",
        kvcache=pool, need_sort=False,
    )
    bypassed = use_cpu_allocator_path(alloc)
    zeros = torch.zeros(1, dtype=torch.int64)
    seq = torch.tensor([2 * page])
    extend: Callable[[], object] = lambda: alloc.alloc_extend(  # noqa: E731
        zeros, zeros.clone(), seq, seq.clone(), torch.tensor([-1]), 2 * page
    )
    bad_page = swa_pages + 40
    with tempfile.TemporaryDirectory(prefix="kvtrap-doctor-") as tmp, kvtrap.armed(mode="raise", dump_dir=tmp):
        if extend() is None:
            return Check("allocator trap", "fail", "a clean allocation returned None")
        alloc.swa_attn_allocator.free_pages[0] = bad_page  # the injected fault: a corrupt free list
        try:
            extend()
        except kvtrap.KVTrapError as err:
            if err.dump_path is None:
                return Check("allocator trap", "fail", f"trapped but no dump: {err.dump_error}")
            dump = load_dump(err.dump_path)
            v = dump.violation
            if v.kind != "swa_slot_out_of_range" or v.value != bad_page * page:
                return Check("allocator trap", "fail", f"trapped with unexpected finding {v.kind} value={v.value}")
            how = " (CPU pool: SGLang's torch allocation path, its Triton kernels need CUDA tensors)" if bypassed else ""
            return Check(
                "allocator trap", "ok",
                f"injected SWA page {bad_page} into a real SWAKVPool ({swa_pages} pages): trapped, dump read back "
                f"({len(dump.tensors)} tensors){how}",
            )
    return Check("allocator trap", "fail", "the injected fault was NOT trapped")


def check_gemma4_kernels() -> list[Check]:
    """``KVTRAP_GEMMA4_KERNELS``: off (one line), or on: do the SGLang methods it routes exist, which fusions apply."""
    from kvtrap.capture.patching import ModuleFunctionTarget, resolve
    from kvtrap.config import ENV_GEMMA4_KERNELS, env_gemma4_kernels
    from kvtrap.kernels.sglang_gemma4 import RELEASED, expected_fusions, targets

    try:
        on = env_gemma4_kernels()
    except ConfigError as exc:
        return [Check(ENV_GEMMA4_KERNELS, "fail", str(exc))]
    if not on:
        return [Check(ENV_GEMMA4_KERNELS, "info", "unset/0: off (1 routes SGLang's Gemma 4 layers to kvtrap's fused kernels)")]
    state = (
        "1: fused kernels where a layer qualifies (the fused paths need a CUDA GPU and Triton; elsewhere every "
        "layer runs SGLang's code; the model logs its plan at WARNING)"
    )
    missing = [
        f"{t.module}.{t.attr if isinstance(t, ModuleFunctionTarget) else f'{t.cls}.{t.attr}'}: {why}"
        for t in targets()
        for ok, why in [resolve(t)]
        if not ok
    ]
    fusions = "; ".join(f"{name}: {', '.join(expected_fusions(ple=p, moe=m))}" for name, (p, m) in RELEASED.items())
    return [
        Check(ENV_GEMMA4_KERNELS, "info", state),
        Check("gemma4 routes", "fail" if missing else "ok", "; ".join(missing) or f"{len(targets())} SGLang methods found"),
        Check(
            "gemma4 fusions",
            "info",
            f"TP=1 bf16 on CUDA: {fusions}; TP>1: pair_norm, triple_norm and cross_layer fall back; "
            "--enable-deterministic-inference: all fall back",
        ),
    ]


def check_default_backend() -> Check:
    """Which attention backend SGLang would pick on this machine for MHA (Gemma 4, Llama, Qwen) and MLA models,
    asked of SGLang's own ``get_default_attn_backend`` with a weight-free Gemma 4 config, and whether kvtrap's
    attention traps cover it (the allocator traps apply whatever the backend)."""
    from kvtrap.capture.hooks import covered_attention_backends

    try:
        from sglang.srt.arg_groups.model_override_base import get_default_attn_backend
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.server_args import ServerArgs

        from kvtrap.repro.models import variant
    except Exception as exc:  # an SGLang layout this doctor does not know: say so, do not fail the run
        return Check("default attention backend", "info", f"cannot ask SGLang ({type(exc).__name__}: {exc})")
    import json

    covered = covered_attention_backends()
    with tempfile.TemporaryDirectory(prefix="kvtrap-doctor-model-") as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(variant("e4b", 6).target_config(), fh)
        try:
            args = ServerArgs(model_path=tmp, load_format="dummy")
            model = ModelConfig.from_server_args(args)
            picks = {kind: get_default_attn_backend(args, mla, model) for kind, mla in (("MHA", False), ("MLA", True))}
        except Exception as exc:
            return Check("default attention backend", "info", f"SGLang could not say ({type(exc).__name__}: {exc})")
    parts = [f"{kind}: {name} ({'kvtrap checks its KV index tables' if name in covered else 'NOT covered by the attention traps'})"
             for kind, name in picks.items()]  # fmt: skip
    tail = f"; covered: {', '.join(covered) or 'none'}"
    if covered and picks["MHA"] not in covered:
        tail += f" (for an MHA model, --attention-backend {covered[0]} is guarded)"
    import torch

    if not torch.cuda.is_available():
        tail += "; no CUDA GPU here, so SGLang's pick on a GPU machine differs (fa3 on Hopper, trtllm_mha on Blackwell)"
    return Check("default attention backend", "info", "; ".join(parts) + tail)


def run_checks() -> list[Check]:
    checks = check_versions()
    checks.append(check_gpu())
    checks.extend(check_plugin())
    checks.extend(check_settings())
    if any(c.name == "sglang" and c.status == "fail" for c in checks):
        checks.append(Check("hooks", "fail", "skipped: SGLang is missing or unsupported"))
        return checks
    checks.extend(check_targets())
    checks.append(check_default_backend())
    checks.extend(check_gemma4_kernels())
    try:
        checks.append(prove_allocator_trap())
    except Exception as exc:  # the doctor reports, it does not crash
        checks.append(Check("allocator trap", "fail", f"{type(exc).__name__}: {exc}"))
    return checks


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(as_json: bool) -> None:
    """Check versions, the plugin entry point and hook targets, and prove the allocator trap here."""
    import logging

    logging.getLogger("sglang").setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    checks = run_checks()
    if as_json:
        import orjson

        click.echo(orjson.dumps([c.__dict__ for c in checks], option=orjson.OPT_INDENT_2).decode())
    else:
        marks = {"ok": "ok  ", "fail": "FAIL", "info": "    "}
        for c in checks:
            click.echo(f"{marks[c.status]} {c.name}: {c.detail}")
    failed = [c for c in checks if c.status == "fail"]
    if not as_json:
        click.echo(f"{len(failed)} check(s) failed" if failed else "all checks passed")
    sys.exit(1 if failed else 0)
