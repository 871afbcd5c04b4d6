"""Hooks kvtrap installs around SGLang methods. Each module exposes ``TARGETS``."""

from __future__ import annotations

from kvtrap.patching import MethodTarget


def all_targets() -> list[MethodTarget]:
    """Every method an armed kvtrap wraps, in a stable order."""
    from kvtrap.hooks import allocator, trtllm_mha

    return [*allocator.TARGETS, *trtllm_mha.TARGETS]
