"""Hooks kvtrap installs around SGLang methods. Each module exposes ``TARGETS``."""

from __future__ import annotations

from kvtrap.patching import MethodTarget


def all_targets() -> list[MethodTarget]:
    """Every method an armed kvtrap wraps, in a stable order."""
    from kvtrap.bugs import sglang_26957
    from kvtrap.hooks import allocator, device_guard, trtllm_mha

    # The #26957 lockstep fix rides along; it acts only when the session's config says fix=auto.
    return [*allocator.TARGETS, *trtllm_mha.TARGETS, *device_guard.TARGETS, *sglang_26957.FIX_TARGETS]
