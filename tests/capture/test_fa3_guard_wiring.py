"""The device guard wired into SGLang's fa3 backend, on CPU: SGLang's own CUDA-graph metadata path
(``init_cuda_graph_state`` + ``init_forward_metadata_out_graph``, its Triton builder in Triton's
interpreter) followed by kvtrap's guard launch, drained by the hook on ``process_batch_result_decode``.

On CPU the guard is never wanted (its tables are not CUDA tensors), so these tests lift only that device
check (``fa3_guard.guard_wanted``); everything else is the code a GPU server runs. The compiled guard inside
a captured, replayed CUDA graph: ``tests/capture/test_fa3_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

import kvtrap

pytest.importorskip("sglang")

from helpers import fa3_world as fw  # noqa: E402
from helpers import sglang_world as w  # noqa: E402

pytestmark = pytest.mark.cpu_world(gpu="tests/capture/test_fa3_gpu.py")
fw.fa3_module()


@pytest.fixture
def guard_on_cpu(monkeypatch):
    from kvtrap.capture.hooks import fa3_guard

    monkeypatch.setattr(fa3_guard, "guard_wanted", lambda table, guard: guard != "off")


def _drain():
    from sglang.srt.managers.scheduler_components.batch_result_processor import SchedulerBatchResultProcessor
    from sglang.srt.managers.utils import GenerationBatchResult

    processor = object.__new__(SchedulerBatchResultProcessor)
    processor.process_batch_result_decode(None, GenerationBatchResult())


def test_guard_runs_after_fa3_replay_metadata_and_drains_into_a_trap(tmp_path, guard_on_cpu):
    world = fw.graph_world(fill_pages=8)
    backend, fb = world.backend, world.fb
    # a stale full->SWA mapping entry for a live token: SGLang's builder translates it into the SWA table
    slot = int(world.batch.token_slots[1][2 * w.PAGE_SIZE])  # the first token of row 1's third page
    world.pool.full_to_swa_index_mapping[slot] = 5000 * w.PAGE_SIZE
    with kvtrap.armed(dump_dir=str(tmp_path)):
        backend.init_forward_metadata_out_graph(fb)  # the runner's per-replay call (outside the graph)
        md = backend.forward_metadata
        assert int(md.swa_page_table[1, 2]) == 0  # redirected before any replay could read it
        assert md.swa_page_table.data_ptr() == backend.decode_cuda_graph_metadata["swa_page_table"].data_ptr()
        with pytest.raises(kvtrap.KVTrapError) as info:
            _drain()
    v = info.value.violation
    assert (v.where, v.table, v.row, v.column, v.value, v.bound) == ("device_guard", "swa_page_table", 1, 2, 5000,
                                                                       w.SWA_PAGES + 1)
    dump = kvtrap.load_dump(info.value.dump_path)
    assert dump.manifest["context"]["backend"]["class"] == "FlashAttentionBackend"
    assert dump.tensors["guard_entries"][0][4] == 5000


def test_clean_replay_metadata_untouched_and_quiet(tmp_path, guard_on_cpu):
    world = fw.graph_world(fill_pages=8)
    backend, fb = world.backend, world.fb
    backend.init_forward_metadata_out_graph(fb)
    before = (backend.forward_metadata.page_table.clone(), backend.forward_metadata.swa_page_table.clone())
    from kvtrap.capture.hooks import device_guard
    from kvtrap.capture.session import current

    with kvtrap.armed(dump_dir=str(tmp_path)):
        backend.init_forward_metadata_out_graph(fb)
        state = device_guard._states[backend]
        assert state.record.pending() == 0
        device_guard.drain_all(current(), None)  # no step result: nothing to wait on
    md = backend.forward_metadata
    assert torch.equal(md.page_table, before[0]) and torch.equal(md.swa_page_table, before[1])
    assert not list(tmp_path.iterdir())


def test_no_launch_while_binding_buffers_for_capture(tmp_path, guard_on_cpu, monkeypatch):
    from kvtrap.capture.hooks import fa3_guard

    launched = []
    monkeypatch.setattr(fa3_guard, "guard_metadata", lambda *a, **k: launched.append(a))
    world = fw.graph_world()
    with kvtrap.armed(dump_dir=str(tmp_path)):
        world.backend.init_forward_metadata_out_graph(world.fb, in_capture=True)
        assert launched == []  # placeholders before the capture: nothing to check
        world.backend.init_forward_metadata_out_graph(world.fb)
        assert len(launched) == 1
