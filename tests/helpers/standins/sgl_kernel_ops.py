"""Stand-in for ``common_ops``, sgl_kernel's compiled CUDA op library, so SGLang's fa3 backend imports on CPU.

Why: ``sglang.srt.layers.attention.flashattention_backend`` does ``from sgl_kernel import merge_state_v2``
at import time, and ``sgl_kernel/__init__.py`` first loads its compiled op library (``common_ops``, a
CUDA ``.so``); on a machine without CUDA that load fails (``libcuda.so.1``), and the whole ``sgl_kernel``
package with it. When every other way fails, sgl_kernel's loader (``load_utils._load_architecture_specific_ops``)
falls back to a plain ``import common_ops``. This registers an *empty* module under that name, and only
when sgl_kernel cannot load its real one: the real sgl_kernel Python package and every SGLang class then
import unchanged. Nothing is faked beyond the op library: its ops are registered under ``torch.ops.sgl_kernel``
by the ``.so``, so calling any sgl_kernel op (``merge_state_v2``, the FA3 kernels) still fails here.
The fa3 CPU tests never call one: they stop at the FlashAttention launch with a recorder.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


def install() -> bool:
    """Make ``import sgl_kernel`` work on a machine where its compiled op library cannot load.

    Returns True when the stand-in is in place, False when the real library loaded (nothing done). Never
    stands in on a machine with CUDA: there the real library must load (the error is raised as is)."""
    if "sgl_kernel" in sys.modules:
        return "common_ops" in sys.modules and getattr(sys.modules["common_ops"], "__kvtrap_standin__", False)
    try:
        importlib.import_module("sgl_kernel")
        return False
    except ImportError as err:
        import torch

        if torch.cuda.is_available() or ("common_ops" not in str(err) and getattr(err, "name", None) != "common_ops"):
            raise
    for name in [m for m in sys.modules if m == "sgl_kernel" or m.startswith("sgl_kernel.")]:
        del sys.modules[name]  # the failed import left partial modules behind
    standin = ModuleType("common_ops")
    standin.__doc__ = __doc__
    standin.__file__ = __file__  # sgl_kernel logs where its op library came from
    standin.__kvtrap_standin__ = True  # type: ignore[attr-defined]
    sys.modules["common_ops"] = standin
    importlib.import_module("sgl_kernel")
    return True
