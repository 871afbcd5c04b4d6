"""SGLang plugin entry point (``sglang.srt.plugins`` group): ``kvtrap = "kvtrap.plugin:register"``.

SGLang calls ``register()`` once in every process (main, schedulers, detokenizer, DP controller)
before logging is configured there, and swallows exceptions from plugins. So this:
- does nothing at all unless ``SGLANG_TRTLLM_MHA_DEBUG=1`` (zero cost when unset or ``0``);
- separately, ``KVTRAP_GEMMA4_KERNELS=1`` routes SGLang's Gemma 4 model code to the fused kernels
  (:mod:`kvtrap.kernels.sglang_gemma4`); either switch works without the other;
- imports nothing heavy and creates no CUDA context: the hooks attach to SGLang modules when SGLang
  itself imports them (see :mod:`kvtrap.capture.patching`);
- logs at WARNING to stderr, and logs (rather than raises) a bad setting, since SGLang would swallow it.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("kvtrap")


def _ensure_stderr_logging() -> None:
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[kvtrap pid={os.getpid()}] %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False


def register() -> None:
    # Two independent switches: one failing must not take the other down (SGLang swallows what a plugin raises,
    # so a broken kernel install would otherwise leave the traps silently unarmed).
    for step in (_register_gemma4_kernels, _register_trap):
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - said at ERROR instead of vanishing into SGLang's loader
            _ensure_stderr_logging()
            logger.error("kvtrap plugin step %s failed: %s: %s", step.__name__.lstrip("_"), type(exc).__name__, exc)


def _register_gemma4_kernels() -> None:
    from kvtrap.config import ConfigError, env_gemma4_kernels

    try:
        if not env_gemma4_kernels():
            return
    except ConfigError as exc:
        _ensure_stderr_logging()
        logger.error("Gemma 4 kernels are NOT enabled: %s", exc)
        return
    _ensure_stderr_logging()
    from kvtrap.kernels.sglang_gemma4 import TESTED_SGLANG, enable, sglang_version

    version = sglang_version()
    if version not in TESTED_SGLANG:
        # The fused layer paths restate SGLang's method bodies of the tested release; another release may have
        # changed them, and running the old body there would be silently wrong.
        logger.warning("Gemma 4 kernels are NOT enabled: sglang %s is not a tested release (%s)", version,
                       ", ".join(TESTED_SGLANG))  # fmt: skip
        return
    enable()


def _register_trap() -> None:
    from kvtrap.config import Config, ConfigError, env_armed

    try:
        if not env_armed():
            if os.environ.get("KVTRAP_INJECT", "").strip():
                _inject_only(Config.from_env())
            return  # not armed: no handler, no patch, nothing (unless a bug was asked for on purpose)
        config = Config.from_env()
    except ConfigError as exc:
        _ensure_stderr_logging()
        logger.error("kvtrap is NOT armed: %s", exc)
        return
    _ensure_stderr_logging()
    from kvtrap.capture.arming import arm_process

    arm_process(config)
    logger.warning(
        "armed in pid %d (mode=%s, dumps -> %s%s)",
        os.getpid(),
        config.mode,
        config.dump_dir.resolve(),
        f", inject={','.join(config.inject)}" if config.inject else "",
    )


def _inject_only(config: object) -> None:
    """``KVTRAP_INJECT`` without ``SGLANG_TRTLLM_MHA_DEBUG=1``: the bug goes in, nothing traps it.

    This is how a repro shows what a historical bug really does on this machine (an illegal address, silent
    corruption, or nothing); said loudly, since it makes the server wrong on purpose.
    """
    from kvtrap.capture import bugs

    _ensure_stderr_logging()
    names = list(getattr(config, "inject", ()))
    bugs.sync(names)
    logger.warning(
        "kvtrap is NOT armed in pid %d, but re-introduces %s on purpose (KVTRAP_INJECT): no trap will fire",
        os.getpid(), ",".join(names),
    )
