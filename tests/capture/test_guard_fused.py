"""The fused metadata build + guard (:mod:`kvtrap.capture.guard.fused_metadata`) and its wiring.

Reference for every comparison: SGLang 0.5.23's own ``update_trtllm_mha_graph_metadata`` (outputs) and
that builder followed by kvtrap's separate guard (record entries and redirected tables).

CPU: Triton interprets kernels only when ``TRITON_INTERPRET=1`` is set before it is imported, so the
``child_`` tests run in a child pytest process with the variable set. GPU tests (``gpu`` marker) run
compiled, in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
gm = pytest.importorskip("sglang.kernels.ops.attention.trtllm_mha_graph_metadata")

from kvtrap.capture.guard import (  # noqa: E402
    GuardRecord,
    guard_page_table_,
)
from kvtrap.capture.guard.fused_metadata import GuardSpec, fused_unsupported, update_metadata_guarded_  # noqa: E402
from kvtrap.record.guard_entry import FLAG_OUT_OF_RANGE, FLAG_SEQLEN_EXCEEDS_TABLE, FLAG_SWA_MISMATCH  # noqa: E402

IN_CHILD = os.environ.get("KVTRAP_GUARD_FUSED_CHILD") == "1"
child_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the TRITON_INTERPRET=1 child process")
SWA_PAGES = 40
OUTPUTS = ("cache_seqlens", "cu_seqlens_k", "page_table", "swa_page_table", "swa_out_cache_loc", "cu_seqlens_q")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU stand-in for the compiled kernels; on a GPU the gpu-marked tests run them compiled")
def test_fused_under_interpreter_in_child_process() -> None:
    if IN_CHILD:
        pytest.skip("already the child")
    env = dict(os.environ, KVTRAP_GUARD_FUSED_CHILD="1", TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "child_"],
        env=env, capture_output=True, text=True, timeout=900, cwd=str(Path(__file__).resolve().parents[2]),
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " failed" not in proc.stdout and " passed" in proc.stdout


# ----------------------------------------------------------------------------------------- inputs
def make_world(
    bs: int, ps: int, width: int, *, seed: int = 0, swa: bool = False, offset: int = 0, q_mode: int = 0,
    swa_out_pad: int = 0, device: str = "cpu",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Inputs and garbage-filled output buffers of one in-graph build, as SGLang's backend passes them.

    Every (row, page) gets its own full page (page 0 never handed out, as in SGLang); the full->SWA
    mapping is token indexed and page aligned, ``size + page_size + 1`` entries like SGLang's.
    Returns (keyword arguments, guard bounds).
    """
    g = torch.Generator().manual_seed(seed)
    full_pages = bs * width + 1
    pages = (torch.randperm(full_pages - 1, generator=g) + 1).reshape(bs, width)
    r2t = torch.zeros(bs + 2, width * ps, dtype=torch.int32)
    slots = pages[:, :, None] * ps + torch.arange(ps)
    rpi = torch.randperm(bs, generator=g) + 1  # request rows of the pool in shuffled order
    r2t[rpi] = slots.reshape(bs, width * ps).to(torch.int32)
    lens = torch.randint(1, width * ps - offset + 1, (bs,), generator=g)
    lens[0] = width * ps - offset  # one row uses the whole table
    if bs > 2:
        lens[1] = ps  # exactly one page
        lens[2] = 1
    full_tokens = (full_pages - 1) * ps  # SGLang's `size`
    mapping = torch.zeros(full_tokens + ps + 1, dtype=torch.int64)
    fp = torch.arange(1, full_pages)
    sp = 1 + (fp * 7) % (SWA_PAGES - 1)
    mapping[ps : full_pages * ps] = (sp[:, None] * ps + torch.arange(ps)).reshape(-1)
    kw: dict[str, Any] = dict(
        req_pool_indices=rpi.to(torch.int64),
        seq_lens=lens.to(torch.int64),
        req_to_token=r2t,
        cache_seqlens=torch.full((bs,), -5, dtype=torch.int32),
        cu_seqlens_k=torch.full((bs + 1,), -5, dtype=torch.int32).index_fill_(0, torch.tensor([0]), 0),
        page_table=torch.full((bs, width), -77, dtype=torch.int32),
        bs=bs, seqlen_offset=offset, max_seq_pages=width, page_size=ps,
    )
    if swa:
        kw["swa_mapping"] = mapping
        kw["swa_page_table"] = torch.full((bs, width), -66, dtype=torch.int32)
        if swa_out_pad >= 0:
            # decode: one new token per request, the last slot of its live prefix; the buffer is padded
            last = (lens - 1).clamp(min=0)
            kw["out_cache_loc"] = slots.reshape(bs, -1).gather(1, last[:, None]).reshape(-1).to(torch.int64)
            kw["swa_out_cache_loc"] = torch.full((bs + swa_out_pad,), -55, dtype=torch.int64)
    if q_mode:
        kw["q_mode"] = q_mode
        kw["cu_seqlens_q"] = torch.full((bs + 1,), -4, dtype=torch.int32).index_fill_(0, torch.tensor([0]), 0)
        if q_mode == 1:
            kw["qlens"] = torch.randint(1, 5, (bs,), generator=g).to(torch.int64)
        else:
            kw["q_stride"] = 3
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return kw, {"full_bound": full_pages, "swa_bound": SWA_PAGES, "mapping": kw.get("swa_mapping")}


def clone_outputs(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.clone() if k in OUTPUTS and v is not None else v) for k, v in kw.items()}


def spec_for(bounds: dict[str, Any], rec: GuardRecord, swa: bool) -> GuardSpec:
    return GuardSpec(
        rec, bounds["full_bound"], rec.register_table("page_table", "full"),
        swa_bound=bounds["swa_bound"] if swa else None, swa_table_id=rec.register_table("swa_page_table", "swa"),
        swa_mapping=bounds["mapping"] if swa else None,
    )


def run_reference(kw: dict[str, Any], bounds: dict[str, Any], swa: bool) -> tuple[dict[str, Any], Any]:
    """SGLang's builder, then kvtrap's separate guard as the hook ran it (full table, then SWA)."""
    ref = clone_outputs(kw)
    gm.update_trtllm_mha_graph_metadata(**ref)
    rec = GuardRecord(64, ref["page_table"].device)
    spec = spec_for(bounds, rec, swa)
    guard_page_table_(ref["page_table"], ref["cache_seqlens"], kw["page_size"], spec.full_bound, rec,
                      spec.full_table_id)
    if swa:
        guard_page_table_(ref["swa_page_table"], ref["cache_seqlens"], kw["page_size"], SWA_PAGES, rec,
                          spec.swa_table_id, swa_mapping=bounds["mapping"], full_table=ref["page_table"])
    return ref, rec.drain()


def run_fused(
    kw: dict[str, Any], bounds: dict[str, Any], swa: bool, capacity: int = 64
) -> tuple[dict, Any]:
    out = clone_outputs(kw)
    rec = GuardRecord(capacity, out["page_table"].device)
    update_metadata_guarded_(spec=spec_for(bounds, rec, swa), **out)
    return out, rec.drain()


def assert_outputs_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    for k in OUTPUTS:
        if a.get(k) is None:
            assert b.get(k) is None
            continue
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} differs:\n{a[k]}\n{b[k]}"


CLEAN_CASES = [
    # bs, page size, width, swa, seqlen offset, q mode, swa_out padding
    (1, 16, 8, False, 0, 0, 0),
    (3, 16, 8, True, 0, 0, 0),
    (8, 64, 6, False, 1, 0, 0),
    (8, 64, 6, True, 2, 0, 5),
    (33, 16, 4, True, 3, 2, 3),  # spec decode: draft step offset, strided cu_seqlens_q
    (5, 64, 5, False, 4, 1, 0),  # target verify offset, cumsum cu_seqlens_q
    (5, 16, 7, True, 0, 1, 600),  # swa_out_cache_loc over two tiles, mostly zero tail
    (2, 16, 600, True, 0, 0, 0),  # wider than one 512-column block
    (2, 16, 1100, True, 0, 0, 0),  # wider than one 1024-column step: the row loops
]


# ------------------------------------------------------------------------------------ CPU (child)
@child_only
@pytest.mark.parametrize("bs,ps,width,swa,offset,q_mode,pad", CLEAN_CASES)
def test_child_clean_inputs_bit_identical_and_nothing_recorded(bs, ps, width, swa, offset, q_mode, pad) -> None:
    kw, bounds = make_world(bs, ps, width, seed=bs + width, swa=swa, offset=offset, q_mode=q_mode, swa_out_pad=pad)
    ref = clone_outputs(kw)
    gm.update_trtllm_mha_graph_metadata(**ref)
    fused, drained = run_fused(kw, bounds, swa)
    assert_outputs_equal(ref, fused)
    assert drained.total == 0
    # the garbage past the live prefix is untouched in both (the contract), and some row has a tail
    assert bool((ref["page_table"] == -77).any()) == bool((fused["page_table"] == -77).any())


@child_only
def test_child_swa_table_written_but_unchecked_matches_too() -> None:
    """SWA table given, live pool not SWA (the hook's rule): written like SGLang's, not checked."""
    kw, bounds = make_world(4, 16, 8, seed=1, swa=True)
    kw["swa_mapping"][16 * 3 : 16 * 4] = 10**6  # would be out of range if it were checked
    ref = clone_outputs(kw)
    gm.update_trtllm_mha_graph_metadata(**ref)
    fused, drained = run_fused(kw, bounds, swa=False)
    assert_outputs_equal(ref, fused)
    assert drained.total == 0


def _corrupt(kw: dict[str, Any], bounds: dict[str, Any], row: int, col: int, token: int) -> None:
    ps = kw["page_size"]
    kw["req_to_token"][int(kw["req_pool_indices"][row]), col * ps] = token


@child_only
@pytest.mark.parametrize("ps", [16, 64])
def test_child_corrupted_full_table_same_entries_as_separate_guard(ps: int) -> None:
    kw, bounds = make_world(4, ps, 8, seed=7)
    kw["seq_lens"][:] = 8 * ps
    kw["seq_lens"][3] = 8 * ps + 1  # needs 9 pages in an 8-page table: flag 4
    _corrupt(kw, bounds, 1, 3, (bounds["full_bound"] + 5_000_000) * ps)  # far past the pool
    _corrupt(kw, bounds, 2, 0, -3 * ps)  # negative page
    _corrupt(kw, bounds, 0, 7, bounds["full_bound"] * ps)  # exactly the bound
    ref, want = run_reference(kw, bounds, swa=False)
    fused, got = run_fused(kw, bounds, swa=False)
    assert got == want
    assert_outputs_equal(ref, fused)
    found = {(e.row, e.column, e.value, e.flags) for e in got.entries}
    assert found == {
        (1, 3, bounds["full_bound"] + 5_000_000, FLAG_OUT_OF_RANGE), (2, 0, -3, FLAG_OUT_OF_RANGE),
        (0, 7, bounds["full_bound"], FLAG_OUT_OF_RANGE), (3, 8, 9, FLAG_SEQLEN_EXCEEDS_TABLE),
    }
    assert int(fused["page_table"][1, 3]) == 0 and int(fused["page_table"][2, 0]) == 0  # redirected
    assert all(e.table_id == 0 and e.layer_id == -1 and e.bound in (bounds["full_bound"], 8) for e in got.entries)


@child_only
def test_child_corrupted_swa_same_entries_as_separate_guard() -> None:
    ps = 16
    kw, bounds = make_world(4, ps, 8, seed=11, swa=True)
    kw["seq_lens"][:] = 8 * ps
    mapping = kw["swa_mapping"]
    # (row 0, col 1): the mapping sends the page to an SWA slot far past the SWA pool
    tok = int(kw["req_to_token"][int(kw["req_pool_indices"][0]), 1 * ps])
    mapping[tok] = 10**6 * ps
    # (row 1, col 2): a negative token: full page negative, SWA page -1
    _corrupt(kw, bounds, 1, 2, -2 * ps)
    # (row 2, col 4): an unaligned token whose own slot maps elsewhere than its page's first slot:
    # the SWA entry is in range but is not the translation of the full entry (flag 2 only)
    tok = int(kw["req_to_token"][int(kw["req_pool_indices"][2]), 4 * ps])
    _corrupt(kw, bounds, 2, 4, tok + 3)
    wrong = (int(mapping[tok]) // ps) % (SWA_PAGES - 2) + 1
    mapping[tok + 3] = wrong * ps + 3
    # (row 3, col 5): full page == the pool bound, still inside the mapping; the mapping of that
    # slot is a valid SWA page but the redirected full entry (page 0) translates to 0: flags 1 + 2
    fb = bounds["full_bound"]
    _corrupt(kw, bounds, 3, 5, fb * ps)
    mapping[fb * ps] = 5 * ps
    ref, want = run_reference(kw, bounds, swa=True)
    fused, got = run_fused(kw, bounds, swa=True)
    assert got == want
    assert_outputs_equal(ref, fused)
    found = {(e.table_id, e.row, e.column, e.value, e.flags) for e in got.entries}
    assert found == {
        (1, 0, 1, 10**6, FLAG_OUT_OF_RANGE),
        (0, 1, 2, -2, FLAG_OUT_OF_RANGE),
        (1, 1, 2, -1, FLAG_OUT_OF_RANGE | FLAG_SWA_MISMATCH),
        (1, 2, 4, wrong, FLAG_SWA_MISMATCH),
        (0, 3, 5, fb, FLAG_OUT_OF_RANGE),
        (1, 3, 5, 5, FLAG_SWA_MISMATCH),
    }
    assert int(fused["swa_page_table"][0, 1]) == 0 and int(fused["swa_page_table"][2, 4]) == wrong


@child_only
@pytest.mark.parametrize("variant", [None, (512, 4), (64, 2), (1024, 8)])
def test_child_wide_rows_every_launch_shape_same_entries(variant: tuple | None, monkeypatch) -> None:
    """Rows of several loop steps, bad entries in the first and the last step of a row: the shipped
    launch shape and the benchmark's (columns per step, warps) all give SGLang's tables and the
    separate guard's entries and redirections."""
    from kvtrap.capture.guard import fused_metadata

    if variant is not None:  # what benchmarks/guard_bench.py --sections variants does
        monkeypatch.setattr(fused_metadata, "_row_config", lambda width: variant)
    ps = 16
    kw, bounds = make_world(3, ps, 1100, seed=5, swa=True)
    kw["seq_lens"][:] = 1100 * ps
    kw["seq_lens"][1] = 700 * ps + 1  # ends inside the second 512-column step
    fb = bounds["full_bound"]
    # (tokens SGLang's builder can translate without reading past the mapping: it is the reference)
    _corrupt(kw, bounds, 0, 2, -7 * ps)
    _corrupt(kw, bounds, 0, 1090, -5 * ps)
    _corrupt(kw, bounds, 1, 700, fb * ps)
    _corrupt(kw, bounds, 2, 1099, -3 * ps)
    kw["swa_mapping"][int(kw["req_to_token"][int(kw["req_pool_indices"][2]), 600 * ps])] = 10**6 * ps
    ref, want = run_reference(kw, bounds, swa=True)
    fused, got = run_fused(kw, bounds, swa=True)
    assert got == want
    assert_outputs_equal(ref, fused)
    found = {(e.table_id, e.row, e.column) for e in got.entries}
    assert {(0, 0, 2), (0, 0, 1090), (0, 1, 700), (0, 2, 1099), (1, 2, 600)} <= found


@child_only
def test_child_token_past_the_mapping_is_bounded_and_trapped() -> None:
    """SGLang's builder would read the mapping out of bounds here (not compared): fused records both
    tables' entries and redirects them."""
    ps = 16
    kw, bounds = make_world(2, ps, 4, seed=2, swa=True)
    kw["seq_lens"][:] = 4 * ps
    _corrupt(kw, bounds, 1, 2, 10**7 * ps)
    fused, got = run_fused(kw, bounds, swa=True)
    found = {(e.table_id, e.row, e.column, e.value, e.flags) for e in got.entries}
    assert found == {(0, 1, 2, 10**7, FLAG_OUT_OF_RANGE), (1, 1, 2, -1, FLAG_OUT_OF_RANGE | FLAG_SWA_MISMATCH)}
    assert int(fused["page_table"][1, 2]) == 0 and int(fused["swa_page_table"][1, 2]) == 0


@child_only
def test_child_capacity_overflow_counts_everything() -> None:
    kw, bounds = make_world(3, 16, 8, seed=4)
    kw["seq_lens"][:] = 8 * 16
    kw["req_to_token"][:] = -16  # every live entry is page -1
    _, want = run_reference(kw, bounds, swa=False)
    _, got = run_fused(kw, bounds, swa=False, capacity=4)
    assert got.total == want.total == 24 and len(got.entries) == 4


def test_preconditions_say_why() -> None:
    kw, bounds = make_world(3, 16, 8, swa=True)
    rec = GuardRecord(4, "cpu")
    spec = spec_for(bounds, rec, swa=True)
    assert fused_unsupported(spec, **kw) is None
    assert "unified" in (fused_unsupported(spec, **{**kw, "skip_page_table": True}) or "")
    assert "width" in (fused_unsupported(spec, **{**kw, "max_seq_pages": 4}) or "")
    assert "rows" in (fused_unsupported(spec, **{**kw, "bs": 2}) or "")
    other = kw["swa_mapping"].clone()
    assert "mapping" in (fused_unsupported(spec, **{**kw, "swa_mapping": other}) or "")
    with pytest.raises(ValueError, match="does not apply"):
        update_metadata_guarded_(spec=spec, **{**kw, "max_seq_pages": 4})


# ------------------------------------------------------------------------------------ the wiring
class _Pool:
    """What the hook reads from a live pool: sizes, and for an SWA pool its sub-pools and mapping."""

    def __init__(self, full_pages: int, ps: int, mapping: Any = None) -> None:
        self.full_kv_pool = _Sub((full_pages - 1) * ps)
        self.size = self.full_kv_pool.size
        if mapping is not None:
            self.swa_kv_pool = _Sub((SWA_PAGES - 1) * ps)
            self.layers_mapping: dict[int, Any] = {}
            self.full_to_swa_index_mapping = mapping


class _Sub:
    def __init__(self, size: int) -> None:
        self.size = size


class _Backend:
    def __init__(self, ps: int, pool: _Pool) -> None:
        self.page_size = ps
        self.token_to_kv_pool = pool


def test_builder_wrapper_without_context_is_sglang_builder() -> None:
    from kvtrap.capture.hooks import device_guard

    calls: list[tuple[tuple, dict]] = []

    def original(*args: Any, **kwargs: Any) -> str:
        calls.append((args, kwargs))
        return "sglang"

    wrapper = device_guard._guarded_builder(original)
    assert device_guard.current_build() is None
    assert wrapper(bs=0, page_table=None) == "sglang"
    assert calls == [((), {"bs": 0, "page_table": None})]


@child_only
def test_child_builder_wrapper_fuses_or_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtrap.capture.hooks import device_guard

    monkeypatch.setattr(device_guard, "guard_wanted", lambda table, guard: guard != "off")  # CPU tables
    kw, bounds = make_world(3, 16, 8, seed=9, swa=True)
    kw["seq_lens"][:] = 8 * 16
    _corrupt(kw, bounds, 2, 6, -3 * 16)  # negative: inside what SGLang's builder reads safely
    backend = _Backend(16, _Pool(bounds["full_bound"], 16, kw["swa_mapping"]))
    called: list[str] = []

    def original(**kwargs: Any) -> None:
        called.append("sglang")
        gm.update_trtllm_mha_graph_metadata(**kwargs)

    wrapper = device_guard._guarded_builder(original)
    ctx = device_guard.BuildContext(backend, "auto")
    device_guard._local.ctx = ctx
    try:
        out = clone_outputs(kw)
        wrapper(**out)
        # a precondition fails: SGLang's builder, unchanged, and the reason is kept
        ctx2 = device_guard.BuildContext(backend, "auto")
        device_guard._local.ctx = ctx2
        plain = clone_outputs(kw)
        wrapper(**{**plain, "max_seq_pages": 4})
    finally:
        device_guard._local.ctx = None
    assert called == ["sglang"]  # only the second call
    assert ctx.fused is not None and ctx.fallback is None
    assert ctx2.fused is None and "width" in (ctx2.fallback or "")
    ref, want = run_reference(kw, bounds, swa=True)
    assert_outputs_equal(ref, out)
    got = ctx.fused.record.drain()
    assert [(e.row, e.column, e.value) for e in got.entries] == [(e.row, e.column, e.value) for e in want.entries]
    assert got == want
    assert device_guard._states[backend] is ctx.fused and isinstance(ctx.fused.backend, weakref.ref)


@child_only
def test_child_armed_in_graph_build_uses_fused_once_and_restores(tmp_path: Path, monkeypatch) -> None:
    """Arming replaces the module-level builder in SGLang's backend module and puts it back; a real
    ``TRTLLMHAAttnBackend.init_forward_metadata_in_graph`` then runs the fused build and no separate
    guard."""
    from helpers.srt import import_srt

    be = import_srt("sglang.srt.layers.attention.trtllm_mha_backend")
    from sglang.srt.layers.attention.trtllm_mha_backend import TRTLLMHAAttnBackend, TRTLLMMHAMetadata
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    import kvtrap
    from kvtrap.capture.hooks import device_guard

    sglang_builder = gm.update_trtllm_mha_graph_metadata
    assert be.update_trtllm_mha_graph_metadata is sglang_builder
    monkeypatch.setattr(device_guard, "guard_wanted", lambda table, guard: guard != "off")
    separate: list[Any] = []
    monkeypatch.setattr(device_guard, "guard_metadata", lambda *a, **k: separate.append(a))

    ps, bs, width = 16, 3, 8
    kw, bounds = make_world(bs, ps, width, seed=5, swa=True)
    backend = object.__new__(TRTLLMHAAttnBackend)
    backend.page_size = ps
    backend.token_to_kv_pool = _Pool(bounds["full_bound"], ps, kw["swa_mapping"])
    backend.req_to_token = kw["req_to_token"]
    backend.max_num_pages = width
    backend._swa_full_to_swa_mapping = kw["swa_mapping"]
    backend.kv_index_translator = type("T", (), {"is_translating": False})()
    backend.expand_encoder_only_verify = False
    backend.speculative_step_id = 0
    backend.use_sliding_window_kv_pool = True
    md = TRTLLMMHAMetadata()
    md.cache_seqlens_int32, md.cu_seqlens_k = kw["cache_seqlens"].clone(), kw["cu_seqlens_k"].clone()
    md.page_table, md.swa_page_table = kw["page_table"].clone(), kw["swa_page_table"].clone()
    md.swa_out_cache_loc = kw["swa_out_cache_loc"].clone()
    backend.decode_cuda_graph_metadata = {bs: md}
    fb = type("FB", (), {})()
    fb.batch_size, fb.req_pool_indices, fb.seq_lens = bs, kw["req_pool_indices"], kw["seq_lens"]
    fb.forward_mode, fb.spec_info, fb.out_cache_loc = ForwardMode.DECODE, None, kw["out_cache_loc"]
    _corrupt(kw, bounds, 1, 0, -16)

    with kvtrap.armed(dump_dir=str(tmp_path)):
        assert be.update_trtllm_mha_graph_metadata is not sglang_builder
        backend.init_forward_metadata_in_graph(fb)
    assert be.update_trtllm_mha_graph_metadata is sglang_builder  # restored on disarm
    assert separate == []  # fused: no separate guard launch
    state = device_guard._states[backend]
    assert state.last_fallback is None
    ref, want = run_reference(kw, bounds, swa=True)
    out = {"cache_seqlens": md.cache_seqlens_int32, "cu_seqlens_k": md.cu_seqlens_k, "page_table": md.page_table,
           "swa_page_table": md.swa_page_table, "swa_out_cache_loc": md.swa_out_cache_loc}
    assert_outputs_equal({k: ref[k] for k in out}, out)
    got = state.record.drain()
    assert got == want and {(e.row, e.column) for e in got.entries} == {(1, 0)}


def test_module_function_target_installs_and_restores() -> None:
    import importlib.machinery
    import types

    from kvtrap.capture import patching

    mod = types.ModuleType("kvtrap_test_fake_mod")
    mod.__spec__ = importlib.machinery.ModuleSpec(mod.__name__, None)  # an imported, finished module

    def builder(x: int) -> int:
        return x + 1

    mod.builder = builder
    sys.modules[mod.__name__] = mod
    try:
        target = patching.module_function(mod.__name__, "builder", lambda orig: lambda x: orig(x) * 10)
        patching.install([target])
        assert patching.is_installed(target)
        assert mod.builder is not builder and mod.builder(1) == 20
        assert getattr(mod.builder, patching.ORIGINAL_ATTR) is builder
        patching.install([target])  # idempotent: not wrapped twice
        assert mod.builder(1) == 20
        assert patching.resolve(target) == (True, "ok")
        patching.uninstall([target])
        assert mod.builder is builder and not patching.is_installed(target)
        missing = patching.module_function(mod.__name__, "nope", lambda orig: orig)
        assert not patching.resolve(missing)[0]
    finally:
        del sys.modules[mod.__name__]


# -------------------------------------------------------------------------------------------- GPU
gpu_compiled = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled GPU run only")


@pytest.mark.gpu
@gpu_compiled
@pytest.mark.parametrize("case", CLEAN_CASES + [(64, 64, 512, True, 1, 0, 7), (256, 16, 1024, False, 0, 0, 0)])
def test_gpu_fused_bit_identical_to_sglang(case: tuple) -> None:
    bs, ps, width, swa, offset, q_mode, pad = case
    kw, bounds = make_world(bs, ps, width, seed=bs, swa=swa, offset=offset, q_mode=q_mode, swa_out_pad=pad,
                            device="cuda")
    ref = clone_outputs(kw)
    gm.update_trtllm_mha_graph_metadata(**ref)
    fused, drained = run_fused(kw, bounds, swa)
    assert_outputs_equal(ref, fused)
    assert drained.total == 0


@pytest.mark.gpu
@gpu_compiled
def test_gpu_fused_build_traps_corrupted_entry_on_graph_replay() -> None:
    ps, bs, width = 64, 8, 64
    kw, bounds = make_world(bs, ps, width, seed=3, swa=True, device="cuda")
    kw["seq_lens"][:] = width * ps - 3
    rec = GuardRecord(16)
    spec = spec_for(bounds, rec, swa=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # compile outside capture
        update_metadata_guarded_(spec=spec, **kw)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert rec.drain().total == 0
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):  # raises if the launcher synchronises
        update_metadata_guarded_(spec=spec, **kw)
        rec.publish_()
    g.replay()
    torch.cuda.synchronize()
    assert rec.pending(synced=True) == 0
    clean = clone_outputs(kw)

    bad = bounds["full_bound"] + 5_000_000
    row_in_pool = int(kw["req_pool_indices"][2])
    good_token = int(kw["req_to_token"][row_in_pool, 5 * ps])
    kw["req_to_token"][row_in_pool, 5 * ps] = bad * ps  # past the mapping too: SGLang's builder would fault
    g.replay()
    torch.cuda.synchronize()  # stands in for SGLang's copy_done.synchronize()
    assert rec.pending(synced=True) == 2
    d = rec.drain(synced=True)
    assert {(e.table_id, e.row, e.column, e.value, e.flags) for e in d.entries} == {
        (0, 2, 5, bad, FLAG_OUT_OF_RANGE), (1, 2, 5, -1, FLAG_OUT_OF_RANGE | FLAG_SWA_MISMATCH),
    }
    assert int(kw["page_table"][2, 5]) == 0 and int(kw["swa_page_table"][2, 5]) == 0
    for name in ("page_table", "swa_page_table"):
        diff = (kw[name] != clean[name]).nonzero().tolist()
        assert diff == [[2, 5]]  # only the redirected entry changed
    assert float(torch.ones(4, device="cuda").sum().item()) == 4.0  # the context is alive
    kw["req_to_token"][row_in_pool, 5 * ps] = good_token
    g.replay()
    torch.cuda.synchronize()
    assert rec.drain(synced=True).total == 0
    assert torch.equal(kw["page_table"], clean["page_table"])
