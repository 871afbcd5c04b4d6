"""Writing and reading kvtrap dumps: ``manifest.json`` (orjson) + ``tensors.safetensors``. No pickle.

The format is documented, with its version history, in ``dumps/FORMAT.md``. A dump directory is made
under a temporary name and renamed into place, so a reader never sees half a dump. Reading needs numpy
and safetensors only (not torch), so dumps can be studied on a laptop.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from kvtrap.record import schema
from kvtrap.record.context import ABSENT, Context
from kvtrap.record.violation import Violation

if TYPE_CHECKING:  # settings are passed in by the capture side; the record never imports them
    from kvtrap.config import Config

SCHEMA = "kvtrap.dump"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
_TMP_PREFIX = ".tmp-"


class DumpError(Exception):
    """A path is not a dump kvtrap can read. The message says which file and why (one line)."""


@dataclass(frozen=True)
class TensorInfo:
    """``tensors.<name>`` / ``tensors_omitted.<name>``."""

    shape: list[int]
    dtype: str
    nbytes: int | None = None


@dataclass(frozen=True)
class GpuInfo:
    index: int | None = None
    name: str | None = None
    capability: str | None = None


@dataclass(frozen=True)
class ParallelInfo:
    """``parallel``: where the process sits in SGLang's parallel layout (a field SGLang has not set is null)."""

    tp_rank: int | None = None
    tp_size: int | None = None
    dp_rank: int | None = None
    attn_dp_rank: int | None = None
    pp_rank: int | None = None
    pp_size: int | None = None
    world_rank: int | None = None
    world_size: int | None = None


@dataclass(frozen=True)
class ConfigRecord:
    """``config``: :meth:`kvtrap.config.Config.to_json` as written."""

    mode: str | None = None
    dump_dir: str | None = None
    max_dumps: int | None = None
    max_dump_mb: int | None = None
    log_limit: int | None = None
    guard: str | None = None
    inject: list[str] | None = None
    fix: str | None = None
    free_checks: str | None = None
    allocator_trap: str | None = None


@dataclass(frozen=True)
class ManifestRecord:
    """The manifest's shape and types (``dumps/FORMAT.md``), checked by :func:`load_dump` before use."""

    schema: str
    schema_version: int
    kind: str
    violation: Violation
    tensors: dict[str, TensorInfo]
    time: float | None = None
    time_iso: str | None = None
    host: str | None = None
    pid: int | None = None
    rank: int | None = None
    seq: int | None = None
    versions: dict[str, str | None] | None = None
    gpu: GpuInfo | None = None
    parallel: ParallelInfo | None = None
    config: ConfigRecord | None = None
    context: Context | None = None
    tensors_omitted: dict[str, TensorInfo] | None = None


#: Tensors readers index with (page ids, slots, lengths): a dump holding them as floats is refused.
INDEX_TENSORS = ("page_table", "swa_page_table", "cache_seqlens", "seq_lens", "req_pool_indices",
                 "out_full_indices", "out_swa_indices", "prefix_lens", "last_loc", "guard_entries")


@dataclass(frozen=True)
class Dump:
    """A dump as read: ``manifest`` is the JSON verbatim (for views that show or compare everything
    recorded, unknown fields included); :attr:`record` is the same manifest as typed pieces, which is
    what readers that interpret a dump use. ``tensors`` holds the arrays by name."""

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, np.ndarray]

    @cached_property
    def record(self) -> ManifestRecord:
        rec = schema.from_json(ManifestRecord, self.manifest, ABSENT)
        if rec.context is None:  # a manifest without context: every piece is "not in the dump"
            rec = replace(rec, context=schema.from_json(Context, {}, ABSENT))
        return rec

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def violation(self) -> Violation:
        return self.record.violation

    @property
    def context(self) -> Context:
        """The context as typed pieces; a piece the dump does not hold is ``None``."""
        return self.record.context


# ----------------------------------------------------------------------------------------------- write
_counter = itertools.count(1)
_lock = threading.Lock()
_written = 0


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("kvtrap", "sglang", "torch", "triton", "flashinfer-python"):
        try:
            out[dist.replace("-python", "")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist.replace("-python", "")] = None
    return out


def _gpu() -> dict[str, Any] | None:
    import sys

    torch = sys.modules.get("torch")  # never import torch (or create a CUDA context) just to describe it
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    idx = torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(idx)
    return {"index": idx, "name": torch.cuda.get_device_name(idx), "capability": f"sm_{cap[0]}{cap[1]}"}


#: ``parallel`` field -> the name SGLang 0.5.23's ``get_parallel()`` gives it.
_PARALLEL_NAMES = {"tp_rank": "tp_rank", "tp_size": "tp_size", "dp_rank": "dp_rank", "attn_dp_rank": "attn_dp_rank",
                   "pp_rank": "pp_rank", "pp_size": "pp_size", "world_rank": "launch_world_rank",
                   "world_size": "launch_world_size"}  # fmt: skip


def _parallel() -> dict[str, int | None] | None:
    """This process's ranks as SGLang published them; ``None`` outside SGLang. Never imports SGLang: the module
    is read only when the process already loaded it (a dump is written from inside an SGLang scheduler)."""
    import sys

    ctx = sys.modules.get("sglang.srt.runtime_context")
    if ctx is None:
        return None
    try:
        par = ctx.get_parallel()
    except Exception:  # another SGLang layout: no parallel record rather than no dump
        return None
    out: dict[str, int | None] = {}
    for field, name in _PARALLEL_NAMES.items():
        try:
            value = getattr(par, name)
        except Exception:  # SGLang raises for ranks not written in this process (e.g. before the groups exist)
            value = None
        out[field] = int(value) if isinstance(value, int) and not isinstance(value, bool) else None
    return out if any(v is not None for v in out.values()) else None


def _rank() -> int | None:
    import sys

    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            return int(torch.distributed.get_rank())
    except Exception:  # a half-initialised process group must not break a dump
        pass
    for var in ("SGLANG_TP_RANK", "RANK", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value)
    # torch.Tensor without importing torch here; bf16 has no numpy type, so widen it
    t = value.detach()
    if str(t.dtype) == "torch.bfloat16":
        t = t.float()
    return np.ascontiguousarray(t.to("cpu").numpy())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return repr(obj)


def dump_name(kind: str, rank: int | None, seq: int, when: float) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(when)) + f"{int((when % 1) * 1e3):03d}"
    host = socket.gethostname().split(".")[0] or "host"
    r = "x" if rank is None else str(rank)
    return f"{stamp}-{host}-r{r}-p{os.getpid()}-{seq:03d}-{kind}"


def write_dump(
    violation: Violation,
    context: Context,
    tensors: Mapping[str, Any],
    config: Config,
) -> Path | None:
    """Write one dump; return its directory, or ``None`` when the per-process cap is reached.

    Tensors are copied to host memory (a device sync: call this only outside graph capture). Tensors
    past ``config.max_dump_bytes`` are left out, largest first, and listed under ``tensors_omitted``.
    Raises ``OSError`` (full disk, no permission) after removing any partial output.
    """
    global _written
    with _lock:
        if _written >= config.max_dumps:
            return None
        _written += 1  # reserved now (no two threads take the last slot), given back if the write fails
        seq = next(_counter)
    try:
        return _write(violation, context, tensors, config, seq)
    except BaseException:
        with _lock:
            _written -= 1
        raise


def _nbytes(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    size = 4 if str(value.dtype) == "torch.bfloat16" else value.element_size()  # bf16 is widened
    return int(value.numel()) * int(size)


def _write(
    violation: Violation, context: Context, tensors: Mapping[str, Any], config: Config, seq: int
) -> Path:
    when = time.time()
    rank = _rank()
    # Budget on the metadata first, so an oversized device tensor is never copied to the host.
    present = {name: value for name, value in tensors.items() if value is not None}
    budget = config.max_dump_bytes
    arrays: dict[str, np.ndarray] = {}
    index: dict[str, dict[str, Any]] = {}
    omitted: dict[str, dict[str, Any]] = {}
    for name in sorted(present, key=lambda n: _nbytes(present[n])):
        nbytes = _nbytes(present[name])
        if nbytes <= budget:
            budget -= nbytes
            arr = _to_numpy(present[name])
            arrays[name] = arr
            index[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "nbytes": int(arr.nbytes)}
        else:
            value = present[name]
            dtype = str(value.dtype).replace("torch.", "")
            omitted[name] = {"shape": list(value.shape), "dtype": dtype, "nbytes": nbytes}

    manifest = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kind": violation.kind,
        "time": when,
        "time_iso": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int((when % 1) * 1e6):06d}Z",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "rank": rank,
        "seq": seq,
        "versions": _versions(),
        "gpu": _gpu(),
        "parallel": _parallel(),
        "config": config.to_json(),
        "violation": violation.to_json(),
        "context": context.to_json(),
        "tensors": index,
        "tensors_omitted": omitted,
    }

    root = Path(config.dump_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = dump_name(violation.kind, rank, seq, when)
    tmp = root / (_TMP_PREFIX + name)
    final = root / name
    try:
        tmp.mkdir()
        if arrays:
            from safetensors.numpy import save_file

            save_file(arrays, str(tmp / TENSORS))
            _fsync(tmp / TENSORS)
        with open(tmp / MANIFEST, "wb") as fh:
            fh.write(orjson.dumps(manifest, default=_json_default, option=orjson.OPT_INDENT_2))
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, final)
        _fsync(root)  # the rename itself survives a crash of the host
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the data files are already synced
        pass
    finally:
        os.close(fd)


def reset_dump_count() -> None:
    """Forget how many dumps this process wrote (tests, and a fresh ``armed()`` session)."""
    global _written
    with _lock:
        _written = 0


# ------------------------------------------------------------------------------------------------ read
def load_dump(path: str | os.PathLike[str], *, tensors: bool = True) -> Dump:
    """Read a dump directory (or its ``manifest.json``). Raises :class:`DumpError` on anything malformed.

    The manifest is checked against :class:`ManifestRecord` (shape *and* types) before anything reads
    it, so every reader can trust the types ``dumps/FORMAT.md`` gives.
    """
    p = Path(path)
    if p.name == MANIFEST and p.is_file():
        p = p.parent
    if not p.exists():
        raise DumpError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise DumpError(f"{p}: not a kvtrap dump (a dump is a directory holding {MANIFEST})")
    mpath = p / MANIFEST
    if not mpath.is_file():
        raise DumpError(f"{p}: not a kvtrap dump (no {MANIFEST})")
    raw = _read_bytes(mpath)
    try:
        manifest = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DumpError(f"{mpath}: not valid JSON ({exc}); the dump is truncated or damaged") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise DumpError(f"{mpath}: not a kvtrap manifest (schema is not {SCHEMA!r})")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise DumpError(f"{mpath}: schema_version missing or not an integer")
    if version > SCHEMA_VERSION:
        raise DumpError(
            f"{mpath}: written with dump schema {version}, newer than this kvtrap reads ({SCHEMA_VERSION});"
            " upgrade kvtrap"
        )
    for key in ("kind", "violation", "tensors"):
        if key not in manifest:
            raise DumpError(f"{mpath}: required field {key!r} is missing")
    if not isinstance(manifest["violation"], dict) or "kind" not in manifest["violation"]:
        raise DumpError(f"{mpath}: field 'violation' is malformed")
    try:
        schema.check_object(manifest, ManifestRecord, "manifest")
    except schema.RecordTypeError as exc:
        raise DumpError(f"{mpath}: {exc}") from None
    arrays: dict[str, np.ndarray] = {}
    if tensors and manifest["tensors"]:
        tpath = p / TENSORS
        if not tpath.is_file():
            raise DumpError(f"{tpath}: missing, but the manifest lists {len(manifest['tensors'])} tensor(s)")
        data = _read_bytes(tpath)
        try:
            from safetensors.numpy import load

            arrays = load(data)
        except Exception as exc:  # safetensors raises several types for damaged files
            raise DumpError(f"{tpath}: cannot be read ({exc}); the file is truncated or damaged") from None
        missing = sorted(set(manifest["tensors"]) - set(arrays))
        if missing:
            raise DumpError(f"{tpath}: tensors listed in the manifest are missing: {', '.join(missing)}")
        for name in INDEX_TENSORS:
            if name in arrays and not np.issubdtype(arrays[name].dtype, np.integer):
                raise DumpError(f"{tpath}: tensor {name!r} holds {arrays[name].dtype}, expected integers")
    return Dump(path=p, manifest=manifest, tensors=arrays)


def _read_bytes(path: Path) -> bytes:
    """The file's bytes; an OS error becomes a :class:`DumpError` naming the real cause."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DumpError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def find_dumps(roots: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Every dump directory under ``roots`` (a root may itself be a dump). Temporary dirs are skipped."""
    found: set[Path] = set()
    for root in roots:
        r = Path(root)
        if (r / MANIFEST).is_file():
            found.add(r)
            continue
        if not r.is_dir():
            continue
        for m in r.rglob(MANIFEST):
            if not any(part.startswith(_TMP_PREFIX) for part in m.parent.parts):
                found.add(m.parent)
    return sorted(found)
