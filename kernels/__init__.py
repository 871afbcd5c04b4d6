"""Fused Gemma 4 Triton kernels (installed as ``kvtrap.kernels``).

Plain functions live in the submodules (``routing``, ``ple_tail``, ``triple_norm``, ``cross_layer_norm``,
``qkv_norm_rope``);
``kvtrap.kernels.custom_ops`` registers them as ``torch.ops.kvtrap.*``; ``references`` holds the eager
SGLang 0.5.23 op sequences they replace; ``sglang_gemma4`` routes SGLang's Gemma 4 model code to them
(``KVTRAP_GEMMA4_KERNELS=1``). Submodules import triton, so this package imports nothing eagerly.
"""

if __name__ == "kernels":
    # Imported as top-level ``kernels``: the repository root is on sys.path (python run from the checkout),
    # so this folder shadows the PyPI package ``kernels`` that SGLang depends on. Hand the name back: load
    # the real package from the rest of sys.path and put it in our place (the import system returns
    # whatever sys.modules holds for the name once this module finishes executing).
    import importlib
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _saved_path = sys.path[:]
    _self = sys.modules.pop("kernels")
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    try:
        sys.modules["kernels"] = importlib.import_module("kernels")
    except ImportError:
        # The PyPI package is not installed. Stay, as an empty stand-in under the name, instead of failing the
        # import: transformers (5.19) probes ``kernels`` by importing it when it has no distribution metadata,
        # and a failing import there breaks ``from transformers import AutoProcessor`` and SGLang with it.
        # Version "0" reads as "not installed" to version-checking probes (transformers: below its minimum),
        # and ``from kernels import <name>`` still raises ImportError for callers that guard on it.
        __version__ = "0"
        sys.modules["kernels"] = _self
    finally:
        sys.path[:] = _saved_path
