"""Fixes kvtrap applies by default (``KVTRAP_FIX=auto``) where the live SGLang shows a known bug.

:data:`FIXES` is the explicit list: each module exposes ``TARGETS`` (the methods it wraps); each fix acts
only when the armed session's config says ``fix=auto`` and the live objects show the bug. The bugs
re-introduced on purpose are in :mod:`kvtrap.capture.bugs`.
"""

from __future__ import annotations

from kvtrap.capture.fixes import sglang_26957
from kvtrap.capture.patching import MethodTarget

FIXES = (sglang_26957,)


def targets() -> list[MethodTarget]:
    return [t for fix in FIXES for t in fix.TARGETS]
