"""Regressions from review: layouts, capture, nesting and unified pools must not break clean runs."""

from __future__ import annotations

import pytest
import torch

import kvtrap
from kvtrap.capture import bugs as inject
from kvtrap.capture import checks

pytest.importorskip("sglang")

from helpers import sglang_world as w  # noqa: E402
from helpers import trapdumps as td  # noqa: E402

pytestmark = pytest.mark.cpu_world()


def _decode_all(backend, layers, fb, bs=3):
    reached = []
    for layer in layers:
        q, k, v = w.qkv(bs)
        with pytest.raises(NameError, match="flashinfer"):  # the FlashInfer launch: the end of the line on CPU
            backend.forward_decode(q, k, v, layer, fb)
        reached.append(layer.layer_id)
    return reached


def test_hnd_kv_layout_clean_decode_does_not_trap(tmp_path, monkeypatch):
    # SGLANG_USE_HND_KVCACHE=1 makes buffers [pages, H, page, D]: shape[0] is already a page count.
    monkeypatch.setenv("SGLANG_USE_HND_KVCACHE", "1")
    pool, alloc, layers, batch, backend, fb = td.decode_world()
    assert pool.get_key_buffer(0).dim() == 4  # really the HND layout
    w.set_write_locs(backend, alloc, fb)
    with kvtrap.armed(dump_dir=str(tmp_path)):
        assert _decode_all(backend, layers, fb) == sorted(w.SWA_LAYERS + w.FULL_LAYERS)
    assert not list(tmp_path.iterdir())


def test_mismatch_found_during_capture_raises_even_in_log_mode(tmp_path, monkeypatch):
    # While capturing, values are not scanned and the device guard bounds each table by its own pool,
    # so an SWA layer handed the full table cannot be let through.
    monkeypatch.setattr(checks, "is_capturing", lambda t: True)
    pool, alloc, layers, batch, backend, fb = td.decode_world(stale=True)
    with kvtrap.armed(mode="log", dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        q, k, v = w.qkv(3)
        backend.forward_decode(q, k, v, layers[0], fb)
    assert info.value.violation.kind == "index_space_mismatch"
    assert info.value.dump_path is not None
    assert kvtrap.load_dump(info.value.dump_path).tensors == {}  # nothing copied off the device in capture


def test_inner_injection_ends_with_its_block(tmp_path):
    with kvtrap.armed(dump_dir=str(tmp_path)):
        with kvtrap.armed(dump_dir=str(tmp_path), inject=("sglang-26957",)):
            assert inject.enabled() == ("sglang-26957",)
        assert inject.enabled() == ()
    assert inject.enabled() == ()


def test_dump_size_cap_leaves_out_without_copying(tmp_path):
    pool, alloc, layers, batch, backend, fb = td.decode_world()
    backend.forward_metadata.swa_page_table[1, 3] = 99
    with kvtrap.armed(dump_dir=str(tmp_path), max_dump_mb=0), pytest.raises(kvtrap.KVTrapError) as info:
        q, k, v = w.qkv(3)
        backend.forward_decode(q, k, v, layers[0], fb)
    dump = kvtrap.load_dump(info.value.dump_path)
    assert dump.tensors == {}
    assert dump.manifest["tensors_omitted"]["page_table"] == {"shape": [3, 32], "dtype": "int32", "nbytes": 384}
    assert torch.is_tensor(backend.forward_metadata.page_table)
