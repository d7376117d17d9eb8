"""FP8 (e4m3) routed-expert kernels, the DeepSeek-V3 release format kept as it is.

Layout: `w [O, I] uint8` (e4m3 bits) with float32 `scale [ceil(O / b0), ceil(I / b1)]`, one per
block, edge blocks ragged; `w ≈ fp8(w) * scale`.

A row is widened once to float32 by moving the e4m3 fields into float32 bit positions: sign to bit
31, exponent and mantissa to bits 20..26, plus 120 on the exponent (the bias difference 127 - 7),
which is exact for normal numbers; the 8 subnormal codes (exponent 0, zero among them) are then
fixed up as `2 * (v - 2^-7)`. Exact for every finite e4m3 value (a test checks all 256 codes).
"""

from __future__ import annotations

import numpy as np
from hetero_moe.kernels.numba.common import silu_mul
from numba import njit, prange

TWO_M7 = np.float32(2.0**-7)


@njit(inline="always", fastmath=True, cache=True)
def decode_row(wrow, bits, values) -> None:
    """e4m3 bytes `wrow [I]` -> float32 `values` (the view of the uint32 scratch `bits`)."""
    for i in range(wrow.shape[0]):
        b = np.uint32(wrow[i])
        magnitude = ((b & np.uint32(0x7F)) << np.uint32(20)) + np.uint32(120 << 23)
        bits[i] = ((b & np.uint32(0x80)) << np.uint32(24)) | magnitude
    for i in range(wrow.shape[0]):
        v = values[i]
        values[i] = np.float32(2.0) * (v - np.copysign(TWO_M7, v)) if (wrow[i] & 0x78) == 0 else v


@njit(inline="always", fastmath=True, cache=True)
def dot_row(values, srow, x, b1: int) -> float:
    """A decoded row `values [I]` with its block scales `srow [ceil(I / b1)]` times `x [I]`.
    Full blocks run a fixed-length inner loop (it vectorizes; a `min(...)` bound did not), then the
    ragged last block."""
    n = values.shape[0]
    full = n // b1
    total = np.float32(0.0)
    for k in range(full):
        base = k * b1
        acc = np.float32(0.0)
        for i in range(b1):
            acc += values[base + i] * x[base + i]
        total += srow[k] * acc
    if full < srow.shape[0]:
        acc = np.float32(0.0)
        for i in range(full * b1, n):
            acc += values[i] * x[i]
        total += srow[full] * acc
    return total


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def gate_up(x, pair_token, seg, seg_expert, w13, s13, b0, b1, rows_per_task, h):
    """As the INT4 `gate_up`: `w13 [E, 2, I, H]` (gate, up), `s13 [E, 2, ceil(I/b0), ceil(H/b1)]`."""
    inter = h.shape[1]
    chunks = (inter + rows_per_task - 1) // rows_per_task
    for task in prange(seg_expert.shape[0] * chunks):
        u, c = task // chunks, task % chunks
        e = seg_expert[u]
        gbits = np.empty(w13.shape[3], np.uint32)
        ubits = np.empty(w13.shape[3], np.uint32)
        gate_w, up_w = gbits.view(np.float32), ubits.view(np.float32)
        for r in range(c * rows_per_task, min((c + 1) * rows_per_task, inter)):
            decode_row(w13[e, 0, r], gbits, gate_w)
            decode_row(w13[e, 1, r], ubits, up_w)
            for p in range(seg[u], seg[u + 1]):
                t = pair_token[p]
                gate = dot_row(gate_w, s13[e, 0, r // b0], x[t], b1)
                up = dot_row(up_w, s13[e, 1, r // b0], x[t], b1)
                h[p, r] = silu_mul(gate, up)


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def down(h, seg, seg_expert, w2, s2, b0, b1, rows_per_task, y):
    """As the INT4 `down`: `w2 [E, H, I]`, `s2 [E, ceil(H/b0), ceil(I/b1)]`."""
    hidden = y.shape[1]
    chunks = (hidden + rows_per_task - 1) // rows_per_task
    for task in prange(seg_expert.shape[0] * chunks):
        u, c = task // chunks, task % chunks
        e = seg_expert[u]
        bits = np.empty(w2.shape[2], np.uint32)
        values = bits.view(np.float32)
        for r in range(c * rows_per_task, min((c + 1) * rows_per_task, hidden)):
            decode_row(w2[e, r], bits, values)
            for p in range(seg[u], seg[u + 1]):
                y[p, r] = dot_row(values, s2[e, r // b0], h[p], b1)
