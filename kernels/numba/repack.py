"""GGUF Q4_0 and Q8_0 rows repacked into rows across lanes at load, in parallel: the same result as
`ggml_blocks.Repack`'s numpy path (the file's codes, `int8dot.to_lanes`), which the tests hold it to, at the
speed of a copy.

Input `raw [O, blocks * block bytes] uint8`, the file's rows (O a multiple of `LANE_ROWS`). A Q4_0 block is its
fp16 `d` and 16 bytes of nibbles (byte k: input k low, input k + 16 high); a Q8_0 block its `d` and 32 int8
codes. Output `codes [O * B]` and `scales [O * G]` flat, in the layout of `simd.py`'s "Rows across lanes" with
group 32 and fp16 scales: 16 rows a block of rows, 64-byte chunks of 4 bytes a row (INT4: inputs `8 c + j` low
and `8 c + 4 + j` high; INT8: input `4 c + j`, as `q + 128`), the 16 rows' scales of a group side by side.
"""

from __future__ import annotations

from hetero_moe.kernels.numba.simd import LANE_ROWS
from numba import njit, prange

Q4_0_BYTES = 18
Q8_0_BYTES = 34


@njit(parallel=True, nogil=True, cache=True)
def q4_0_lanes(raw, codes, scales) -> None:
    o, nb = raw.shape[0], raw.shape[1] // Q4_0_BYTES
    row_codes = nb * 16  # code bytes of a row
    for blk in prange(o // LANE_ROWS):
        base, sbase = blk * LANE_ROWS * row_codes, blk * LANE_ROWS * nb
        for r in range(LANE_ROWS):
            row = raw[blk * LANE_ROWS + r]
            for b in range(nb):
                at = b * Q4_0_BYTES
                scales[sbase + b * LANE_ROWS + r] = row[at] | (row[at + 1] << 8)
                for cc in range(4):  # the block's 4 chunks of 8 inputs: 0..15 are low nibbles, 16..31 high
                    chunk = base + (b * 4 + cc) * 4 * LANE_ROWS + 4 * r
                    for j in range(4):
                        k = (cc % 2) * 8 + j
                        lo, hi = row[at + 2 + k], row[at + 2 + k + 4]
                        if cc < 2:
                            codes[chunk + j] = (lo & 15) | ((hi & 15) << 4)
                        else:
                            codes[chunk + j] = (lo >> 4) | (hi & 0xF0)


@njit(parallel=True, nogil=True, cache=True)
def q8_0_lanes(raw, codes, scales) -> None:
    o, nb = raw.shape[0], raw.shape[1] // Q8_0_BYTES
    row_codes = nb * 32
    for blk in prange(o // LANE_ROWS):
        base, sbase = blk * LANE_ROWS * row_codes, blk * LANE_ROWS * nb
        for r in range(LANE_ROWS):
            row = raw[blk * LANE_ROWS + r]
            for b in range(nb):
                at = b * Q8_0_BYTES
                scales[sbase + b * LANE_ROWS + r] = row[at] | (row[at + 1] << 8)
                for cc in range(8):  # chunks of 4 inputs
                    chunk = base + (b * 8 + cc) * 4 * LANE_ROWS + 4 * r
                    for j in range(4):
                        codes[chunk + j] = row[at + 2 + cc * 4 + j] ^ 0x80
