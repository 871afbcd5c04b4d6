"""The drain-mode allocator check kernels against their torch references (kvtrap.capture.checks).

One op, kernel + reference: ``release_check_`` must give call mode's verdict (``scan_swa_release``: the
reason by precedence, its first position, page, owner and count) and leave kvtrap's ownership record as
``note_freed`` does; ``slot_check_`` must give ``slot_codes``' verdict and record pairs as ``note_pairs`` does. Random cases with every reason mixed in,
blocks longer than one program step, and the first finding staying in the record until it is read. On CPU the
kernels run in Triton's interpreter; on a GPU on the device.
"""

from __future__ import annotations

import os

import pytest
import torch

from kvtrap.capture import allocator_kernels, checks, page_owners
from kvtrap.capture.deferred import FIELDS

# where CUDA is, the kernels run compiled (conftest turns the interpreter on only without CUDA)
DEVICE = os.environ.get("KVTRAP_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("KVTRAP_TEST_DEVICE=cuda needs a CUDA GPU", allow_module_level=True)

PS = 16


def _record() -> torch.Tensor:
    return torch.zeros(len(FIELDS), dtype=torch.int64, device=DEVICE)


def _stamp(full_bound: int = 2000) -> torch.Tensor:
    return torch.zeros(full_bound + 1, dtype=torch.int64, device=DEVICE)


def _release(pages, owner, freeing, div, rec, seq, stamp=None):
    allocator_kernels.release_check_(pages, owner, freeing, div, _stamp() if stamp is None else stamp, rec, seq)


def _fields(rec: torch.Tensor) -> dict[str, int]:
    return dict(zip(FIELDS, rec.cpu().tolist(), strict=True))


def _owners(swa_pages: int, full_pages: int, gen: torch.Generator, handed: float = 0.7) -> torch.Tensor:
    owner = torch.full((swa_pages + 2,), page_owners.FREE, dtype=torch.int64)
    live = torch.rand(swa_pages + 2, generator=gen) < handed
    owner[live] = torch.randint(0, full_pages, (int(live.sum()),), generator=gen)
    owner[0] = owner[-1] = page_owners.FREE
    return owner.to(DEVICE)


def _reference_release(pages, owner, freeing_pages, full_bound):
    flat, owners, codes = checks.swa_release_codes(pages, owner, freeing_pages, full_bound)
    hits = (codes > 0).nonzero().flatten()
    after = owner.clone()
    rec = page_owners.PageOwners(session=None, page_size=PS, owner=after)
    rec.note_freed(pages)
    return flat, owners, codes, hits, after


@pytest.mark.parametrize("seed", range(12))
def test_release_check_matches_the_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    swa_pages, full_pages = 700, 900
    owner = _owners(swa_pages, full_pages, gen)
    n = [1, 5, 40, 255, 256, 257, 600][seed % 7]
    # distinct pages (positions are then comparable one to one); page 0 and unowned pages mixed in
    pages = torch.randperm(swa_pages + 1, generator=gen)[:n].to(torch.int32 if seed % 2 else torch.int64)
    if seed % 3 == 0:
        pages[n // 2] = 0
    live_full = owner[owner >= 0].cpu()
    freeing = None
    if seed % 4 != 3:  # a call that frees most (not all) of the owners' full pages, as token slots
        keep = torch.rand(live_full.numel(), generator=gen) < 0.9
        full = torch.unique(live_full[keep])
        freeing = (full * PS + torch.randint(0, PS, full.shape, generator=gen)).to(DEVICE)
    pages = pages.to(DEVICE)
    freeing_pages = None if freeing is None else freeing // PS
    *_, after = _reference_release(pages, owner, freeing_pages, full_pages)
    bad = checks.scan_swa_release(pages, owner, freeing_pages, full_pages)  # call mode's verdict

    mine, rec = owner.clone(), _record()
    _release(pages, mine, freeing, PS, rec, seq=7, stamp=_stamp(full_pages))
    got = _fields(rec)
    assert torch.equal(mine, after)  # the record is left as note_freed leaves it
    if bad is None:
        assert got == dict.fromkeys(FIELDS, 0)
        return
    assert got == {
        "count": bad.count, "code": 1 + checks.RELEASE_REASONS.index(bad.reason), "position": bad.position,
        "value": bad.page, "owner": bad.owner, "call": 7,
    }  # fmt: skip


def test_release_check_flags_a_page_twice_in_one_call_and_page_zero() -> None:
    owner = torch.full((12,), page_owners.FREE, dtype=torch.int64, device=DEVICE)
    owner[3], owner[5] = 30, 50
    freeing = torch.tensor([30 * PS, 50 * PS], device=DEVICE)
    pages = torch.tensor([3, 5, 3], device=DEVICE)
    rec = _record()
    _release(pages, owner, freeing, PS, rec, seq=1)
    got = _fields(rec)
    # one of the two 3s is a double free (which one is the device's order of atomics)
    assert (got["count"], got["code"], got["value"]) == (1, 2, 3)
    assert got["position"] in (0, 2)
    assert owner.cpu().tolist() == [page_owners.FREE] * 12

    rec = _record()
    _release(torch.tensor([0], device=DEVICE), owner, None, 1, rec, seq=2)
    assert _fields(rec)["code"] == 1 and _fields(rec)["position"] == 0


def test_release_check_judges_ownership_across_many_freed_pages() -> None:
    """More freed full pages than one inner step (32): membership is found in every step."""
    owner = torch.full((402,), page_owners.FREE, dtype=torch.int64, device=DEVICE)
    pages = torch.arange(1, 401, device=DEVICE)
    owner[1:401] = torch.arange(1000, 1400, device=DEVICE)
    freeing = torch.arange(1000, 1400, device=DEVICE).flip(0)  # full pages (div 1), in another order
    rec = _record()
    _release(pages, owner.clone(), freeing, 1, rec, seq=3)
    assert _fields(rec)["count"] == 0
    rec = _record()
    _release(pages, owner.clone(), freeing[:-1], 1, rec, seq=4)  # 1000 not freed
    assert {k: _fields(rec)[k] for k in ("count", "code", "value", "owner")} == {
        "count": 1, "code": 3, "value": 1, "owner": 1000}  # fmt: skip


def test_first_finding_stays_until_read() -> None:
    owner = torch.full((10,), page_owners.FREE, dtype=torch.int64, device=DEVICE)
    rec = _record()
    _release(torch.tensor([0], device=DEVICE), owner, None, 1, rec, seq=1)
    _release(torch.tensor([4], device=DEVICE), owner, None, 1, rec, seq=2)  # double
    assert (_fields(rec)["call"], _fields(rec)["code"]) == (1, 1)
    rec.zero_()  # what Findings.take does once it has read it
    _release(torch.tensor([4], device=DEVICE), owner, None, 1, rec, seq=3)
    assert (_fields(rec)["call"], _fields(rec)["code"]) == (3, 2)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("note", [True, False])
def test_slot_check_matches_the_reference(seed: int, note: bool) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    full_slots, swa_pages = 4000, 60
    lower, bound = PS, (swa_pages + 1) * PS
    mapping = torch.randint(lower, bound, (full_slots + 1,), generator=gen)
    n = [1, 64, 255, 256, 257, 900, 3, 1000][seed]
    out = torch.randperm(full_slots, generator=gen)[:n]
    if seed % 2:  # corrupt some of this allocation's: below the reserved page, past the pool, negative
        bad_at = out[torch.randint(0, n, (3,), generator=gen)]
        mapping[bad_at] = torch.tensor([1, bound + 5, -3])
    mapping, out = mapping.to(DEVICE), out.to(DEVICE)
    owner = torch.full((swa_pages + 2,), page_owners.FREE, dtype=torch.int64, device=DEVICE)

    slots_ref = mapping[out]
    codes = checks.slot_codes(slots_ref, lower, bound)
    hits = (codes > 0).nonzero().flatten()
    owner_ref = owner.clone()
    page_owners.PageOwners(session=None, page_size=PS, owner=owner_ref).note_pairs(out, slots_ref)

    slots, rec = torch.empty_like(slots_ref), _record()
    allocator_kernels.slot_check_(out, mapping, slots, lower, bound, owner if note else None, PS, rec, seq=9)
    assert torch.equal(slots, slots_ref)
    if note:
        # pairs land in the same places; where two slots share a page the last write wins in both, which for
        # the kernel is the device's order: compare the pages each full page may own instead
        assert torch.equal(owner >= 0, owner_ref >= 0)
        for page in (owner >= 0).nonzero().flatten().tolist():
            peers = (slots_ref // PS == page) & (slots_ref >= 0)
            assert int(owner[page]) in (out[peers] // PS).tolist()
    else:
        assert bool((owner == page_owners.FREE).all())
    got = _fields(rec)
    if hits.numel() == 0:
        assert got == dict.fromkeys(FIELDS, 0)
        return
    first = int(hits[0])
    assert got == {"count": int(hits.numel()), "code": checks.OUT_OF_RANGE, "position": first,
                   "value": int(slots_ref[first]), "owner": -1, "call": 9}  # fmt: skip


def test_release_check_leaves_ids_outside_the_record_alone() -> None:
    """Ids past the SWA pages (the scratch entry and beyond) or negative are not SWA pages kvtrap can judge:
    the reference gives them code 0 and does not touch the record; so must the kernel."""
    owner = torch.full((12,), page_owners.FREE, dtype=torch.int64, device=DEVICE)
    owner[4] = 40
    owner[11] = 99  # the scratch entry holding a stray write must not be read as an owner
    before = owner.clone()
    pages = torch.tensor([11, 17, -2], device=DEVICE)
    flat, owners, codes, hits, after = _reference_release(pages, owner.clone(), None, 100)
    rec = _record()
    _release(pages, owner, None, 1, rec, seq=1)
    assert hits.numel() == 0 and _fields(rec) == dict.fromkeys(FIELDS, 0)
    assert torch.equal(owner, before)


def test_release_check_reports_the_reason_call_mode_reports_when_reasons_mix() -> None:
    """A free with a double free first, then page 0, then a page of another full page: call mode reports the
    reserved page (the reasons' precedence), at its own position, counting only reserved pages; so must drain."""
    owner = torch.full((12,), page_owners.FREE, dtype=torch.int64, device=DEVICE)
    owner[3] = 30
    pages = torch.tensor([5, 0, 3], device=DEVICE)
    freeing_pages = torch.tensor([99], device=DEVICE)
    bad = checks.scan_swa_release(pages, owner, freeing_pages, 200)
    assert bad is not None and (bad.reason, bad.position, bad.count) == ("reserved", 1, 1)
    rec = _record()
    _release(pages, owner.clone(), freeing_pages, 1, rec, seq=5)
    assert {k: _fields(rec)[k] for k in ("count", "code", "position", "value")} == {
        "count": 1, "code": 1, "position": 1, "value": 0}  # fmt: skip


_COMPILE_SM90 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvtrap.capture import allocator_kernels as ak

release = {"pages_ptr": "*i64", "n": "i32", "owner_ptr": "*i64", "owner_numel": "i32", "freeing_ptr": "*i64",
           "n_freeing": "i32", "freeing_div": "i32", "stamp_ptr": "*i64", "stamp_numel": "i32", "rec_ptr": "*i64",
           "seq": "i64", "HAS_FREEING": "constexpr", "BLOCK": "constexpr"}
slot = {"full_ptr": "*i64", "n": "i32", "mapping_ptr": "*i64", "mapping_numel": "i32", "slots_ptr": "*i64",
        "lower": "i32", "bound": "i32", "owner_ptr": "*i64", "owner_numel": "i32", "page_size": "i32",
        "rec_ptr": "*i64", "seq": "i32", "NOTE": "constexpr", "BLOCK": "constexpr"}
cases = [(ak._release_check_kernel, release, {"HAS_FREEING": True, "BLOCK": 256}),
         (ak._release_check_kernel, dict(release, pages_ptr="*i32", seq="i32"), {"HAS_FREEING": False, "BLOCK": 256}),
         (ak._slot_check_kernel, slot, {"NOTE": True, "BLOCK": 256}),
         (ak._slot_check_kernel, dict(slot, full_ptr="*i32", mapping_ptr="*i32", slots_ptr="*i32"),
          {"NOTE": False, "BLOCK": 256})]
for fn, sig, const in cases:
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
    assert "atom" in k.asm["ptx"] or fn is ak._slot_check_kernel, fn.__name__  # the exchange is a real atomic
    print("compiled", fn.__name__)
"""


def test_the_kernels_compile_for_sm90_not_only_in_the_interpreter() -> None:
    """The interpreter runs Python; the compiler is stricter (types of scalar branches, 64-bit atomics, shifts).
    Compile both kernels, int32 and int64 ids, to sm_90 PTX in a child without TRITON_INTERPRET (no GPU needed)."""
    import subprocess
    import sys

    backends = pytest.importorskip("triton.backends")
    if "nvidia" not in getattr(backends, "backends", {}):
        pytest.skip("this Triton has no CUDA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("compiled") == 4
