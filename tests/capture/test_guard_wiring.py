"""The device guard wired into SGLang: guard launches on a real backend's page tables, drained by the
hook on SGLang's ``process_batch_result_decode`` before the step's results are used.

The world is SGLang's objects on CPU tensors, which Triton takes only when it interprets
(``TRITON_INTERPRET=1``, read when a kernel is decorated): so the body runs in a child process with the
variable set. It is a CPU world (``cpu_world``, tests/helpers/srt.py): skipped where Triton compiles, like
the other CPU worlds; the guard compiled on CUDA is ``test_guard_gpu.py`` and ``test_guard_fused.py``'s gpu
tests. (The child used to run there too, and cannot: on the H200 machine (Triton 3.6, NumPy 2.5) SGLang's
``alloc_extend_kernel`` fails under the interpreter while building the world, "only 0-dimensional arrays can be
converted to Python scalars". Triton 3.6's interpreter converts a kernel scalar used as an index or loop bound
with ``int()`` of a one-element array, which NumPy 2.5 refuses; Triton 3.8's squeezes it first. The guard
kernel's ``range(0, width, BLOCK)`` takes that path too: with Triton 3.6 and NumPy's deprecation of it raised
as an error, the child fails there on the CPU machine.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sglang")
pytest.importorskip("triton")
from helpers.srt import import_srt  # noqa: E402

import_srt("sglang.srt.mem_cache.swa_memory_pool")  # needs sgl_kernel: skipped on the GPU box, fails loudly on CPU

HERE = Path(__file__).parent
IN_CHILD = os.environ.get("KVTRAP_GUARD_WIRING_CHILD") == "1"


@pytest.mark.cpu_world(gpu="tests/capture/test_guard_gpu.py, tests/capture/test_guard_fused.py::test_gpu_*")
def test_guard_wiring_in_child_process(tmp_path):
    if IN_CHILD:
        pytest.skip("already the child")
    env = dict(os.environ, KVTRAP_GUARD_WIRING_CHILD="1", TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)), "-k", "child_"],
        env=env, capture_output=True, text=True, timeout=600, cwd=HERE.parents[1],
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 passed" in proc.stdout


child_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the child process")


def _world():
    from helpers import trapdumps as td

    pool, alloc, layers, batch, backend, fb = td.decode_world()
    return pool, alloc, backend


@child_only
def test_child_guard_records_redirects_and_drain_hook_raises_before_results(tmp_path):
    import torch
    from sglang.srt.managers.scheduler_components.batch_result_processor import SchedulerBatchResultProcessor
    from sglang.srt.managers.utils import GenerationBatchResult

    import kvtrap
    from kvtrap.capture.hooks import device_guard

    pool, alloc, backend = _world()
    md = backend.forward_metadata
    md.swa_page_table[1, 3] = 5000  # far past the 17-page SWA pool
    clean_full = md.page_table.clone()
    with kvtrap.armed(dump_dir=str(tmp_path)):
        state = device_guard.guard_metadata(backend, md, publish=False)
        assert md.swa_page_table[1, 3] == 0  # redirected to the reserved page: the kernel can read it
        assert torch.equal(md.page_table, clean_full)  # nothing else touched
        processor = object.__new__(SchedulerBatchResultProcessor)
        with pytest.raises(kvtrap.KVTrapError) as info:
            processor.process_batch_result_decode(None, GenerationBatchResult())
    v = info.value.violation
    assert (v.where, v.table, v.row, v.column, v.value, v.bound) == ("device_guard", "swa_page_table", 1, 3, 5000, 17)
    dump = kvtrap.load_dump(info.value.dump_path)
    assert dump.manifest["context"]["guard"]["redirected_to"] == 0
    assert dump.tensors["guard_entries"][0][4] == 5000
    assert state.record.pending() == 0


@child_only
def test_child_clean_tables_pass_untouched(tmp_path):
    import torch

    import kvtrap
    from kvtrap.capture.hooks import device_guard

    pool, alloc, backend = _world()
    md = backend.forward_metadata
    before = (md.page_table.clone(), md.swa_page_table.clone())
    with kvtrap.armed(dump_dir=str(tmp_path)):
        state = device_guard.guard_metadata(backend, md, publish=False)
        device_guard.drain(state, kvtrap.capture.session.current(), synced=False)
    assert torch.equal(md.page_table, before[0]) and torch.equal(md.swa_page_table, before[1])
    assert not list(tmp_path.iterdir())


@child_only
def test_child_pool_without_token_mapping_guards_bounds_only(tmp_path):
    """Unified SWA pools keep ``full_to_swa_index_mapping = None``: the guard must still run (bounds only)."""
    import kvtrap
    from kvtrap.capture.hooks import device_guard

    pool, alloc, backend = _world()
    md = backend.forward_metadata
    pool.full_to_swa_index_mapping = None  # what UnifiedSWAKVPool holds
    md.swa_page_table[0, 1] = 999
    with kvtrap.armed(dump_dir=str(tmp_path)):
        state = device_guard.guard_metadata(backend, md, publish=False)
        with pytest.raises(kvtrap.KVTrapError) as info:
            device_guard.drain(state, kvtrap.capture.session.current(), synced=False)
    assert (info.value.violation.table, info.value.violation.value) == ("swa_page_table", 999)
