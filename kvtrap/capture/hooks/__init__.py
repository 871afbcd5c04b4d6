"""Thin adapters kvtrap installs around SGLang methods: each module exposes ``TARGETS``.

A hook reads SGLang's objects through :mod:`kvtrap.capture.sglang_view`, asks
:mod:`kvtrap.capture.verdict` what is wrong, and hands the answer to the armed session. Adding a backend
means one module here (and its view), listed in :data:`HOOKS`.
"""

from __future__ import annotations

from kvtrap.capture.hooks import allocator, device_guard, fa3, fa3_guard, trtllm_mha
from kvtrap.capture.patching import MethodTarget

HOOKS = (allocator, trtllm_mha, fa3, device_guard, fa3_guard)


def targets() -> list[MethodTarget]:
    return [t for hook in HOOKS for t in hook.TARGETS]


def covered_attention_backends() -> tuple[str, ...]:
    """The ``--attention-backend`` names whose page tables kvtrap checks (each adapter declares its own)."""
    return tuple(name for hook in HOOKS if (name := getattr(hook, "ATTENTION_BACKEND", None)))
