"""Thin adapters kvtrap installs around SGLang methods: each module exposes ``TARGETS``.

Attention backends guarded (each adapter declares its ``ATTENTION_BACKEND``):

* ``trtllm_mha`` and ``fa3``: page tables and K/V write locations on the host
  (:mod:`kvtrap.capture.layer_checks`; each adapter only picks the table handed to a layer), and the
  device guard for their CUDA graphs (:mod:`~kvtrap.capture.hooks.device_guard`,
  :mod:`~kvtrap.capture.hooks.fa3_guard`);
* ``triton`` and ``flashinfer``: ragged ``kv_indptr`` / ``kv_indices`` and the SWA window rail on the host
  (:mod:`kvtrap.capture.ragged`; triton incl. the deterministic unified extend path), and the device guard
  for the ragged sets their CUDA-graph replays read (:mod:`~kvtrap.capture.hooks.triton_guard`, incl. the EAGLE
  multi-step draft; :mod:`~kvtrap.capture.hooks.flashinfer_guard`: decode, verify and draft-extend graphs).

The SWA allocator's alloc and free paths are guarded by :mod:`~kvtrap.capture.hooks.allocator`. The one
drain point, where SGLang waits for a step's results, is :mod:`~kvtrap.capture.hooks.step_drain`.

A hook reads SGLang's objects through :mod:`kvtrap.capture.sglang_view`, asks
:mod:`kvtrap.capture.verdict` what is wrong, and hands the answer to the armed session. Adding a backend
means one module here (and its view), listed in :data:`HOOKS`.
"""

from __future__ import annotations

from kvtrap.capture.hooks import (
    allocator,
    device_guard,
    fa3,
    fa3_guard,
    flashinfer,
    flashinfer_guard,
    step_drain,
    triton,
    triton_guard,
    trtllm_mha,
)
from kvtrap.capture.patching import MethodTarget

HOOKS = (allocator, trtllm_mha, fa3, triton, flashinfer, device_guard, fa3_guard, triton_guard, flashinfer_guard,
         step_drain)


def targets() -> list[MethodTarget]:
    return [t for hook in HOOKS for t in hook.TARGETS]


def covered_attention_backends() -> tuple[str, ...]:
    """The ``--attention-backend`` names whose page tables kvtrap checks (each adapter declares its own)."""
    return tuple(name for hook in HOOKS if (name := getattr(hook, "ATTENTION_BACKEND", None)))
