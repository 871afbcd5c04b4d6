"""kvtrap's settings: one frozen object, built from keyword arguments or the environment.

Modes are explicit and the object never changes after it is built (the same idea as SGLang's
``kv_canary`` config): a hook reads the settings it was armed with, not a global that can move under it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

#: Arms kvtrap in every SGLang process through the plugin entry point.
ENV_ARM = "SGLANG_TRTLLM_MHA_DEBUG"
#: Routes SGLang's Gemma 4 model code to the fused kernels (``kvtrap.kernels``), through the same plugin
#: entry point and independent of ``ENV_ARM``.
ENV_GEMMA4_KERNELS = "KVTRAP_GEMMA4_KERNELS"

MODES = ("raise", "log")
GUARD_MODES = ("auto", "on", "off")
FIX_MODES = ("auto", "off")
FREE_CHECK_MODES = ("on", "off")
ALLOCATOR_TRAP_MODES = ("auto", "call", "drain")

# Environment variable -> Config field. Every variable here is documented in the README.
ENV_FIELDS = {
    "KVTRAP_MODE": "mode",
    "KVTRAP_DUMP_DIR": "dump_dir",
    "KVTRAP_MAX_DUMPS": "max_dumps",
    "KVTRAP_MAX_DUMP_MB": "max_dump_mb",
    "KVTRAP_LOG_LIMIT": "log_limit",
    "KVTRAP_GUARD": "guard",
    "KVTRAP_INJECT": "inject",
    "KVTRAP_FIX": "fix",
    "KVTRAP_FREE_CHECKS": "free_checks",
    "KVTRAP_ALLOCATOR_TRAP": "allocator_trap",
}


class ConfigError(ValueError):
    """A setting has a value kvtrap cannot use. The message names the setting and what is allowed."""


@dataclass(frozen=True)
class Config:
    """What an armed kvtrap does.

    mode: ``raise`` stops before the kernel with :class:`kvtrap.KVTrapError`; ``log`` records, dumps
        (rate-limited) and lets the step go on, but only where going on is safe: a page id that the
        kernel would read out of bounds is still raised in ``log`` mode unless the device guard
        redirected it (see README, "Modes").
    dump_dir: where dumps go (one sub-directory per event).
    max_dumps: dumps written per process at most; later events still trap but are not dumped.
    max_dump_mb: a dump's tensors at most; larger tensors are left out and listed in the manifest.
    log_limit: violations logged per process in ``log`` mode; later ones are counted, not printed.
    guard: device-side page-table guard for CUDA graphs: ``auto`` (on where CUDA and Triton are
        available), ``on`` or ``off``.
    inject: historical bugs to re-introduce on purpose (e.g. ``("sglang-26957",)``).
    fix: ``auto`` applies kvtrap's fixes where the live build shows the bug; ``off`` never.
    free_checks: ``on`` checks every SWA page the allocator returns to its free list (reserved page 0,
        double free, ownership). ``off`` skips them.
    allocator_trap: where the allocator checks (the SWA slots an alloc hands out, the free checks) trap.
        ``call``: at the SGLang call itself, before its result is used; one host sync per checked call.
        ``drain``: no host sync; the checks run on the device and a finding is read where SGLang already
        waits for a step's results (``process_batch_result_decode`` / ``_prefill``, after its ``copy_done``),
        and raised there, a step or two after the faulty call. SGLang's other result paths (disaggregated
        prefill, dLLM) are not drained: use ``call`` there. ``auto`` (default): ``drain`` for allocators on a
        CUDA device, ``call`` elsewhere (no sync to save). ``drain`` on a device the check kernels cannot run
        on (CPU tensors, unless Triton interprets) checks as ``call``.
    """

    mode: str = "raise"
    dump_dir: Path = Path("kvtrap-dumps")
    max_dumps: int = 16
    max_dump_mb: int = 256
    log_limit: int = 50
    guard: str = "auto"
    inject: tuple[str, ...] = ()
    fix: str = "auto"
    free_checks: str = "on"
    allocator_trap: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.guard not in GUARD_MODES:
            raise ConfigError(f"guard must be one of {', '.join(GUARD_MODES)}; got {self.guard!r}")
        if self.fix not in FIX_MODES:
            raise ConfigError(f"fix must be one of {', '.join(FIX_MODES)}; got {self.fix!r}")
        if self.free_checks not in FREE_CHECK_MODES:
            raise ConfigError(
                f"free_checks must be one of {', '.join(FREE_CHECK_MODES)}; got {self.free_checks!r}"
            )
        if self.allocator_trap not in ALLOCATOR_TRAP_MODES:
            raise ConfigError(
                f"allocator_trap must be one of {', '.join(ALLOCATOR_TRAP_MODES)}; got {self.allocator_trap!r}"
            )
        for name in ("max_dumps", "max_dump_mb", "log_limit"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer; got {value!r}")
        if not isinstance(self.dump_dir, Path):
            object.__setattr__(self, "dump_dir", Path(self.dump_dir))
        if isinstance(self.inject, str):
            object.__setattr__(self, "inject", _split_list(self.inject))
        else:
            object.__setattr__(self, "inject", tuple(self.inject))
        if self.inject:
            from kvtrap.capture.bugs import BUGS  # the list of names only: imports no SGLang, no torch

            for name in self.inject:
                if name not in BUGS:
                    raise ConfigError(f"unknown bug to inject {name!r}; known: {', '.join(sorted(BUGS)) or 'none'}")

    @property
    def max_dump_bytes(self) -> int:
        return self.max_dump_mb * 1024 * 1024

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Config:
        """Settings from ``KVTRAP_*`` variables; keyword overrides win over the environment."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for var, field_name in ENV_FIELDS.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            values[field_name] = _parse(var, field_name, raw.strip())
        known = {f.name for f in fields(cls)}
        for key, value in overrides.items():
            if key not in known:
                raise ConfigError(f"unknown kvtrap setting {key!r}; known: {', '.join(sorted(known))}")
            if value is not None:
                values[key] = value
        return cls(**values)  # type: ignore[arg-type]

    def with_(self, **changes: object) -> Config:
        return replace(self, **changes)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "dump_dir": str(self.dump_dir),
            "max_dumps": self.max_dumps,
            "max_dump_mb": self.max_dump_mb,
            "log_limit": self.log_limit,
            "guard": self.guard,
            "inject": list(self.inject),
            "fix": self.fix,
            "free_checks": self.free_checks,
            "allocator_trap": self.allocator_trap,
        }


def env_armed(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``SGLANG_TRTLLM_MHA_DEBUG`` asks for kvtrap. Unset, empty, ``0``, ``false``, ``off``: no."""
    return _env_switch(ENV_ARM, environ)


def env_gemma4_kernels(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``KVTRAP_GEMMA4_KERNELS`` asks for the fused Gemma 4 kernels; same values as ``env_armed``."""
    return _env_switch(ENV_GEMMA4_KERNELS, environ)


def _env_switch(var: str, environ: Mapping[str, str] | None) -> bool:
    env = os.environ if environ is None else environ
    raw = env.get(var, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{var} must be 1 or 0; got {raw!r}")


def _split_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _parse(var: str, field_name: str, raw: str) -> object:
    if field_name in ("max_dumps", "max_dump_mb", "log_limit"):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{var} must be a non-negative integer; got {raw!r}") from None
    if field_name == "dump_dir":
        return Path(raw).expanduser()
    if field_name == "inject":
        return _split_list(raw)
    if field_name in ("mode", "guard", "fix", "free_checks", "allocator_trap"):
        return raw.lower()
    return raw
