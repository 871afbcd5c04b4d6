"""Launch shapes shared by the row-wise norm kernels."""

from __future__ import annotations

import triton

# Benchmarks set this to sweep warps per row program; None means the heuristic below.
NUM_WARPS_OVERRIDE: int | None = None


def row_config(n: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for one program per row of ``n`` elements.

    The whole row stays in registers (single pass over HBM). About 512 row elements per warp keeps 16
    fp32 values per thread and tensor, so the three-to-four live row tensors of the widest kernel (triple
    norm at n = 2816 -> 4096) stay well under the register limit; more warps per row also means more
    loads in flight per program, which is what single-row (decode) latency needs.
    """
    block_n = triton.next_power_of_2(n)
    num_warps = max(1, min(16, block_n // 512))
    return block_n, NUM_WARPS_OVERRIDE or num_warps
