"""Fix for SGLang #26957 (``KVTRAP_FIX=auto``, the default): the backend's SWA state follows its pool.

The bug is described in :mod:`kvtrap.capture.bugs.sglang_26957`. The fix: a data descriptor on
``TRTLLMHAAttnBackend.token_to_kv_pool`` sees every swap (whoever does it: the views hold no reference
we would have to patch); when an SWA pool is swapped into a backend whose cached state disagrees, it sets
``_swa_kv_pool``, ``use_sliding_window_kv_pool`` and ``_swa_full_to_swa_mapping`` (read by the in-graph
metadata kernel since 0.5.15) from the live pool, makes sure the SWA page-table buffers of
``init_cuda_graph_state`` exist (they are ``None`` when it ran with no SWA pool), and restores the saved
state when the original pool comes back. The lockstep idea was proposed in SGLang PR #26531 (closed,
never shipped); this is kvtrap's own implementation. On builds that resolve correctly the state already
agrees at every swap, so the fix does nothing, and says so once.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from kvtrap.capture.patching import MethodTarget
from kvtrap.capture.session import current
from kvtrap.capture.sglang_view import find_drift, is_swa_pool

logger = logging.getLogger("kvtrap")

MODULE = "sglang.srt.layers.attention.trtllm_mha_backend"
CLASS = "TRTLLMHAAttnBackend"
_STATE = ("_swa_kv_pool", "use_sliding_window_kv_pool", "_swa_full_to_swa_mapping")


class _Lockstep:
    """Data descriptor over the instance attribute ``token_to_kv_pool`` (kept in the instance dict)."""

    def __init__(self) -> None:
        self.saved: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
        self.graph_tokens: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.applied = 0
        self.said_not_needed = False

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        try:
            return obj.__dict__["token_to_kv_pool"]
        except KeyError:
            raise AttributeError("token_to_kv_pool") from None

    def __set__(self, obj: Any, pool: Any) -> None:
        first = "token_to_kv_pool" not in obj.__dict__
        obj.__dict__["token_to_kv_pool"] = pool
        if first:
            return  # __init__ setting the backend's own pool: nothing to follow yet
        if not is_swa_pool(pool):
            if obj in self.saved:
                for name, value in self.saved.pop(obj).items():
                    setattr(obj, name, value)  # swapped back: the backend's own state returns
            return
        session = current()
        if session is None or session.config.fix != "auto":
            return
        stale = find_drift(obj, pool)
        if not stale:
            if not self.said_not_needed and not self.applied:
                self.said_not_needed = True
                logger.warning(
                    "fix for SGLang #26957 not needed here: the backend's SWA state already follows the "
                    "swapped-in pool (this SGLang resolves frozen-KV drafts correctly)"
                )
            return
        if obj not in self.saved:
            self.saved[obj] = {name: getattr(obj, name, None) for name in _STATE}
        obj._swa_kv_pool = pool
        obj.use_sliding_window_kv_pool = True
        if "_swa_full_to_swa_mapping" in obj.__dict__:
            translator = getattr(obj, "kv_index_translator", None)
            if not getattr(translator, "is_translating", False):
                obj._swa_full_to_swa_mapping = pool.full_to_swa_index_mapping
        _ensure_swa_graph_buffers(obj, self.graph_tokens.get(obj))
        self.applied += 1
        if self.applied == 1:
            logger.warning(
                "fix for SGLang #26957 applied: %s@%#x had stale SWA state (%s); it now follows the "
                "swapped-in %s in lockstep",
                type(obj).__name__, id(obj), "; ".join(f"{k} was {v}" for k, v in stale.items()),
                type(pool).__name__,
            )


def _ensure_swa_graph_buffers(backend: Any, max_num_tokens: int | None) -> None:
    """Allocate the SWA page-table buffers ``init_cuda_graph_state`` skipped (``None`` without an SWA pool)."""
    import torch

    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    alloc = torch.empty_like if capturing else torch.zeros_like  # no memset captured into the graph
    for attr in ("decode_cuda_graph_metadata", "target_verify_metadata", "draft_extend_metadata"):
        buffers = getattr(backend, attr, None)
        if not isinstance(buffers, dict):
            continue
        for swa_key, full_key in (("swa_page_table", "page_table"), ("swa_page_table_draft_decode", "page_table_draft_decode")):
            if swa_key in buffers and buffers[swa_key] is None and isinstance(buffers.get(full_key), torch.Tensor):
                buffers[swa_key] = alloc(buffers[full_key])
    if getattr(backend, "cuda_graph_swa_out_cache_loc", 0) is None:
        if not max_num_tokens:
            # armed after init_cuda_graph_state ran: size it the way the graph runners do (max_bs rows
            # times the tokens each request carries in a graph step)
            decode = getattr(backend, "decode_cuda_graph_metadata", None) or {}
            rows = decode.get("page_table")
            per_req = max(1, int(getattr(backend, "speculative_num_draft_tokens", None) or 1))
            max_num_tokens = None if rows is None else int(rows.shape[0]) * per_req
        if max_num_tokens:
            backend.cuda_graph_swa_out_cache_loc = torch.zeros(
                max_num_tokens, dtype=torch.int64, device=backend.device
            )


def _record_graph_tokens(original: Any) -> Any:
    def init_cuda_graph_state(self: Any, max_bs: int, max_num_tokens: int, *args: Any, **kwargs: Any) -> Any:
        _lockstep.graph_tokens[self] = int(max_num_tokens)
        return original(self, max_bs, max_num_tokens, *args, **kwargs)

    return init_cuda_graph_state


_lockstep = _Lockstep()
TARGETS = [
    MethodTarget(MODULE, CLASS, "token_to_kv_pool", lambda _none: _lockstep, add=True),
    MethodTarget(MODULE, CLASS, "init_cuda_graph_state", _record_graph_tokens),
]


def fix_stats() -> dict[str, int]:
    return {"applied": _lockstep.applied, "backends_in_target_view": len(_lockstep.saved)}
