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
    del sys.modules["kernels"]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    try:
        sys.modules["kernels"] = importlib.import_module("kernels")
    except ImportError:
        # ModuleNotFoundError: callers that probe for the package (transformers' is_kernels_available) then
        # read "not installed", which is the truth, instead of crashing.
        raise ModuleNotFoundError(
            "'kernels' here is kvtrap's kernel folder (import it as kvtrap.kernels); the PyPI package "
            "'kernels' that SGLang uses is not installed",
            name="kernels",
        ) from None
    finally:
        sys.path[:] = _saved_path
