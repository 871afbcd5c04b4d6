"""fa3 on a GPU: SGLang's real ``FlashAttentionBackend`` with real pools on CUDA, its real FA3 kernel
(``sgl_kernel.flash_attn``), kvtrap's host checks and its device guard inside a captured CUDA graph.

Needs SGLang's full runtime with sgl_kernel's FA3 ops (``flash_ops``: stage it with ``KEEP_FA3=1``, see
``../shared/device/README.md``) on an sm80/sm90 GPU; skipped elsewhere. CPU counterparts:
``test_trap_fa3.py`` (host checks) and ``test_fa3_guard_wiring.py`` (guard wiring, interpreted).
"""

from __future__ import annotations

import random

import pytest
import torch

import kvtrap

pytestmark = pytest.mark.gpu

HEAD_DIM = 128  # a head size FA3 compiles (the CPU worlds use 8)


@pytest.fixture(scope="module")
def fa():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("sglang")
    from helpers import fa3_world as fw

    fa = fw.fa3_module()
    try:
        import sgl_kernel.flash_attn  # noqa: F401  (the FA3 ops; a slimmed sglang-kernel wheel lacks flash_ops)
    except ImportError as err:
        pytest.skip(f"sgl_kernel's FA3 ops are not installed ({err}); stage the runtime with KEEP_FA3=1")
    return fa


def _world(**kw):
    from helpers import fa3_world as fw

    return fw.decode_world(device="cuda", head_dim=HEAD_DIM, **kw)


def test_trap_fires_before_the_real_fa3_kernel(fa, tmp_path, monkeypatch):
    from helpers import fa3_world as fw
    from helpers import sglang_world as w

    world = _world()
    rec = fw.KernelRecorder(real=fa.flash_attn_with_kvcache)
    world.backend.forward_metadata.swa_page_table[1, 3] = w.SWA_PAGES + 1
    keys = {lid: world.pool.get_key_buffer(lid).clone() for lid in w.SWA_LAYERS}
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        fw.run_layer(world, world.layers[0], rec, monkeypatch)
    assert rec.calls == []  # the FA3 kernel never ran
    assert all(torch.equal(keys[lid], world.pool.get_key_buffer(lid)) for lid in keys)  # nor the K/V store
    v = info.value.violation
    assert (v.kind, v.table, v.row, v.column, v.value) == ("page_table_out_of_range", "swa_page_table", 1, 3,
                                                            w.SWA_PAGES + 1)
    torch.cuda.synchronize()  # the context is healthy


def test_clean_random_steps_bit_identical_with_the_real_kernel(fa, tmp_path, monkeypatch):
    from helpers import fa3_world as fw
    from helpers import sglang_world as w

    rng = random.Random(5)
    for step in range(20):
        lens = tuple(rng.randint(1, 60) for _ in range(rng.randint(1, 3)))
        fill = rng.choice([0, 8, 16])
        outs = []
        for armed in (False, True):
            world = _world(seq_lens=lens, fill_pages=fill, seed=step)
            rec = fw.KernelRecorder(real=fa.flash_attn_with_kvcache)
            if armed:
                with kvtrap.armed(dump_dir=str(tmp_path)):
                    o = [fw.run_layer(world, layer, rec, monkeypatch, seed=step) for layer in world.layers]
            else:
                o = [fw.run_layer(world, layer, rec, monkeypatch, seed=step) for layer in world.layers]
            keys = [world.pool.get_key_buffer(lid).clone() for lid in w.SWA_LAYERS + w.FULL_LAYERS]
            outs.append((o, keys, len(rec.calls)))
        (o_a, k_a, n_a), (o_b, k_b, n_b) = outs
        assert n_a == n_b == len(w.SWA_LAYERS + w.FULL_LAYERS)
        assert all(torch.equal(x, y) for x, y in zip(o_a, o_b, strict=True)), f"step {step}: outputs differ"
        assert all(torch.equal(x, y) for x, y in zip(k_a, k_b, strict=True))
    assert not list(tmp_path.iterdir()), "a clean run wrote a dump"


def test_guard_in_captured_decode_graph_redirects_and_traps_at_drain(fa, tmp_path):
    """fa3 builds the replay tables in ``init_forward_metadata_out_graph``, outside the captured graph;
    kvtrap's guard runs right after it. A stale mapping entry injected *after* the capture puts SWA page
    5000 (of 17) into the table the graph reads: the guard redirects it to page 0 before the replay, the
    replay completes, and the drain raises with a dump. The context stays usable."""
    from helpers import fa3_world as fw
    from helpers import sglang_world as w

    from kvtrap.capture.hooks import device_guard
    from kvtrap.capture.session import current

    world = fw.graph_world(device="cuda", head_dim=HEAD_DIM, fill_pages=8)
    backend, fb = world.backend, world.fb
    q, k, v = w.qkv(3, head_dim=HEAD_DIM, device="cuda")
    with kvtrap.armed(dump_dir=str(tmp_path)):
        backend.init_forward_metadata_out_graph(fb)
        for layer in world.layers:  # warm-up: loads FA3 and compiles the Triton builder outside the capture
            backend.forward_decode(q, k, v, layer, fb)
        torch.cuda.synchronize()
        backend.init_forward_metadata_out_graph(fb, in_capture=True)  # as the runner does before capturing
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = torch.cat([backend.forward_decode(q, k, v, layer, fb) for layer in world.layers], dim=1)
        # a clean replay: no entries
        backend.init_forward_metadata_out_graph(fb)
        graph.replay()
        torch.cuda.synchronize()
        device_guard.drain_all(current(), None)  # no step result: nothing to wait on
        clean = out.clone()
        assert torch.isfinite(clean.float()).all()
        # the fault, after the capture: a stale full->SWA mapping entry for a live token of row 1
        slot = int(world.batch.token_slots[1][2 * w.PAGE_SIZE])
        world.pool.full_to_swa_index_mapping[slot] = 5000 * w.PAGE_SIZE
        backend.init_forward_metadata_out_graph(fb)  # the per-replay build, then kvtrap's guard
        md = backend.forward_metadata
        assert int(md.swa_page_table[1, 2]) == 0  # redirected before the replay
        graph.replay()
        torch.cuda.synchronize()  # no illegal address: the kernel read page 0, not page 5000
        with pytest.raises(kvtrap.KVTrapError) as info:
            device_guard.drain_all(current(), None)  # no step result: nothing to wait on
    v = info.value.violation
    assert (v.where, v.table, v.row, v.column, v.value, v.bound) == ("device_guard", "swa_page_table", 1, 2, 5000,
                                                                       w.SWA_PAGES + 1)
    dump = kvtrap.load_dump(info.value.dump_path)
    assert dump.manifest["context"]["guard"]["redirected_to"] == 0
    assert dump.manifest["context"]["backend"]["class"] == "FlashAttentionBackend"
    assert torch.ones(4, device="cuda").sum().item() == 4.0  # the CUDA context is alive
    # rows without the bad entry read the same KV as before
    assert torch.equal(out[0], clean[0]) and torch.equal(out[2], clean[2])
