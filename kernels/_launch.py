"""Launch shapes shared by the row-wise norm kernels."""

from __future__ import annotations

import triton

# Benchmarks set this to sweep warps per row program; None means the heuristic below.
NUM_WARPS_OVERRIDE: int | None = None


def row_config(n: int, m: int = 1, wide: bool = False) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for one program per row of ``n`` elements, ``m`` rows.

    The whole row stays in registers (one pass over HBM). Measured on an H200 (benchmarks/results,
    warps sweep of the dense cross-layer and triple kernels): decode sizes (m <= 256) are fastest at
    8 warps for 4096- and 8192-wide blocks (more loads in flight per row); at m = 8192 4 warps win for
    the two-output kernels (97 vs 108-114 us at n = 5376) while the four-output triple norm and the MoE
    cross-layer norm (``wide``: three row inputs or four outputs, four weights) keep 8 at n <= 4096.
    Narrow rows get ~512 elements per warp.
    """
    block_n = triton.next_power_of_2(n)
    if block_n <= 2048:
        num_warps = max(1, block_n // 512)
    elif m <= 256 or (wide and block_n <= 4096):
        num_warps = 8
    else:
        num_warps = 4
    return block_n, NUM_WARPS_OVERRIDE or num_warps
