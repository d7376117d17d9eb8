"""BF16 routed-expert kernels: `w [O, I] uint16` (bf16 bits), widened to float32 once per row and
multiplied with every token routed to the expert."""

from __future__ import annotations

import numpy as np
from hetero_moe.kernels.numba.common import dot, silu_mul
from numba import njit, prange


@njit(inline="always", fastmath=True, cache=True)
def decode_row(wrow, bits) -> None:
    """bf16 bits `wrow [I]` -> float32, written through the uint32 scratch `bits`."""
    for i in range(wrow.shape[0]):
        bits[i] = np.uint32(wrow[i]) << np.uint32(16)


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def gate_up(x, pair_token, seg, seg_expert, w13, rows_per_task, h):
    """As the INT4 `gate_up`: `w13 [E, 2I, H]` (gate rows, then up rows)."""
    inter = h.shape[1]
    chunks = (inter + rows_per_task - 1) // rows_per_task
    for task in prange(seg_expert.shape[0] * chunks):
        u, c = task // chunks, task % chunks
        e = seg_expert[u]
        bits = np.empty(w13.shape[2], np.uint32)
        values = bits.view(np.float32)
        ubits = np.empty(w13.shape[2], np.uint32)
        up_values = ubits.view(np.float32)
        for r in range(c * rows_per_task, min((c + 1) * rows_per_task, inter)):
            decode_row(w13[e, r], bits)
            decode_row(w13[e, inter + r], ubits)
            for p in range(seg[u], seg[u + 1]):
                t = pair_token[p]
                gate = dot(values, x[t])
                up = dot(up_values, x[t])
                h[p, r] = silu_mul(gate, up)


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def down(h, seg, seg_expert, w2, rows_per_task, y):
    """As the INT4 `down`: `w2 [E, H, I]`."""
    hidden = y.shape[1]
    chunks = (hidden + rows_per_task - 1) // rows_per_task
    for task in prange(seg_expert.shape[0] * chunks):
        u, c = task // chunks, task % chunks
        e = seg_expert[u]
        bits = np.empty(w2.shape[2], np.uint32)
        values = bits.view(np.float32)
        for r in range(c * rows_per_task, min((c + 1) * rows_per_task, hidden)):
            decode_row(w2[e, r], bits)
            for p in range(seg[u], seg[u + 1]):
                y[p, r] = dot(values, h[p])
