"""SGLang #26957 re-introduced on purpose, trapped, and fixed, on real sglang==0.5.23 objects.

The draft backend's SWA state comes from SGLang's own ``_resolve_swa_kv_pool`` (injected or not), the
pool swap from SGLang's own ``frozen_kv_target_view``; kvtrap's trap and lockstep fix do the rest.
"""

from __future__ import annotations

import logging

import pytest
import torch

import kvtrap
from kvtrap.capture import bugs as inject

pytest.importorskip("sglang")
from helpers.srt import import_srt  # noqa: E402

TRTLLMHAAttnBackend = import_srt("sglang.srt.layers.attention.trtllm_mha_backend").TRTLLMHAAttnBackend
frozen_kv_target_view = import_srt("sglang.srt.speculative.frozen_kv_mtp_utils").frozen_kv_target_view
from helpers import sglang_world as w  # noqa: E402

pytestmark = pytest.mark.cpu_world()

KERNEL = "name 'flashinfer' is not defined"


def draft_step(backend, alloc, batch, fb, layers, ctx):
    """One draft forward as frozen-KV MTP runs it: metadata and layers inside the target view."""
    handed = {}
    with frozen_kv_target_view(fb, ctx, backend):
        w.init_metadata_like_sglang(backend, alloc, batch, fb)
        for layer in layers:
            handed[layer.layer_id] = backend._get_layer_page_table(layer, fb)
            q, k, v = w.qkv(len(batch.seq_lens))
            with pytest.raises(NameError, match=KERNEL):  # reached the FlashInfer launch
                backend.forward_decode(q, k, v, layer, fb)
    return handed


def world():
    pool = w.make_pool()
    alloc = w.make_allocator(pool)
    batch = w.allocate_requests(alloc, [40, 100, 17])
    fb = w.make_forward_batch(batch)
    runner = w.make_draft_runner(pool, alloc)
    return pool, alloc, batch, fb, runner, w.frozen_kv_context(pool), w.make_layers()


def test_released_resolver_is_correct_and_fix_is_a_noop(tmp_path, caplog):
    pool, alloc, batch, fb, runner, ctx, layers = world()
    with kvtrap.armed(dump_dir=str(tmp_path), fix="auto"), caplog.at_level(logging.WARNING, "kvtrap"):
        backend = w.make_draft_backend(runner, pool)
        assert backend._swa_kv_pool is pool  # 0.5.23 falls back to the allocator's pool
        handed = draft_step(backend, alloc, batch, fb, layers, ctx)
        from kvtrap.capture.fixes.sglang_26957 import fix_stats

        assert fix_stats()["applied"] == 0
    assert all(handed[i] is backend.forward_metadata.swa_page_table for i in w.SWA_LAYERS)
    assert "fix for SGLang #26957 not needed here" in caplog.text
    assert not list(tmp_path.iterdir())


def test_injected_bug_is_trapped_on_the_first_swa_layer(tmp_path):
    pool, alloc, batch, fb, runner, ctx, layers = world()
    with kvtrap.armed(dump_dir=str(tmp_path), inject=("sglang-26957",), fix="off"):
        assert inject.enabled() == ("sglang-26957",)
        backend = w.make_draft_backend(runner, pool)
        assert backend._swa_kv_pool is None and backend.use_sliding_window_kv_pool is False
        with pytest.raises(kvtrap.KVTrapError) as info:
            draft_step(backend, alloc, batch, fb, layers, ctx)
    v = info.value.violation
    assert (v.kind, v.layer_id, v.layer_type, v.table) == ("index_space_mismatch", w.SWA_LAYERS[0], "swa", "page_table")
    assert inject.enabled() == ()  # disarming took the injection out again
    assert "_resolve_swa_kv_pool" in TRTLLMHAAttnBackend.__dict__
    assert not hasattr(TRTLLMHAAttnBackend.__dict__["_resolve_swa_kv_pool"], "__kvtrap_original__")


def test_injected_bug_with_fix_gives_swa_layers_swa_tables(tmp_path, caplog):
    pool, alloc, batch, fb, runner, ctx, layers = world()
    with kvtrap.armed(dump_dir=str(tmp_path), inject=("sglang-26957",), fix="auto"), caplog.at_level(
        logging.WARNING, "kvtrap"
    ):
        backend = w.make_draft_backend(runner, pool)
        assert backend._swa_kv_pool is None  # the bug is really in place
        handed = draft_step(backend, alloc, batch, fb, layers, ctx)
        md = backend.forward_metadata
        assert all(handed[i] is md.swa_page_table for i in w.SWA_LAYERS)
        assert all(handed[i] is md.page_table for i in w.FULL_LAYERS)
        # the view swapped the draft pool back: the backend's own (stale, harmless there) state returns
        assert backend.token_to_kv_pool is runner.token_to_kv_pool and backend._swa_kv_pool is None
    assert "fix for SGLang #26957 applied" in caplog.text
    assert not list(tmp_path.iterdir())


def test_fix_allocates_missing_swa_graph_buffers(tmp_path):
    pool, alloc, batch, fb, runner, ctx, layers = world()
    with kvtrap.armed(dump_dir=str(tmp_path), inject=("sglang-26957",), fix="auto"):
        backend = w.make_draft_backend(runner, pool)
        backend.max_num_pages = w.MAX_PAGES
        backend.speculative_num_draft_tokens = None
        backend.init_cuda_graph_state(4, 16)  # SGLang's own: no SWA buffers for a backend without SWA pool
        assert backend.decode_cuda_graph_metadata["swa_page_table"] is None
        assert backend.cuda_graph_swa_out_cache_loc is None
        with frozen_kv_target_view(fb, ctx, backend):
            buf = backend.decode_cuda_graph_metadata["swa_page_table"]
            assert isinstance(buf, torch.Tensor) and buf.shape == (4, w.MAX_PAGES)
            assert backend.cuda_graph_swa_out_cache_loc.shape == (16,)
            assert backend._swa_full_to_swa_mapping is pool.full_to_swa_index_mapping


def test_unknown_bug_name_is_a_clear_error(tmp_path):
    with pytest.raises(kvtrap.ConfigError, match="unknown bug to inject 'sglang-1'; known: .*sglang-26957"):
        with kvtrap.armed(dump_dir=str(tmp_path), inject=("sglang-1",)):
            pass
    from kvtrap.capture.session import current

    assert current() is None  # the refused session did not stay armed
    assert not hasattr(TRTLLMHAAttnBackend.__dict__["forward_decode"], "__kvtrap_original__")
