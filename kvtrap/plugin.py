"""SGLang plugin entry point (``sglang.srt.plugins`` group): ``kvtrap = "kvtrap.plugin:register"``.

SGLang calls ``register()`` once in every process (main, schedulers, detokenizer, DP controller)
before logging is configured there, and swallows exceptions from plugins. So this:
- does nothing at all unless ``SGLANG_TRTLLM_MHA_DEBUG=1`` (zero cost when unset or ``0``);
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
    from kvtrap.config import Config, ConfigError, env_armed

    try:
        if not env_armed():
            return  # not armed: no handler, no patch, nothing
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
