"""flashinfer hook: check the ragged KV ids a layer's FlashInfer wrapper was planned with, before it runs.

``FlashInferAttnBackend`` plans one paged wrapper per index set once per forward (``init_forward_metadata``:
the indices updaters build ``kv_indptr`` / ``kv_indices`` and call ``plan``); each layer then runs the
wrapper ``_get_wrapper_idx`` picks. With a sliding window, wrapper 0 serves window layers and its ids are
translated to SWA-pool ids when the updater's cached ``_swa_kv_pool`` is set; wrapper 1 serves the rest. The
wrappers plan with page size 1, so ids are token slots, bounded by the token rows of the pool read.

Before ``forward_decode`` / ``forward_extend`` run the layer's wrapper (planning reads no KV; ``run``
does), on the ids the wrapper holds for ``run`` (:func:`kvtrap.capture.sglang_view.flashinfer_rails`):
index space (an SWA layer must run on translated ids), drift (the backend's and both updaters' cached
``_swa_kv_pool`` / ``use_sliding_window_kv_pool`` against the live pool: SGLang #27737 resolved them from
the allocator instead of the active pool), and values (:mod:`kvtrap.capture.ragged`). The ragged extend path
(``use_ragged`` without prefix) reads no paged ids; its paged wrapper still holds the planned prefix ids.

KV writes (when the call stores K/V): ``KVWriteLoc.for_layer`` hands ``set_kv_buffer`` ``out_cache_loc``
(full layers) and ``swa_out_cache_loc`` (SWA layers); each must lie in ``[0, rows)`` of the pool written
(:func:`kvtrap.capture.layer_checks.check_write`, shared with trtllm_mha / fa3: once per pool type per
forward, before the store, skipped while capturing and for unified pools; cross-attention layers, which write
``encoder_out_cache_loc``, are not checked).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvtrap.capture.layer_checks import check_store
from kvtrap.capture.patching import MethodTarget
from kvtrap.capture.ragged import check_ragged
from kvtrap.capture.session import current
from kvtrap.capture.sglang_view import call_arg, flashinfer_handed, flashinfer_rails

MODULE = "sglang.srt.layers.attention.flashinfer_backend"
CLASS = "FlashInferAttnBackend"
#: The ``--attention-backend`` name this adapter guards (``kvtrap doctor`` reports coverage from it).
ATTENTION_BACKEND = "flashinfer"


def check_layer(backend: Any, layer: Any, forward_batch: Any, where: str) -> None:
    md = backend.forward_metadata
    check_ragged(backend, layer, forward_batch, f"{CLASS}.{where}",
                 lambda live, _layer_type: flashinfer_rails(backend, md, live), flashinfer_handed(backend, layer))


def _forward(method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            # signature: (q, k, v, layer, forward_batch, save_kv_cache=True) in 0.5.23
            layer = call_arg(args, kwargs, 3, "layer")
            forward_batch = call_arg(args, kwargs, 4, "forward_batch")
            if layer is not None and current() is not None and getattr(self, "forward_metadata", None) is not None:
                check_layer(self, layer, forward_batch, method)
                check_store(self, args, kwargs, layer, forward_batch, method)
            return original(self, *args, **kwargs)

        return wrapper

    return make


TARGETS = [MethodTarget(MODULE, CLASS, m, _forward(m)) for m in ("forward_decode", "forward_extend")]
