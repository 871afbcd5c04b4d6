"""triton hook: check the ragged KV ids ``TritonAttnBackend`` hands a layer's attention kernel.

The triton backend reads K/V through CSR index sets built once per forward by ``init_forward_metadata``:
``kv_indptr`` / ``kv_indices`` (full-attention layers) and ``window_kv_indptr`` / ``window_kv_indices``
(layers with a sliding window; on an SWA pool these are translated to SWA-pool ids). The ids are token
slots at every page size (the kernels split them into page and offset), so valid ids are
``[0, rows)`` of the pool the layer reads (``size + page_size`` rows; slot 0's page is the padding page).

Before ``forward_decode`` / ``forward_extend`` run, for the layer:

1. Resolve the pool the layer reads from the *live* ``token_to_kv_pool`` and its ``layers_mapping``.
2. Index space: an SWA layer must be handed the (translated) window rail, a full layer ``kv_indices``.
3. Drift is not judged here: the triton backend's only cached SWA state, ``use_sliding_window_kv_pool``
   (decided at ``__init__`` from the runner's pool), decides whether ``swa_out_cache_loc`` (the write side)
   is built, and SGLang's ``SWAKVPool.set_kv_buffer`` asserts on a missing one; the read rails are
   translated by the live pool's type when they are built. (A frozen-KV draft whose own pool is plain reads
   the target's SWA pool through a view and writes nothing: flagging its stale flag would be a false trap.)
4. Values: ``indptr`` starts at 0, never decreases and ends within ``indices``; every live id lies in
   ``[0, rows)``. Once per index set per forward (one host sync), skipped while a CUDA graph is captured:
   replays are value-checked by the device guard (:mod:`kvtrap.capture.hooks.triton_guard`).

5. KV writes (when the call stores K/V): ``KVWriteLoc.for_batch`` hands ``set_kv_buffer``
   ``out_cache_loc`` (full layers) and ``swa_out_cache_loc`` (SWA layers, narrowed as ``KVWriteLoc``
   narrows it); each must lie in ``[0, rows)`` of the pool written. The shared
   :func:`kvtrap.capture.layer_checks.check_write` (as trtllm_mha / fa3): once per pool type per forward,
   before the store (which precedes the kernel on every path, the unified one included), skipped while
   capturing, for unified pools and under decode context parallelism.

The deterministic (unified) extend path (``--enable-deterministic-inference``) appends the current
tokens' ids to the prefix rail in ``_forward_extend_unified``; SWA layers must append the translated
``swa_out_cache_loc`` (SGLang #24394: the untranslated ``out_cache_loc`` faulted; fixed by #24395). That
path is checked on the ids really handed to ``build_unified_kv_indices`` (wrapped for the duration of the
``forward_extend`` call), so a wrong choice inside ``_forward_extend_unified`` is seen whatever made it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvtrap.capture.layer_checks import check_store
from kvtrap.capture.patching import MethodTarget
from kvtrap.capture.ragged import check_ragged
from kvtrap.capture.session import current
from kvtrap.capture.sglang_view import (
    Rail,
    call_arg,
    layer_pool,
    rail_name,
    rail_space,
    triton_handed,
    triton_rails,
)

MODULE = "sglang.srt.layers.attention.triton_backend"
CLASS = "TritonAttnBackend"
#: The ``--attention-backend`` name this adapter guards (``kvtrap doctor`` reports coverage from it).
ATTENTION_BACKEND = "triton"


def _rails(backend: Any) -> Callable[[Any, str], dict[str, Rail]]:
    return lambda live, layer_type: triton_rails(backend.forward_metadata, live, layer_type)


def check_layer(backend: Any, layer: Any, forward_batch: Any, where: str) -> None:
    check_ragged(backend, layer, forward_batch, f"{CLASS}.{where}", _rails(backend), triton_handed(layer),
                 judge_drift=False, device_guarded=True)


# ------------------------------------------------------------------------------------ wrappers
def _checked_unified_build(backend: Any, layer: Any, forward_batch: Any, build: Callable[..., Any]) -> Callable[..., Any]:
    def checked_build(prefix_indptr: Any, prefix_indices: Any, start: Any, lens: Any, ids: Any, bs: int) -> Any:
        md, live = backend.forward_metadata, backend.token_to_kv_pool
        layer_type = layer_pool(live, int(layer.layer_id))[0]
        prefix = rail_name(md, forward_batch, prefix_indices)
        appended = rail_name(md, forward_batch, ids)
        check_ragged(backend, layer, forward_batch, f"{CLASS}._forward_extend_unified", _rails(backend),
                     Rail(prefix, prefix_indptr, prefix_indices, rail_space(prefix, live, layer_type)),
                     extend=Rail(appended, None, ids, rail_space(appended, live, layer_type)), judge_drift=False)
        return build(prefix_indptr, prefix_indices, start, lens, ids, bs)

    return checked_build


def _forward(method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            # signature: (q, k, v, layer, forward_batch, save_kv_cache=True, ...) in 0.5.23
            layer = call_arg(args, kwargs, 3, "layer")
            forward_batch = call_arg(args, kwargs, 4, "forward_batch")
            if layer is None or current() is None:
                return original(self, *args, **kwargs)
            build = self.__dict__.get("build_unified_kv_indices")
            unified = method == "forward_extend" and getattr(self, "enable_deterministic", False) and build is not None
            if not unified:
                check_layer(self, layer, forward_batch, method)
            # both paths store K/V first (the unified one before its index gather): check where it writes
            check_store(self, args, kwargs, layer, forward_batch, method)
            if not unified:
                return original(self, *args, **kwargs)
            # Deterministic extend reads prefix + current ids merged by build_unified_kv_indices inside
            # _forward_extend_unified: checked on the arguments really handed to it. It is an instance
            # attribute (set in __init__), swapped for this call only.
            self.build_unified_kv_indices = _checked_unified_build(self, layer, forward_batch, build)
            try:
                return original(self, *args, **kwargs)
            finally:
                self.build_unified_kv_indices = build

        return wrapper

    return make


TARGETS = [MethodTarget(MODULE, CLASS, m, _forward(m)) for m in ("forward_decode", "forward_extend")]
