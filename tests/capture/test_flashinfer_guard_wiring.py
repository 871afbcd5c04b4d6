"""The ragged device guard wired into SGLang's flashinfer backend, on CPU: SGLang's own CUDA-graph decode metadata
path (``init_forward_metadata_out_graph``: its indices updater gathers into the cuda-graph wrappers' buffers, SGLang's
Triton gather interpreted) followed by kvtrap's guard launch on those buffers, drained by the hook on SGLang's real
``process_batch_result_decode``. FlashInfer's ``plan`` (CUDA work) is a stand-in doing its cuda-graph buffer copies
(``helpers/flashinfer_graph.py``); the guard's device check is lifted (``flashinfer_guard.guard_wanted``).
"""

from __future__ import annotations

import pytest
import torch

import kvtrap

pytest.importorskip("sglang")
pytest.importorskip("flashinfer")

from helpers import flashinfer_graph as fg  # noqa: E402
from helpers import sglang_world as w  # noqa: E402
from helpers import triton_graph as tg  # noqa: E402

pytestmark = pytest.mark.cpu_world(gpu="tests/capture/test_trap_ragged_gpu.py::test_flashinfer_*")

FULL_ROWS = w.FULL_PAGES * w.PAGE_SIZE + w.PAGE_SIZE
SWA_ROWS = w.SWA_PAGES * w.PAGE_SIZE + w.PAGE_SIZE


@pytest.fixture
def guard_on_cpu(monkeypatch):
    from kvtrap.capture.hooks import flashinfer_guard

    monkeypatch.setattr(flashinfer_guard, "guard_wanted", lambda ids, guard: guard != "off")


def _drain():
    from sglang.srt.managers.scheduler_components.batch_result_processor import SchedulerBatchResultProcessor
    from sglang.srt.managers.utils import GenerationBatchResult

    processor = object.__new__(SchedulerBatchResultProcessor)
    processor.process_batch_result_decode(None, GenerationBatchResult())


def _sets(world):
    return [tg.ragged(wr._paged_kv_indptr_buf, wr._paged_kv_indices_buf) for wr in world.wrappers]


def _expected(world):
    mapping = world.pool.full_to_swa_index_mapping
    full = [s.tolist() for s in world.batch.token_slots]
    window = [mapping[s[max(0, s.numel() - (fg.WINDOW + 1)):]].tolist() for s in world.batch.token_slots]
    return window, full  # wrapper 0 (window layers), wrapper 1


def test_bad_full_id_in_the_planned_wrapper_redirected_and_trapped(tmp_path, guard_on_cpu):
    world = fg.graph_world()
    bad = FULL_ROWS + 9
    world.backend.kv_index_translator.req_to_token[2, 5] = bad  # request 1, position 5: outside its window
    with kvtrap.armed(dump_dir=str(tmp_path)):
        world.backend.init_forward_metadata_out_graph(world.fb)  # the runner's per-replay call
        window, full = _sets(world)
        exp_window, exp_full = _expected(world)
        assert full[1][5] == 0 and full[1][6:] == exp_full[1][6:] and full[0] == exp_full[0] and window == exp_window
        with pytest.raises(kvtrap.KVTrapError) as info:
            _drain()
    v = info.value.violation
    assert (v.kind, v.table, v.pool, v.row, v.column, v.value, v.bound) == (
        "kv_indices_out_of_range", "kv_indices", "full", 1, 5, bad, FULL_ROWS)
    dump = kvtrap.load_dump(info.value.dump_path)
    assert dump.manifest["context"]["backend"]["class"] == "FlashInferAttnBackend"
    assert dump.tensors["guard_entries"][0][4] == bad


def test_bad_window_translation_checked_against_the_swa_pool(tmp_path, guard_on_cpu):
    world = fg.graph_world()
    slot = int(world.batch.token_slots[2][-2])  # request 2, inside its window
    world.pool.full_to_swa_index_mapping[slot] = SWA_ROWS + 5
    with kvtrap.armed(dump_dir=str(tmp_path)):
        world.backend.init_forward_metadata_out_graph(world.fb)
        window = _sets(world)[0]
        assert window[2][-2] == 0
        with pytest.raises(kvtrap.KVTrapError) as info:
            _drain()
    v = info.value.violation
    assert (v.table, v.pool, v.row, v.column, v.value, v.bound) == ("window_kv_indices", "swa", 2, len(window[2]) - 2,
                                                                     SWA_ROWS + 5, SWA_ROWS)


def test_clean_replays_bit_identical_and_quiet(tmp_path, guard_on_cpu):
    from kvtrap.capture.hooks import device_guard
    from kvtrap.capture.session import current

    for lens in [(40, 100, 17), (1, 200), (63, 64, 65, 3)]:
        plain, guarded = fg.graph_world(lens), fg.graph_world(lens)
        plain.backend.init_forward_metadata_out_graph(plain.fb)
        with kvtrap.armed(dump_dir=str(tmp_path)):
            guarded.backend.init_forward_metadata_out_graph(guarded.fb)
            state = device_guard._states.get(guarded.backend)
            assert state is not None and set(state.last_checked) == {"kv_indices", "window_kv_indices"}
            assert state.record.pending() == 0
            device_guard.drain_all(current(), None)
        for a, b in zip(plain.wrappers, guarded.wrappers, strict=True):
            assert torch.equal(a._paged_kv_indptr_buf, b._paged_kv_indptr_buf)
            assert torch.equal(a._paged_kv_indices_buf, b._paged_kv_indices_buf)
        assert _sets(guarded) == list(_expected(guarded))
    assert not list(tmp_path.iterdir())


def test_nothing_launched_when_off_or_disarmed(tmp_path, guard_on_cpu, monkeypatch):
    from kvtrap.capture.hooks import flashinfer_guard

    launched = []
    monkeypatch.setattr(flashinfer_guard, "guard_rails", lambda *a, **k: launched.append(a))
    world = fg.graph_world()
    with kvtrap.armed(dump_dir=str(tmp_path), guard="off"):
        world.backend.init_forward_metadata_out_graph(world.fb)
    world.backend.init_forward_metadata_out_graph(world.fb)
    assert launched == []
    with kvtrap.armed(dump_dir=str(tmp_path)):
        world.backend.init_forward_metadata_out_graph(world.fb)
    assert len(launched) == 1 and launched[0][1]["kv_indices"].indices is world.wrappers[1]._paged_kv_indices_buf
