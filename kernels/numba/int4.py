"""INT4 routed-expert kernels.

Layout, per weight matrix `[O, I]` quantized along I in groups of `g` (I zero-padded to `Ip`, a
multiple of g): `packed [O, Ip / 2] uint8` and `scales [O, Ip / g] uint16` (bf16 or fp16 bits).
Symmetric: `w ≈ scale * (q - 8)` with `q` in 0..15. Within group k, byte j holds element `k*g + j`
in its low nibble and element `k*g + g/2 + j` in its high nibble, so both halves read `x`
contiguously. Scales are widened to float32 once per row. Bytes are split in float32 lanes
(`hi = floor(b / 16)`, `lo = b - 16 hi`) and the offset 8 is subtracted once per group through
the group's sum of `x`.
"""

from __future__ import annotations

import numpy as np
from hetero_moe.kernels.numba.common import dot, silu_mul
from numba import njit, prange

SCALE_BF16 = 0
SCALE_FP16 = 1


def fp16_table() -> np.ndarray:
    """float32 value of every fp16 bit pattern, to decode fp16 scales with one lookup."""
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(inline="always", cache=True)
def decode_scales(srow, kind: int, fp16, bits, values) -> None:
    """A row's bf16 or fp16 scale bits -> `values` (the float32 view of the scratch `bits`)."""
    if kind == SCALE_BF16:
        for k in range(srow.shape[0]):
            bits[k] = np.uint32(srow[k]) << np.uint32(16)
    else:
        for k in range(srow.shape[0]):
            values[k] = fp16[srow[k]]


@njit(inline="always", fastmath=True, cache=True)
def dot_row(wrow, scales, x, xsum, half: int) -> float:
    """One packed row times one padded input `x [Ip]` with group sums `xsum [Ip / g]`; `scales` float32."""
    total = np.float32(0.0)
    offset = np.float32(0.0)
    for k in range(scales.shape[0]):
        acc = np.float32(0.0)
        for j in range(half):
            b = np.float32(wrow[k * half + j])
            hi = np.floor(b * np.float32(0.0625))
            lo = b - np.float32(16.0) * hi
            acc += lo * x[2 * k * half + j] + hi * x[2 * k * half + half + j]
        total += scales[k] * acc
        offset += scales[k] * xsum[k]
    return total - np.float32(8.0) * offset


@njit(inline="always", fastmath=True, cache=True)
def decode_row(wrow, scales, half: int, values) -> None:
    """A packed row -> float32 weights `values [Ip]`, for experts that several tokens share: decoded
    once, then one plain dot per token."""
    for k in range(scales.shape[0]):
        s = scales[k]
        for j in range(half):
            b = np.float32(wrow[k * half + j])
            hi = np.floor(b * np.float32(0.0625))
            values[2 * k * half + j] = s * (b - np.float32(16.0) * hi - np.float32(8.0))
            values[2 * k * half + half + j] = s * (hi - np.float32(8.0))


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def gate_up(x, xsum, pair_token, seg, seg_expert, w13, s13, g, kind, fp16, rows_per_task, h):
    """`h[p] = silu(x[t] W_gate[e]^T) * (x[t] W_up[e]^T)` for every pair p = (token t, expert e).

    Pairs are grouped by expert: pairs `seg[u]..seg[u+1]` go to expert `seg_expert[u]`, so each
    weight row is read from memory once for all tokens routed to it. `x [T, Hp]` padded,
    `xsum [T, Hp / g]`, `w13 [E, 2I, Hp / 2]`, `s13 [E, 2I, Hp / g]`, `h [P, I]`.
    """
    inter = h.shape[1]
    chunks = (inter + rows_per_task - 1) // rows_per_task
    for task in prange(seg_expert.shape[0] * chunks):
        u, c = task // chunks, task % chunks
        e = seg_expert[u]
        gbits = np.empty(s13.shape[2], np.uint32)
        ubits = np.empty(s13.shape[2], np.uint32)
        gscale, uscale = gbits.view(np.float32), ubits.view(np.float32)
        shared = seg[u + 1] - seg[u] > 1
        gate_w = np.empty(x.shape[1] if shared else 0, np.float32)
        up_w = np.empty(x.shape[1] if shared else 0, np.float32)
        for r in range(c * rows_per_task, min((c + 1) * rows_per_task, inter)):
            decode_scales(s13[e, r], kind, fp16, gbits, gscale)
            decode_scales(s13[e, inter + r], kind, fp16, ubits, uscale)
            if shared:
                decode_row(w13[e, r], gscale, g // 2, gate_w)
                decode_row(w13[e, inter + r], uscale, g // 2, up_w)
            for p in range(seg[u], seg[u + 1]):
                t = pair_token[p]
                if shared:
                    gate, up = dot(gate_w, x[t]), dot(up_w, x[t])
                else:
                    gate = dot_row(w13[e, r], gscale, x[t], xsum[t], g // 2)
                    up = dot_row(w13[e, inter + r], uscale, x[t], xsum[t], g // 2)
                h[p, r] = silu_mul(gate, up)


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def down(h, hsum, seg, seg_expert, w2, s2, g, kind, fp16, rows_per_task, y):
    """`y[p] = h[p] W_down[e]^T` for every pair, grouped by expert as in `gate_up`.
    `h [P, Ip]` padded, `hsum [P, Ip / g]`, `w2 [E, H, Ip / 2]`, `s2 [E, H, Ip / g]`, `y [P, H]`."""
    hidden = y.shape[1]
    chunks = (hidden + rows_per_task - 1) // rows_per_task
    for task in prange(seg_expert.shape[0] * chunks):
        u, c = task // chunks, task % chunks
        e = seg_expert[u]
        bits = np.empty(s2.shape[2], np.uint32)
        scales = bits.view(np.float32)
        shared = seg[u + 1] - seg[u] > 1
        weights = np.empty(h.shape[1] if shared else 0, np.float32)
        for r in range(c * rows_per_task, min((c + 1) * rows_per_task, hidden)):
            decode_scales(s2[e, r], kind, fp16, bits, scales)
            if shared:
                decode_row(w2[e, r], scales, g // 2, weights)
            for p in range(seg[u], seg[u + 1]):
                y[p, r] = dot(weights, h[p]) if shared else dot_row(w2[e, r], scales, h[p], hsum[p], g // 2)
