"""Shared test setup: GPU tests are marked ``gpu`` and skipped where no CUDA device is present (CI).

Tests mirror kvtrap's packages (``record/``, ``report/``, ``capture/``, ``cli/``, ``repro/``, ``kernels/``);
shared helpers are ``tests/helpers/`` only, imported as ``helpers.<module>`` (``tests/`` is put on
``sys.path`` here, also for the child processes some tests start with ``python -m pytest``).

Without CUDA every Triton kernel runs in Triton's interpreter. ``TRITON_INTERPRET=1`` has to be set before
any kernel is decorated, and a test file that imports SGLang (which decorates its own Triton kernels) may be
collected before the kernel tests; so it is set here, before any test module is imported.

On a CUDA machine Triton compiles, and tests marked ``cpu_world`` (real SGLang objects on CPU tensors, see
``helpers/srt.py``) are skipped with one reason naming their GPU counterpart: one decision, here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from helpers.srt import cpu_world_blocker

    no_gpu = None if _cuda_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    blocker = cpu_world_blocker()
    for item in items:
        if no_gpu is not None and "gpu" in item.keywords:
            item.add_marker(no_gpu)
        world = item.get_closest_marker("cpu_world")
        if blocker is not None and world is not None:
            twin = world.kwargs.get("gpu")
            item.add_marker(pytest.mark.skip(reason=f"{blocker}; on a GPU: {twin}" if twin else blocker))
