"""Importing SGLang's runtime (``sglang.srt``) in tests that need its real classes.

On the CPU machine (CI) ``pip install sglang==0.5.23`` brings everything, so a failed import there is a
broken install and must fail the run. The GPU machine carries only SGLang's wheel without ``sgl_kernel``
(too large to carry), where ``sglang.srt``'s pools and backends cannot import: there the test file is
skipped, and its GPU-side counterparts run instead.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def import_srt(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        import torch

        if torch.cuda.is_available() and err.name == "sgl_kernel":
            # allow_module_level: also valid when called at import time of a test module
            pytest.skip(f"{name} needs sgl_kernel, which is not installed here", allow_module_level=True)
        raise
