"""The design card's folders install collision-free: kernels/ as kvtrap.kernels, repro/ as kvtrap.repro."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_namespaced_packages_import():
    import kvtrap.kernels
    import kvtrap.repro

    assert Path(kvtrap.kernels.__file__).parent == ROOT / "kernels"
    assert Path(kvtrap.repro.__file__).parent == ROOT / "repro"


def test_top_level_kernels_from_repo_root_is_the_pypi_package():
    try:  # the PyPI package SGLang depends on (installed by the test extra; absent on the GPU machine)
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI package 'kernels' is not installed here")
    out = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).parent != ROOT / "kernels"
