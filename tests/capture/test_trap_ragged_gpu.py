"""triton and flashinfer traps with CUDA index tensors: one host sync per scan when eager, none while a CUDA
graph is captured.

The backends, pool and allocator are the real sglang==0.5.23 objects of ``test_trap_triton.py`` /
``test_trap_flashinfer.py``, built on the GPU: pool and allocator on CUDA (SGLang's allocator kernels run
compiled), and the ragged index sets (triton's metadata, flashinfer's planned wrapper buffers) are gathered
from the CUDA allocations. Needs a GPU machine where ``sglang.srt`` imports (the full runtime).
"""

from __future__ import annotations

import pytest
import torch

import kvtrap
from kvtrap.capture import checks
from kvtrap.capture.hooks import flashinfer as flashinfer_hook
from kvtrap.capture.hooks import triton as triton_hook

pytestmark = pytest.mark.gpu

from helpers import sglang_world as w  # noqa: E402
from helpers import trapdumps as td  # noqa: E402

RAGGED = ("kv_indptr", "kv_indices", "window_kv_indptr", "window_kv_indices")


def cuda_world():
    w.triton_classes()  # skips where sglang.srt cannot import (no sgl_kernel)
    _, alloc, layers, _, backend, fb = td.triton_world(device="cuda")
    md = backend.forward_metadata
    assert alloc.full_to_swa_index_mapping.is_cuda and all(getattr(md, name).is_cuda for name in RAGGED)
    return layers, backend, fb


def test_eager_cuda_scan_traps_a_bad_window_id(tmp_path):
    layers, backend, fb = cuda_world()
    backend.forward_metadata.window_kv_indices[7] = 10**6
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:
        triton_hook.check_layer(backend, layers[0], fb, "forward_decode")
    v = info.value.violation
    assert (v.kind, v.table, v.value) == ("kv_indices_out_of_range", "window_kv_indices", 10**6)


def test_no_scan_and_no_sync_while_capturing(tmp_path, monkeypatch):
    layers, backend, fb = cuda_world()
    scans = []
    real = checks.scan_ragged
    monkeypatch.setattr(checks, "scan_ragged", lambda *a, **k: scans.append(1) or real(*a, **k))
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with kvtrap.armed(dump_dir=str(tmp_path)), torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for layer in layers:  # any host sync here aborts the capture
            triton_hook.check_layer(backend, layer, fb, "forward_decode")
    assert scans == [] and not list(tmp_path.iterdir())


def test_flashinfer_no_scan_and_no_sync_while_capturing(tmp_path, monkeypatch):
    w.flashinfer_classes()
    _, _, layers, _, backend, fb = td.flashinfer_world(device="cuda")
    for wrapper in backend.forward_metadata.decode_wrappers:
        assert wrapper._paged_kv_indptr_buf.is_cuda and wrapper._paged_kv_indices_buf.is_cuda
    scans = []
    real = checks.scan_ragged
    monkeypatch.setattr(checks, "scan_ragged", lambda *a, **k: scans.append(1) or real(*a, **k))
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with kvtrap.armed(dump_dir=str(tmp_path)), torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for layer in layers:
            flashinfer_hook.check_layer(backend, layer, fb, "forward_decode")
    assert scans == [] and not list(tmp_path.iterdir())
    backend.forward_metadata.decode_wrappers[0]._paged_kv_indices_buf[3] = -1
    with kvtrap.armed(dump_dir=str(tmp_path)), pytest.raises(kvtrap.KVTrapError) as info:  # eager: scanned
        flashinfer_hook.check_layer(backend, layers[0], fb, "forward_decode")
    assert info.value.violation.kind == "kv_indices_out_of_range" and scans == [1]
