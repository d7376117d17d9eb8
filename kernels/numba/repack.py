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
def _to_lanes(raw, codes, scales, nibbles: bool) -> None:
    """Q4_0 (`nibbles`) or Q8_0 rows -> rows across lanes."""
    block_bytes, chunks = (Q4_0_BYTES, 4) if nibbles else (Q8_0_BYTES, 8)  # a block's chunks of 8 or 4 inputs
    o, nb = raw.shape[0], raw.shape[1] // block_bytes
    row_codes = nb * (block_bytes - 2)  # code bytes of a row
    for blk in prange(o // LANE_ROWS):
        base, sbase = blk * LANE_ROWS * row_codes, blk * LANE_ROWS * nb
        for r in range(LANE_ROWS):
            row = raw[blk * LANE_ROWS + r]
            for b in range(nb):
                at = b * block_bytes
                scales[sbase + b * LANE_ROWS + r] = row[at] | (row[at + 1] << 8)
                for cc in range(chunks):
                    chunk = base + (b * chunks + cc) * 4 * LANE_ROWS + 4 * r
                    for j in range(4):
                        if not nibbles:
                            codes[chunk + j] = row[at + 2 + cc * 4 + j] ^ 0x80
                            continue
                        k = (cc % 2) * 8 + j  # inputs 0..15 are low nibbles, 16..31 high
                        lo, hi = row[at + 2 + k], row[at + 2 + k + 4]
                        if cc < 2:
                            codes[chunk + j] = (lo & 15) | ((hi & 15) << 4)
                        else:
                            codes[chunk + j] = (lo >> 4) | (hi & 0xF0)


def q4_0_lanes(raw, codes, scales) -> None:
    _to_lanes(raw, codes, scales, True)


def q8_0_lanes(raw, codes, scales) -> None:
    _to_lanes(raw, codes, scales, False)
