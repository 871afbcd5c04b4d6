"""Shared test setup: GPU tests are marked ``gpu`` and skipped where no CUDA device is present (CI).

Without CUDA every Triton kernel runs in Triton's interpreter. ``TRITON_INTERPRET=1`` has to be set before
any kernel is decorated, and a test file that imports SGLang (which decorates its own Triton kernels) may be
collected before the kernel tests; so it is set here, before any test module is imported.
"""

from __future__ import annotations

import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
