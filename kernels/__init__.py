"""Fused Gemma 4 Triton kernels (installed as ``kvtrap.kernels``).

Plain functions live in the submodules (``routing``, ``ple_tail``, ``triple_norm``, ``cross_layer_norm``);
``kvtrap.kernels.custom_ops`` registers them as ``torch.ops.kvtrap.*``; ``references`` holds the eager
SGLang 0.5.23 op sequences they replace. Submodules import triton, so this package imports nothing eagerly.
"""
