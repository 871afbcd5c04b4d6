"""The ragged device guard wired into SGLang's triton backend, on CPU: SGLang's own CUDA-graph metadata path
(``init_cuda_graph_state`` + ``init_forward_metadata_out_graph``, its Triton index gathers interpreted) followed
by kvtrap's guard launch, drained by the hook on SGLang's real ``process_batch_result_decode``.

On CPU the guard is never wanted (the sets are not CUDA tensors), so these tests lift only that device check
(``triton_guard.guard_wanted``); everything else is the code a GPU server runs. The compiled guard around a
captured, replayed graph: ``tests/capture/test_triton_guard_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

import kvtrap

pytest.importorskip("sglang")

from helpers import sglang_world as w  # noqa: E402
from helpers import triton_graph as tg  # noqa: E402

pytestmark = pytest.mark.cpu_world(gpu="tests/capture/test_triton_guard_gpu.py")

FULL_ROWS = w.FULL_PAGES * w.PAGE_SIZE + w.PAGE_SIZE
SWA_ROWS = w.SWA_PAGES * w.PAGE_SIZE + w.PAGE_SIZE
BUFFERS = ("kv_indptr", "cuda_graph_kv_indices", "window_kv_indptr", "cuda_graph_window_kv_indices",
           "cuda_graph_num_kv_splits", "cuda_graph_window_num_kv_splits", "cuda_graph_swa_out_cache_loc")


@pytest.fixture
def guard_on_cpu(monkeypatch):
    from kvtrap.capture.hooks import triton_guard

    monkeypatch.setattr(triton_guard, "guard_wanted", lambda ids, guard: guard != "off")


def _drain():
    from sglang.srt.managers.scheduler_components.batch_result_processor import SchedulerBatchResultProcessor
    from sglang.srt.managers.utils import GenerationBatchResult

    processor = object.__new__(SchedulerBatchResultProcessor)
    processor.process_batch_result_decode(None, GenerationBatchResult())


def _buffers(backend) -> dict[str, torch.Tensor]:
    return {name: getattr(backend, name).clone() for name in BUFFERS}


def _state(backend):
    from kvtrap.capture.hooks import device_guard

    return device_guard._states.get(backend)


def test_bad_full_id_in_the_replay_set_redirected_and_trapped_at_the_drain(tmp_path, guard_on_cpu):
    world = tg.graph_world()
    backend, fb = world.backend, world.fb
    bad = FULL_ROWS + 7
    world.backend.req_to_token[2, 5] = bad  # request 1, position 5 (outside its window): SGLang gathers it
    with kvtrap.armed(dump_dir=str(tmp_path)):
        backend.init_forward_metadata_out_graph(fb)  # the runner's per-replay call (outside the graph)
        ids = tg.ragged(backend.kv_indptr[:4], backend.cuda_graph_kv_indices)
        full, window = tg.expected_rails(world)
        assert ids[1][5] == 0  # redirected before any replay could read it
        assert ids[0] == full[0] and ids[2] == full[2] and ids[1][:5] + ids[1][6:] == full[1][:5] + full[1][6:]
        assert tg.ragged(backend.window_kv_indptr[:4], backend.cuda_graph_window_kv_indices) == window
        with pytest.raises(kvtrap.KVTrapError) as info:
            _drain()
    v = info.value.violation
    assert (v.kind, v.where, v.table, v.pool, v.row, v.column, v.value, v.lower, v.bound, v.count) == (
        "kv_indices_out_of_range", "device_guard", "kv_indices", "full", 1, 5, bad, 0, FULL_ROWS, 1)
    dump = kvtrap.load_dump(info.value.dump_path)
    ctx = dump.manifest["context"]
    assert ctx["backend"]["class"] == "TritonAttnBackend" and ctx["batch_size"] == 3
    assert ctx["tables"]["kv_indices"]["bound"] == FULL_ROWS and ctx["tables"]["window_kv_indices"]["pool"] == "swa"
    assert ctx["guard"]["tables"]["kv_indices"]["id"] == int(dump.tensors["guard_entries"][0][0])
    assert dump.tensors["guard_entries"].tolist() == [[ctx["guard"]["tables"]["kv_indices"]["id"], -1, 1, 5, bad,
                                                       FULL_ROWS, 1]]
    assert dump.tensors["kv_indices"].shape == (sum(world.batch.seq_lens),)  # the live ids, as the kernel read them
    assert int(dump.tensors["kv_indices"][41 + 5]) == 0 and dump.tensors["kv_indptr"].tolist() == [0, 41, 142, 160]
    from kvtrap.report.explain import explain

    assert "ragged-kv-ids" in [f.rule for f in explain(dump)]
    assert _state(backend).record.pending() == 0  # drained


def test_untranslated_window_id_checked_against_the_swa_pool(tmp_path, guard_on_cpu):
    world = tg.graph_world(fill_pages=16)  # full ids past the SWA rows
    backend, fb = world.backend, world.fb
    slot = int(world.batch.token_slots[2][-3])  # request 2, inside its window
    world.pool.full_to_swa_index_mapping[slot] = slot  # the translation skipped for this token
    assert slot >= SWA_ROWS
    with kvtrap.armed(dump_dir=str(tmp_path)):
        backend.init_forward_metadata_out_graph(fb)
        window = tg.ragged(backend.window_kv_indptr[:4], backend.cuda_graph_window_kv_indices)
        assert window[2][-3] == 0
        with pytest.raises(kvtrap.KVTrapError) as info:
            _drain()
    v = info.value.violation
    n = len(window[2])
    assert (v.table, v.pool, v.row, v.column, v.value, v.bound) == ("window_kv_indices", "swa", 2, n - 3, slot, SWA_ROWS)


def test_window_set_on_a_plain_pool_is_bounded_by_the_full_pool(tmp_path, guard_on_cpu):
    world = tg.graph_world(plain=True)
    backend, fb = world.backend, world.fb
    full, window = tg.expected_rails(world)
    assert tg.ragged(backend.window_kv_indptr[:4], backend.cuda_graph_window_kv_indices) == window == [
        f[-tg.WINDOW:] for f in full]  # untranslated: full-pool ids
    bad = FULL_ROWS + 3
    backend.req_to_token[3, int(world.batch.seq_lens[2]) - 1] = bad  # request 2's last token: in both sets
    with kvtrap.armed(dump_dir=str(tmp_path)):
        backend.init_forward_metadata_out_graph(fb)
        with pytest.raises(kvtrap.KVTrapError) as info:
            _drain()
    dump = kvtrap.load_dump(info.value.dump_path)
    entries = sorted(map(tuple, dump.tensors["guard_entries"].tolist()))
    ids = {name: t["id"] for name, t in dump.manifest["context"]["guard"]["tables"].items()}
    n = world.batch.seq_lens[2]
    assert entries == sorted([(ids["kv_indices"], -1, 2, n - 1, bad, FULL_ROWS, 1),
                              (ids["window_kv_indices"], -1, 2, min(n, tg.WINDOW) - 1, bad, FULL_ROWS, 1)])
    assert dump.manifest["context"]["guard"]["tables"]["window_kv_indices"]["pool"] == "full"


def test_clean_replays_bit_identical_armed_and_unarmed_and_quiet(tmp_path, guard_on_cpu):
    for step, lens in enumerate([(40, 100, 17), (1, 200), (63, 64, 65, 3), (200,)]):
        plain = tg.graph_world(lens)
        guarded = tg.graph_world(lens)
        plain.backend.init_forward_metadata_out_graph(plain.fb)
        with kvtrap.armed(dump_dir=str(tmp_path)):
            guarded.backend.init_forward_metadata_out_graph(guarded.fb)
            state = _state(guarded.backend)
            assert state is not None and set(state.last_checked) == {"kv_indices", "window_kv_indices"}
            assert state.record.pending() == 0, step
            from kvtrap.capture.hooks import device_guard
            from kvtrap.capture.session import current

            device_guard.drain_all(current(), None)  # what the drain hook runs first: nothing recorded, returns
        a, b = _buffers(plain.backend), _buffers(guarded.backend)
        assert all(torch.equal(a[k], b[k]) for k in BUFFERS), step
        full, window = tg.expected_rails(guarded)
        bs = len(lens)
        assert tg.ragged(guarded.backend.kv_indptr[: bs + 1], guarded.backend.cuda_graph_kv_indices) == full
    assert not list(tmp_path.iterdir())


def test_nothing_launched_while_binding_buffers_for_capture_or_when_off(tmp_path, guard_on_cpu, monkeypatch):
    from kvtrap.capture.hooks import triton_guard

    launched = []
    monkeypatch.setattr(triton_guard, "guard_rails", lambda *a, **k: launched.append(a))
    world = tg.graph_world(replay=False)
    with kvtrap.armed(dump_dir=str(tmp_path)):
        world.backend.init_forward_metadata_out_graph(world.fb, in_capture=True)
        assert launched == []  # placeholders before the capture: nothing to check
        world.backend.init_forward_metadata_out_graph(world.fb)
        assert len(launched) == 1
        rails = launched[0][1]
        assert rails["kv_indices"].indices is world.backend.cuda_graph_kv_indices
        assert rails["window_kv_indices"].indices is world.backend.cuda_graph_window_kv_indices
        assert rails["window_kv_indices"].space == "swa" and rails["kv_indices"].indptr.numel() == 4
    with kvtrap.armed(dump_dir=str(tmp_path), guard="off"):
        world.backend.init_forward_metadata_out_graph(world.fb)
    world.backend.init_forward_metadata_out_graph(world.fb)  # disarmed
    assert len(launched) == 1


def test_decode_context_parallel_and_unified_pools_stand_aside(tmp_path, guard_on_cpu, monkeypatch):
    from kvtrap.capture.hooks import triton_guard

    launched = []
    monkeypatch.setattr(triton_guard, "guard_rails", lambda *a, **k: launched.append(a))
    world = tg.graph_world(replay=False)
    with kvtrap.armed(dump_dir=str(tmp_path)):
        monkeypatch.setattr(triton_guard, "sharded_kv", lambda backend: True)
        world.backend.init_forward_metadata_out_graph(world.fb)
        monkeypatch.setattr(triton_guard, "sharded_kv", lambda backend: False)
        monkeypatch.setattr(triton_guard, "translating", lambda backend: True)
        world.backend.init_forward_metadata_out_graph(world.fb)
    assert launched == []


# ------------------------------------------------------------------------------ EAGLE multi-step draft
def test_draft_step_sets_guarded_after_the_multi_step_replay_build(tmp_path, guard_on_cpu):
    world = tg.draft_world()
    draft = world.draft
    r2t = draft.req_to_token_pool.req_to_token
    bad = FULL_ROWS + 11
    r2t[2, 5] = bad  # request 1, position 5: read by every step, outside the window (SGLang translates the window)
    with kvtrap.armed(dump_dir=str(tmp_path)):
        draft.init_forward_metadata_out_graph(world.fb)  # the draft runner's per-replay call
        for i in range(world.steps - 1):
            got = tg.ragged(draft.kv_indptr[i, :4], draft.cuda_graph_kv_indices[i])
            full, _ = tg.expected_draft_rails(world, i)
            assert got[1][5] == 0 and got[1][6:] == full[1][6:] and got[0] == full[0] and got[2] == full[2]
        with pytest.raises(kvtrap.KVTrapError) as info:
            _drain()
    v = info.value.violation
    assert (v.kind, v.table, v.row, v.column, v.value, v.bound) == ("kv_indices_out_of_range", "kv_indices", 1, 5,
                                                                     bad, FULL_ROWS)
    states = [_state(inner) for inner in draft.attn_backends]
    assert all(s is not None for s in states)
    # the first drained backend raised; the other step's record still holds its own entry: the next drain
    assert sorted(s.record.pending() for s in states) == [0, 1]
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        _drain()
    assert (info.value.violation.row, info.value.violation.column, info.value.violation.value) == (1, 5, bad)
    assert [s.record.pending() for s in states] == [0, 0]


def test_draft_clean_replays_bit_identical_and_quiet(tmp_path, guard_on_cpu):
    plain, guarded = tg.draft_world(replay=False), tg.draft_world(replay=False)
    plain.draft.init_forward_metadata_out_graph(plain.fb)
    with kvtrap.armed(dump_dir=str(tmp_path)):
        guarded.draft.init_forward_metadata_out_graph(guarded.fb)
        states = [_state(inner) for inner in guarded.draft.attn_backends]
        assert all(s is not None and s.record.pending() == 0 for s in states)
        assert all(set(s.last_checked) == {"kv_indices", "window_kv_indices"} for s in states)
    for name in ("kv_indptr", "cuda_graph_kv_indices", "window_kv_indptr", "cuda_graph_window_kv_indices"):
        assert torch.equal(getattr(plain.draft, name), getattr(guarded.draft, name)), name
    for i in range(guarded.steps - 1):
        full, window = tg.expected_draft_rails(guarded, i)
        assert tg.ragged(guarded.draft.kv_indptr[i, :4], guarded.draft.cuda_graph_kv_indices[i]) == full
        assert tg.ragged(guarded.draft.window_kv_indptr[i, :4], guarded.draft.cuda_graph_window_kv_indices[i]) == window
    assert not list(tmp_path.iterdir())
