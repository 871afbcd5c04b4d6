"""SGLang's in-graph trtllm_mha metadata build with the device guard folded into the same launch.

Why: the separate guard (:mod:`kvtrap.capture.guard.kernel`) is a second kernel per page table that re-reads
the table SGLang's builder has just written; under CUDA-graph replay that costs one launch plus one
global-memory round trip (1.2-1.9 us on an H200, 2-3.5x an empty kernel). The builder already holds
every page id in registers when it writes it, so checking there costs a few compares and no launch.

Contract: :func:`update_metadata_guarded_` takes exactly the keyword arguments of SGLang 0.5.23's
``sglang.kernels.ops.attention.trtllm_mha_graph_metadata.update_trtllm_mha_graph_metadata`` and
writes the same outputs (``cache_seqlens``, ``cu_seqlens_k``, optional ``cu_seqlens_q`` in its two
modes, the live prefix of ``page_table`` / ``swa_page_table``, ``swa_out_cache_loc`` with its zero
tail), bit for bit on valid inputs: the arithmetic is the same (same dtypes, same ``//``, same
int32 narrowing). The design of one program per batch row, one program for the prefix sums and
the rest for the ``swa_out_cache_loc`` tiles follows SGLang's kernel (credit: SGLang's
``update_trtllm_mha_graph_metadata_kernel``); the code here is kvtrap's own.

In the same pass, per live page id (the prefix ``min(cdiv(cache_seqlen, page_size), width)``), it
does what :func:`kvtrap.capture.guard.kernel.guard_page_table_` would do on the finished tables, in the
order kvtrap's hook ran it (full table first, then the SWA table against the *redirected* full
table), so the record holds the same entries (same layout, same flags):

* full entry outside ``[0, full_bound)``: flag 1, written as ``safe_page``;
* SWA entry outside ``[0, swa_bound)``: flag 1, written as ``safe_page``; SWA entry different from
  ``mapping[full_entry * page_size] // page_size`` (``-1`` for a negative slot): flag 2, kept;
* ``cdiv(cache_seqlen, page_size)`` larger than the table width: flag 4, once per row and table.

One deliberate difference on *invalid* inputs: SGLang's builder looks a token up in the full->SWA
mapping without an upper bound, so a corrupted ``req_to_token`` slot past the mapping reads out of
bounds inside SGLang's own kernel. Here the lookup is bounded and such a slot yields SWA page ``-1``
(recorded and redirected like any other bad entry). Valid tokens are always inside the mapping, so
this changes nothing on valid inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import triton
import triton.language as tl

from kvtrap.capture.guard.kernel import (
    F_OUT_OF_RANGE,
    F_SWA_MISMATCH,
    _append_entries,
    _append_overflow,
)

if TYPE_CHECKING:
    import torch

    from kvtrap.capture.guard.record import GuardRecord

# cu_seqlens_q modes of SGLang 0.5.23's builder (its Q_MODE_* constants; same values so callers can
# pass SGLang's own constants through unchanged)
Q_MODE_NONE = 0  # cu_seqlens_q preset by the caller
Q_MODE_CUMSUM = 1  # cu_seqlens_q[1:] = cumsum(qlens)
Q_MODE_STRIDED = 2  # cu_seqlens_q[1:] = (i + 1) * q_stride

# swa_out_cache_loc tile width: SGLang's (its PAGE_BLOCK), so those programs are the same as its.
_BLOCK = 512
# Page-table columns per loop step: at most this many (wider rows loop, checking once per row).
_MAX_ROW_BLOCK = 1024


def _row_config(width: int) -> tuple[int, int]:
    """(columns per loop step, warps) for a table ``width`` pages wide.

    One step covers the whole row up to 1024 columns (SGLang's builder steps 512 at a time), with
    warps scaled to the step: wide rows are the worst case of the in-graph build, and one step per row
    keeps their extra cost lowest (the comparison of launch shapes is ``benchmarks/guard_bench.py
    --sections variants``, which swaps this function).
    """
    row_block = min(max(triton.next_power_of_2(int(width)), 64), _MAX_ROW_BLOCK)
    num_warps = 2 if row_block <= 128 else 4 if row_block <= 512 else 8
    return row_block, num_warps


@triton.jit
def _check_full(src, cols, m, full_bound, PAGE_SIZE: tl.constexpr, SAFE_PAGE: tl.constexpr, DT: tl.constexpr):
    """One block of the full table: the token, the page SGLang stores, its check and the value written."""
    tok = tl.load(src + cols.to(tl.int64) * PAGE_SIZE, mask=m, other=0)
    # the value SGLang stores (narrowed to the table dtype), then checked as the guard reads it
    page64 = (tok // PAGE_SIZE).to(DT).to(tl.int64)
    oor = m & ((page64 < 0) | (page64 >= full_bound))
    written = tl.where(oor, SAFE_PAGE, page64)
    return tok, page64, oor, written


@triton.jit
def _swa_page(map_ptr, tok, m, map_numel, PAGE_SIZE: tl.constexpr):
    """SGLang's SWA page of a token (int32), with the mapping lookup bounded above as well."""
    tok64 = tok.to(tl.int64)
    # bounded above as well (SGLang's is not): see the module docstring
    in_map = m & (tok64 >= 0) & (tok64 < map_numel)
    slot = tl.load(map_ptr + tok64, mask=in_map, other=-1)
    spage = tl.where(slot < 0, -1, slot // PAGE_SIZE).to(tl.int32)  # SGLang narrows to int32
    return tok64, slot, spage


@triton.jit
def _check_swa(map_ptr, tok64, slot, spage, written, m, map_numel, swa_bound, PAGE_SIZE: tl.constexpr,
               SAFE_PAGE: tl.constexpr, DT: tl.constexpr):
    """The SWA entry as the guard reads it, its flags and the value written."""
    sval = spage.to(DT).to(tl.int64)
    soor = m & ((sval < 0) | (sval >= swa_bound))
    # The separate guard compares with the mapping of the full entry *as written* (after
    # redirection). For a page-aligned token that was not redirected that is the slot already
    # loaded, so the second gather only runs for the other lanes.
    etok = written * PAGE_SIZE
    reuse = etok == tok64
    e_ok = m & (~reuse) & (etok >= 0) & (etok < map_numel)
    eslot = tl.load(map_ptr + etok, mask=e_ok, other=-1)
    mapped = tl.where(reuse, slot, eslot)
    expect = tl.where(mapped < 0, -1, mapped // PAGE_SIZE)
    mis = m & (expect != sval)
    sflags = (tl.where(soor, F_OUT_OF_RANGE, 0) + tl.where(mis, F_SWA_MISMATCH, 0)).to(tl.int64)
    swritten = tl.where(soor, SAFE_PAGE, sval)
    return sval, sflags, swritten


@triton.jit(
    do_not_specialize=[
        "full_bound", "swa_bound", "full_table_id", "swa_table_id", "layer_id", "max_entries", "map_numel",
        "max_seq_pages", "swa_width",  # used as values (.to), which a specialised constexpr 1 cannot do
    ]
)
def _metadata_guard_kernel(
    # SGLang's inputs
    req_pool_indices_ptr,
    seq_lens_ptr,
    req_to_token_ptr,
    map_ptr,  # full->SWA token-slot mapping (HAS_SWA or HAS_SWA_OUT), else any valid pointer
    out_loc_ptr,
    qlens_ptr,
    # SGLang's outputs
    cache_seqlens_ptr,
    cu_k_ptr,
    cu_q_ptr,
    pt_ptr,
    swa_pt_ptr,
    swa_out_ptr,
    # the guard's record
    counter_ptr,
    entries_ptr,
    # SGLang's scalars
    bs,
    seqlen_offset,
    max_seq_pages,
    q_stride,
    num_out_tokens,
    swa_out_len,
    r2t_stride,
    pt_stride,
    swa_stride,
    # the guard's scalars
    full_bound,
    swa_bound,
    full_table_id,
    swa_table_id,
    layer_id,
    max_entries,
    map_numel,
    swa_width,
    PAGE_SIZE: tl.constexpr,
    HAS_SWA: tl.constexpr,
    CHECK_SWA: tl.constexpr,
    HAS_SWA_OUT: tl.constexpr,
    Q_MODE: tl.constexpr,
    BLOCK: tl.constexpr,  # swa_out_cache_loc tile width (SGLang's)
    ROW_BLOCK: tl.constexpr,  # page-table columns per loop step
    BS_BLOCK: tl.constexpr,
    SAFE_PAGE: tl.constexpr,
):
    pid = tl.program_id(0)
    # (names are distinct per branch: Triton needs a name bound in both arms of an if to agree in type)
    if pid < bs:
        row = pid.to(tl.int64)
        # SGLang adds the offset in the seq_lens dtype and narrows the sum to int32: same here
        seqlen = (tl.load(seq_lens_ptr + row) + seqlen_offset).to(tl.int32)
        tl.store(cache_seqlens_ptr + row, seqlen)
        src = req_to_token_ptr + tl.load(req_pool_indices_ptr + row).to(tl.int64) * r2t_stride
        dst = pt_ptr + row * pt_stride
        swa_dst = swa_pt_ptr + row * swa_stride
        PT = pt_ptr.dtype.element_ty
        SPT = swa_pt_ptr.dtype.element_ty
        # pages needed, computed like the separate guard does (int64), so flag 4 fires identically;
        # for any seqlen that fits int32 this equals SGLang's int32 cdiv
        need = (seqlen.to(tl.int64) + PAGE_SIZE - 1) // PAGE_SIZE
        live = tl.minimum(need, max_seq_pages)
        offs = tl.arange(0, ROW_BLOCK)
        # Common path: build, check and write; only a per-lane flag is carried across the steps,
        # and one block-wide reduction per row decides whether anything is to be recorded.
        bad = tl.zeros([ROW_BLOCK], dtype=tl.int32)
        for start in range(0, live, ROW_BLOCK):
            cols = start + offs
            m = cols < live
            tok, page64, oor, written = _check_full(src, cols, m, full_bound, PAGE_SIZE, SAFE_PAGE, PT)
            tl.store(dst + cols, written.to(PT), mask=m)
            bad = bad | oor.to(tl.int32)
            if HAS_SWA:
                tok64, slot, spage = _swa_page(map_ptr, tok, m, map_numel, PAGE_SIZE)
                if CHECK_SWA:
                    sval, sflags, swritten = _check_swa(map_ptr, tok64, slot, spage, written, m, map_numel,
                                                        swa_bound, PAGE_SIZE, SAFE_PAGE, SPT)
                    tl.store(swa_dst + cols, swritten.to(SPT), mask=m)
                    bad = bad | (sflags != 0).to(tl.int32)
                else:
                    tl.store(swa_dst + cols, spage, mask=m)
        if tl.max(bad, axis=0) > 0:
            # Rare path (something is wrong): recompute the row's checks from the unchanged inputs
            # and record, step by step, full entries then SWA ones (the separate guard's order).
            for start2 in range(0, live, ROW_BLOCK):
                cols2 = start2 + offs
                m2 = cols2 < live
                tok2, page2, oor2, written2 = _check_full(src, cols2, m2, full_bound, PAGE_SIZE, SAFE_PAGE, PT)
                _append_entries(counter_ptr, entries_ptr, max_entries, oor2, full_table_id, layer_id, row,
                                cols2, page2, full_bound, oor2.to(tl.int64))
                if CHECK_SWA:
                    stok2, sslot2, spage2 = _swa_page(map_ptr, tok2, m2, map_numel, PAGE_SIZE)
                    sval2, sflags2, sw2 = _check_swa(map_ptr, stok2, sslot2, spage2, written2, m2, map_numel,
                                                     swa_bound, PAGE_SIZE, SAFE_PAGE, SPT)
                    _append_entries(counter_ptr, entries_ptr, max_entries, sflags2 != 0, swa_table_id,
                                    layer_id, row, cols2, sval2, swa_bound, sflags2)
        if need > max_seq_pages:
            _append_overflow(counter_ptr, entries_ptr, max_entries, full_table_id, layer_id, row,
                             max_seq_pages, need)
        if CHECK_SWA:
            if need > swa_width:
                _append_overflow(counter_ptr, entries_ptr, max_entries, swa_table_id, layer_id, row,
                                 swa_width, need)
    elif pid == bs:
        # prefix sums: one program sees the whole batch (bs is the CUDA-graph batch size, <= a few 100)
        i = tl.arange(0, BS_BLOCK)
        in_bs = i < bs
        lens = tl.load(seq_lens_ptr + i, mask=in_bs, other=0).to(tl.int32)
        lens = tl.where(in_bs, lens + seqlen_offset, 0)
        tl.store(cu_k_ptr + 1 + i, tl.cumsum(lens, axis=0), mask=in_bs)
        if Q_MODE == 1:
            ql = tl.where(in_bs, tl.load(qlens_ptr + i, mask=in_bs, other=0).to(tl.int32), 0)
            tl.store(cu_q_ptr + 1 + i, tl.cumsum(ql, axis=0), mask=in_bs)
        if Q_MODE == 2:
            tl.store(cu_q_ptr + 1 + i, ((i + 1) * q_stride).to(tl.int32), mask=in_bs)
    else:
        if HAS_SWA_OUT:
            # SWA write targets: mapping[out_cache_loc] for the real tokens, -1 for a negative
            # location, 0 for the padded tail
            j = (pid - bs - 1) * BLOCK + tl.arange(0, BLOCK)
            in_out = j < swa_out_len
            real = in_out & (j < num_out_tokens)
            loc = tl.load(out_loc_ptr + j, mask=real, other=0)
            val = tl.load(map_ptr + loc, mask=real & (loc >= 0), other=0)
            val = tl.where(real & (loc < 0), -1, val)
            tl.store(swa_out_ptr + j, val, mask=in_out)


@dataclass(frozen=True)
class GuardSpec:
    """What the fused build checks against and where it records (the separate guard's arguments).

    ``swa_bound`` None: an SWA table passed to the builder is written but not checked (kvtrap's hook
    checks the SWA table only when the live pool is an SWA pool). ``swa_mapping``: the mapping the
    SWA entries are compared with (the live pool's ``full_to_swa_index_mapping``); it must be the
    tensor the builder translates with, see :func:`fused_unsupported`.
    """

    record: GuardRecord
    full_bound: int
    full_table_id: int
    swa_bound: int | None = None
    swa_table_id: int = -1
    swa_mapping: torch.Tensor | None = None
    layer_id: int = -1
    safe_page: int = 0


def _same_tensor(a: Any, b: Any) -> bool:
    return a is b or (
        a is not None and b is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape
        and a.stride() == b.stride() and a.dtype == b.dtype
    )


def fused_unsupported(spec: GuardSpec, **kw: Any) -> str | None:
    """Why the fused build cannot stand in for builder + separate guard here (None: it can).

    Each condition is one where the fused kernel could not promise both SGLang's outputs and the
    separate guard's entries; the caller then runs SGLang's builder and the separate guard instead.
    """
    import torch

    pt = kw.get("page_table")
    bs = int(kw["bs"])
    if kw.get("skip_page_table") or pt is None:
        # unified pool: the tables are refreshed outside the graph, the builder writes none
        return "the builder writes no page table (skip_page_table / unified pool)"
    if pt.dim() != 2 or pt.stride(1) != 1 or pt.dtype not in (torch.int32, torch.int64):
        return "page_table is not a 2-D int32/int64 table with contiguous columns"
    if pt.shape[0] != bs:
        # the separate guard checks every row of the table, the builder only the first bs
        return f"page_table has {pt.shape[0]} rows for bs={bs}"
    if int(kw["max_seq_pages"]) != pt.shape[1]:
        # the separate guard checks up to the table width, the builder writes up to max_seq_pages
        return f"max_seq_pages {kw['max_seq_pages']} != page_table width {pt.shape[1]}"
    if kw["cache_seqlens"].shape[0] < bs:
        return "cache_seqlens shorter than bs"
    if not 0 <= spec.safe_page < spec.full_bound:
        return f"safe page {spec.safe_page} outside [0, {spec.full_bound})"
    swa = kw.get("swa_page_table")
    if swa is not None:
        if swa.dim() != 2 or swa.stride(1) != 1 or swa.dtype not in (torch.int32, torch.int64):
            return "swa_page_table is not a 2-D int32/int64 table with contiguous columns"
        if swa.shape[0] != bs or swa.shape[1] < pt.shape[1]:
            return f"swa_page_table shape {tuple(swa.shape)} does not cover page_table {tuple(pt.shape)}"
        if kw.get("swa_mapping") is None:
            return "swa_page_table without swa_mapping"
    if spec.swa_bound is not None:
        if swa is None:
            return "an SWA bound but no swa_page_table"
        if not _same_tensor(spec.swa_mapping, kw.get("swa_mapping")):
            # the guard compares against the live pool's mapping; if the builder translated with
            # another one (drifted backend state) the comparison needs a second, full gather: let the
            # separate guard do it
            return "the builder's swa_mapping is not the live pool's full_to_swa_index_mapping"
        if not 0 <= spec.safe_page < spec.swa_bound:
            return f"safe page {spec.safe_page} outside the SWA pool [0, {spec.swa_bound})"
    return None


def update_metadata_guarded_(
    *,
    spec: GuardSpec,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    req_to_token: torch.Tensor,
    cache_seqlens: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    page_table: torch.Tensor,
    bs: int,
    seqlen_offset: int,
    max_seq_pages: int,
    page_size: int,
    swa_mapping: torch.Tensor | None = None,
    swa_page_table: torch.Tensor | None = None,
    out_cache_loc: torch.Tensor | None = None,
    swa_out_cache_loc: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    qlens: torch.Tensor | None = None,
    q_stride: int = 0,
    q_mode: int = Q_MODE_NONE,
    skip_page_table: bool = False,
) -> None:
    """SGLang's ``update_trtllm_mha_graph_metadata`` plus the guard, in one launch (capturable).

    Same keyword arguments and outputs as SGLang 0.5.23's function, plus ``spec``. Reads no device
    value. Raises ``ValueError`` where :func:`fused_unsupported` says the fused build does not apply
    (callers that want a fallback check that first). The launch shape is :func:`_row_config`'s.
    """
    if bs == 0:
        return
    if q_mode != Q_MODE_NONE and cu_seqlens_q is None or q_mode == Q_MODE_CUMSUM and qlens is None:
        raise ValueError(f"q_mode {q_mode} needs cu_seqlens_q (and qlens for the cumsum mode)")
    kw = dict(
        page_table=page_table, bs=bs, max_seq_pages=max_seq_pages, cache_seqlens=cache_seqlens,
        swa_page_table=swa_page_table, swa_mapping=swa_mapping, skip_page_table=skip_page_table,
    )
    why = fused_unsupported(spec, **kw)
    if why is not None:
        raise ValueError(f"fused metadata build does not apply: {why}")
    has_swa = swa_page_table is not None
    check_swa = spec.swa_bound is not None
    has_swa_out = swa_out_cache_loc is not None
    swa_out_len = int(swa_out_cache_loc.shape[0]) if swa_out_cache_loc is not None else 0
    num_out = min(swa_out_len, int(out_cache_loc.shape[0])) if has_swa_out and out_cache_loc is not None else 0
    # dead pointers (masked loads or compiled-out branches) still need a valid tensor
    out_loc = out_cache_loc if num_out > 0 else (swa_out_cache_loc if has_swa_out else cache_seqlens)
    mapping = swa_mapping if swa_mapping is not None else cache_seqlens
    swa_pt = swa_page_table if swa_page_table is not None else page_table
    swa_out = swa_out_cache_loc if swa_out_cache_loc is not None else cache_seqlens
    tiles = triton.cdiv(swa_out_len, _BLOCK) if has_swa_out else 0
    record = spec.record
    row_block, num_warps = _row_config(max_seq_pages)
    _metadata_guard_kernel[(bs + 1 + tiles,)](
        req_pool_indices, seq_lens, req_to_token, mapping, out_loc,
        qlens if qlens is not None else cache_seqlens,
        cache_seqlens, cu_seqlens_k, cu_seqlens_q if cu_seqlens_q is not None else cu_seqlens_k,
        page_table, swa_pt, swa_out,
        record.counter, record.entries,
        bs, seqlen_offset, max_seq_pages, q_stride, num_out, swa_out_len,
        req_to_token.stride(0), page_table.stride(0), swa_pt.stride(0),
        int(spec.full_bound), int(spec.swa_bound) if check_swa else 0,
        int(spec.full_table_id), int(spec.swa_table_id), int(spec.layer_id),
        record.capacity, swa_mapping.numel() if swa_mapping is not None else 0,
        min(swa_pt.shape[1], page_table.shape[1]),
        PAGE_SIZE=int(page_size),
        HAS_SWA=has_swa,
        CHECK_SWA=check_swa,
        HAS_SWA_OUT=has_swa_out,
        Q_MODE=int(q_mode),
        BLOCK=_BLOCK,
        ROW_BLOCK=int(row_block),
        BS_BLOCK=triton.next_power_of_2(bs),
        SAFE_PAGE=int(spec.safe_page),
        num_warps=int(num_warps),
    )


__all__ = [
    "GuardSpec",
    "fused_unsupported",
    "update_metadata_guarded_",
]
