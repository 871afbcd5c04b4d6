"""Importing SGLang's runtime (``sglang.srt``) in tests that need its real classes.

On the CPU machine (CI) ``pip install sglang==0.5.23`` brings everything, so a failed import there is a
broken install and must fail the run. The GPU machine carries only SGLang's wheel without ``sgl_kernel``
(too large to carry), where ``sglang.srt``'s pools and backends cannot import: there the test file is
skipped, and its GPU-side counterparts run instead.

*CPU worlds* are real SGLang pools, allocators and backends on CPU tensors. SGLang launches Triton kernels
from them (``alloc_extend_kernel``, index gathers), which take CPU tensors only in Triton's interpreter: on
a CUDA machine the kernels are compiled and refuse them. Tests that build one carry
``pytest.mark.cpu_world(gpu=...)`` (``gpu``: the tests proving the same on CUDA, if any);
``tests/conftest.py`` skips them wherever :func:`cpu_world_blocker` says they cannot run.
"""

from __future__ import annotations

import functools
import importlib
import os
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


@functools.cache
def cpu_world_blocker() -> str | None:
    """Why CPU worlds cannot run in this process, or None when they can (Triton interprets, as on CI)."""
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return None
    return ("CPU world: SGLang's Triton kernels are compiled on this CUDA machine and refuse CPU tensors (it "
            "runs where Triton interprets: the CPU suite, or here as TRITON_INTERPRET=1 pytest -m cpu_world)")
