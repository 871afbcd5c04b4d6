"""The ragged device guard (``guard_ragged_``): CSR ``kv_indptr`` / ``kv_indices`` checked on the device.

On a CPU machine the kernel runs in Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``
before anything is imported); on a GPU machine the same tests run the compiled kernel on CUDA tensors. The
record / violation tests need no kernel.
"""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from kvtrap.capture.guard import GuardRecord  # noqa: E402
from kvtrap.capture.guard.ragged_kernel import guard_ragged_, splits_for  # noqa: E402
from kvtrap.record.guard_entry import FLAG_INDPTR_MALFORMED, FLAG_OUT_OF_RANGE  # noqa: E402
from kvtrap.record.kinds import Kind  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ROWS = 1000  # token rows of the pool (ids 0..999 valid)


def _record(capacity: int = 64) -> tuple[GuardRecord, int]:
    rec = GuardRecord(capacity, DEV)
    return rec, rec.register_table("kv_indices", "full", ragged=True)


def _csr(lens: list[int], *, seed: int = 0, dtype=torch.int64, slack: int = 0, indptr_dtype=torch.int32):
    """Offsets for ``lens`` and in-range ids (never 0), with ``slack`` unused ids past the last offset."""
    g = torch.Generator().manual_seed(seed)
    indptr = torch.zeros(len(lens) + 1, dtype=indptr_dtype)
    indptr[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0).to(indptr_dtype)
    n = int(sum(lens)) + slack
    ids = torch.randint(1, ROWS, (n,), generator=g).to(dtype)
    return indptr.to(DEV), ids.to(DEV)


def _guard(indptr, ids, rec, tid, bound: int = ROWS) -> None:
    guard_ragged_(indptr, ids, bound, rec, tid)


# ------------------------------------------------------------------------------------------- clean
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_clean_sets_untouched_bit_for_bit_and_nothing_recorded(dtype) -> None:
    rng = random.Random(7)
    for step in range(20):
        lens = [rng.choice([0, 1, rng.randint(1, 3000)]) for _ in range(rng.randint(1, 6))]
        indptr, ids = _csr(lens, seed=step, dtype=dtype, slack=rng.randint(0, 50))
        ids[: ids.numel() // 3] = torch.where(ids[: ids.numel() // 3] % 7 == 0, 0, ids[: ids.numel() // 3])  # slot 0 is legal
        before_ptr, before = indptr.clone(), ids.clone()
        rec, tid = _record()
        _guard(indptr, ids, rec, tid)
        assert torch.equal(ids, before) and torch.equal(indptr, before_ptr), step
        assert rec.pending() == 0, (step, lens)


def test_no_rows_launches_nothing() -> None:
    rec, tid = _record()
    ids = torch.full((4,), -5, dtype=torch.int64, device=DEV)
    _guard(torch.zeros(1, dtype=torch.int32, device=DEV), ids, rec, tid)
    assert rec.pending() == 0 and int(ids[0]) == -5


# ------------------------------------------------------------------------------------------- bad ids
def test_bad_ids_redirected_and_recorded_with_request_and_offset() -> None:
    lens = [5, 0, 7, 3]
    indptr, ids = _csr(lens, slack=4)
    bad = {(0, 4): ROWS, (2, 0): -1, (2, 6): 10**9, (3, 1): ROWS + 17}
    starts = [0, 5, 5, 12]
    for (row, col), value in bad.items():
        ids[starts[row] + col] = value
    ids[15:] = -3  # past the last offset: dead, never read, never changed
    before = ids.clone()
    rec, tid = _record()
    _guard(indptr, ids, rec, tid)
    d = rec.drain()
    assert d.total == 4
    assert [(e.row, e.column, e.value, e.bound, e.flags, e.table_id) for e in d.entries] == [
        (row, col, value, ROWS, FLAG_OUT_OF_RANGE, tid) for (row, col), value in sorted(bad.items())]
    expect = before.clone()
    for row, col in bad:
        expect[starts[row] + col] = 0
    assert torch.equal(ids, expect)  # only the bad ids changed, to slot 0


def test_long_rows_split_across_programs_are_all_checked() -> None:
    lens = [5000, 1, 2100]
    indptr, ids = _csr(lens)
    assert splits_for(len(lens), ids.numel()) > 1
    positions = {(0, 0), (0, 1023), (0, 1024), (0, 4999), (1, 0), (2, 2047), (2, 2099)}
    starts = [0, 5000, 5001]
    for row, col in positions:
        ids[starts[row] + col] = ROWS + row
    rec, tid = _record()
    _guard(indptr, ids, rec, tid)
    d = rec.drain()
    assert {(e.row, e.column) for e in d.entries} == positions and d.total == len(positions)
    assert all(int(ids[starts[r] + c]) == 0 for r, c in positions)


def test_capacity_overflow_counted() -> None:
    indptr, ids = _csr([100])
    ids[:] = ROWS + 1
    rec, tid = _record(capacity=8)
    _guard(indptr, ids, rec, tid)
    d = rec.drain()
    assert d.total == 100 and len(d.entries) == 8 and d.dropped == 92
    assert int(ids.abs().sum()) == 0  # every bad id redirected, kept or not


# ------------------------------------------------------------------------------------------ indptr
@pytest.mark.parametrize("fault, column, value", [
    ("start", 0, 2),  # indptr[0] != 0
    ("decreasing", 2, 3),  # request 1 ends before it starts
    ("overrun", 3, 40),  # the last range ends past the ids
])
def test_malformed_indptr_recorded_never_read_past_the_buffer(fault, column, value) -> None:
    indptr, ids = _csr([5, 7, 3])
    backing = torch.full((ids.numel() + 64,), -9, dtype=ids.dtype, device=DEV)  # bad ids just past the view
    backing[: ids.numel()] = ids
    view = backing[: ids.numel()]
    indptr[column] = value
    before_ptr, before = indptr.clone(), backing.clone()
    rec, tid = _record()
    _guard(indptr, view, rec, tid)
    d = rec.drain()
    assert [(e.column, e.value, e.bound, e.flags) for e in d.entries] == [(column, value, 15, FLAG_INDPTR_MALFORMED)]
    assert torch.equal(indptr, before_ptr) and torch.equal(backing, before)  # recorded, not changed, not read past


def test_bad_ids_inside_a_range_are_still_redirected_when_the_next_offset_overruns() -> None:
    indptr, ids = _csr([4, 6])
    indptr[2] = 100
    ids[5] = ROWS
    rec, tid = _record()
    _guard(indptr, ids, rec, tid)
    d = rec.drain()
    assert sorted((e.flags, e.row, e.column) for e in d.entries) == [(FLAG_OUT_OF_RANGE, 1, 1), (FLAG_INDPTR_MALFORMED, 1, 2)]
    assert int(ids[5]) == 0


def test_bad_arguments_refused() -> None:
    rec, tid = _record()
    indptr, ids = _csr([3])
    with pytest.raises(ValueError, match="1-D"):
        guard_ragged_(indptr, ids.view(1, -1), ROWS, rec, tid)
    with pytest.raises(ValueError, match="int32 or int64"):
        guard_ragged_(indptr, ids.float(), ROWS, rec, tid)
    with pytest.raises(ValueError, match="safe_id"):
        guard_ragged_(indptr, ids, ROWS, rec, tid, safe_id=ROWS)
    with pytest.raises(ValueError, match="contiguous"):
        guard_ragged_(indptr, torch.zeros(8, dtype=torch.int64, device=DEV)[::2], ROWS, rec, tid)


# ------------------------------------------------------------------------------------------ violation
def _fake(rows: list[list[int]], name: str = "window_kv_indices", pool: str = "swa") -> GuardRecord:
    rec = GuardRecord(8, "cpu")
    rec.register_table(name, pool, ragged=True)
    for i, r in enumerate(rows):
        rec.entries[i] = torch.tensor(r)
    rec.counter[0] = len(rows)
    return rec


def test_violation_of_a_ragged_table_is_kv_indices_out_of_range() -> None:
    rec = _fake([[0, -1, 2, 9, 4000, 272, FLAG_OUT_OF_RANGE], [0, -1, 0, 1, 3, 15, FLAG_INDPTR_MALFORMED]])
    v = rec.to_violation(rec.drain())
    assert (v.kind, v.table, v.pool, v.row, v.column, v.value, v.bound, v.fatal) == (
        Kind.KV_INDICES_OUT_OF_RANGE, "window_kv_indices", "swa", 2, 9, 4000, 272, True)
    assert "request 2, position 9" in v.summary and "slot 0" in v.summary
    assert v.details["entries_by_flag"] == {"out_of_range": 1, "swa_mismatch": 0, "seqlen_exceeds_table": 0,
                                            "indptr_malformed": 1}


def test_violation_of_offsets_names_the_indptr() -> None:
    rec = _fake([[0, -1, 1, 2, 3, 15, FLAG_INDPTR_MALFORMED]], name="kv_indices", pool="full")
    v = rec.to_violation(rec.drain())
    assert (v.kind, v.table, v.row, v.column, v.value, v.bound) == (Kind.KV_INDPTR_MALFORMED, "kv_indptr", 1, 2, 3, 16)
    assert "kv_indptr" in v.summary and "[2] = 3" in v.summary
