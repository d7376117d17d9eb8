"""Absorbed latent attention (DeepSeek's MLA) for decode tokens on the CPU, float32, in Numba: the small steps
between the quantized projections (`int8dot.py`) in one call instead of dozens of small torch operations.
`prepare`, per token: the latent's RMSNorm and the rotary key into the cache rows, and the query split per
head, its nope part in the row order the per-head W_UK kernel takes, its rope part rotated. `attend`, per
token: the scores of every head against its sequence's cache rows, the softmax, and the latent rows weighted
by it; each thread takes a group of heads and reads each cache row once for all of them, four heads against
four rows at a time (each load serves four multiply-adds).

Rotary layouts (`ROPE_*`), `cos` and `sin` holding one value per pair: `ROPE_PAIRS` (DeepSeek-V2: adjacent
pairs rotated in place), `ROPE_PAIRS_TO_HALVES` (DeepSeek-V3 interleaved: adjacent pairs in, the rotated
first elements then the rotated second ones out), `ROPE_HALVES` (the Llama layout: element i pairs with
i + d / 2). A token's result does not depend on the tokens batched with it; the rounding is close to, not
the same as, the per-op torch path's.
"""

from __future__ import annotations

import numpy as np
from hetero_moe.kernels.numba.norm import rms_norm_row
from numba import njit, prange

ROPE_PAIRS = 0
ROPE_PAIRS_TO_HALVES = 1
ROPE_HALVES = 2


@njit(inline="always", cache=True)
def _rotate(x, cos, sin, layout: int, out) -> None:
    """`x [d]` rotated into `out [d]`; `cos`, `sin` `[d / 2]`."""
    half = cos.shape[0]
    for i in range(half):
        if layout == ROPE_HALVES:
            a, b = x[i], x[half + i]
        else:
            a, b = x[2 * i], x[2 * i + 1]
        first = a * cos[i] - b * sin[i]
        second = b * cos[i] + a * sin[i]
        if layout == ROPE_PAIRS:
            out[2 * i], out[2 * i + 1] = first, second
        else:
            out[i], out[half + i] = first, second


@njit(nogil=True, fastmath=True, cache=True)
def prepare(q, kv, heads, nope, norm_w, eps, cos, sin, layout, latent, pe, new_rows, q_nope, q_pe) -> None:
    """Decode tokens t < T: `q [T, heads * (nope + rope)]` and `kv [T, r + rope]` from the projections;
    `norm_w [r]` and `eps` the latent's RMSNorm; `cos`, `sin` `[T, rope / 2]` at each token's position.
    Writes `latent[new_rows[t]]` (normalised) and `pe[new_rows[t]]` (rotated), `q_nope [heads * T, nope]`
    (head-major: row `j * T + t`) and `q_pe [T, heads, rope]` (rotated)."""
    t_count, r = kv.shape[0], latent.shape[1]
    rope = pe.shape[1]
    width = nope + rope
    for t in range(t_count):
        row = new_rows[t]
        rms_norm_row(kv[t, :r], norm_w, eps, latent[row])
        _rotate(kv[t, r:], cos[t], sin[t], layout, pe[row])
        for j in range(heads):
            q_nope[j * t_count + t] = q[t, j * width : j * width + nope]
            _rotate(q[t, j * width + nope : (j + 1) * width], cos[t], sin[t], layout, q_pe[t, j])


HEADS = 4  # heads `attend` takes at a time: each cache row is loaded once for the four
BLOCK = 4  # cache rows it scores at a time: each head's query is loaded once for the four
WEIGH = 8  # cache rows it adds to the heads' outputs at a time: each output is loaded and stored once for them


@njit(inline="always", fastmath=True, cache=True)
def _dots(cache, r0, r1, r2, r3, q, j):
    """The dot products of heads `j .. j + 3` of `q [h, d]` with the cache rows r0..r3 of `cache [R, d]`, head
    by head: 16 sums, each kept apart (so a head's sums do not depend on the heads beside it)."""
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0.0)
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = np.float32(0.0)
    for c in range(q.shape[1]):
        a0, a1, a2, a3 = cache[r0, c], cache[r1, c], cache[r2, c], cache[r3, c]
        b = q[j, c]
        s00, s01, s02, s03 = s00 + a0 * b, s01 + a1 * b, s02 + a2 * b, s03 + a3 * b
        b = q[j + 1, c]
        s10, s11, s12, s13 = s10 + a0 * b, s11 + a1 * b, s12 + a2 * b, s13 + a3 * b
        b = q[j + 2, c]
        s20, s21, s22, s23 = s20 + a0 * b, s21 + a1 * b, s22 + a2 * b, s23 + a3 * b
        b = q[j + 3, c]
        s30, s31, s32, s33 = s30 + a0 * b, s31 + a1 * b, s32 + a2 * b, s33 + a3 * b
    return (s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)


@njit(inline="always", fastmath=True, cache=True)
def _scores(q_latent, q_pe, latent, pe, rows, i, j, scores) -> None:
    """Heads `j .. j + 3`'s scores against the cache rows `rows[i : i + BLOCK]`."""
    r0, r1, r2, r3 = rows[i], rows[i + 1], rows[i + 2], rows[i + 3]
    a = _dots(latent, r0, r1, r2, r3, q_latent, j)
    b = _dots(pe, r0, r1, r2, r3, q_pe, j)
    for h in range(HEADS):
        for k in range(BLOCK):
            scores[j + h, i + k] = a[BLOCK * h + k] + b[BLOCK * h + k]


@njit(inline="always", fastmath=True, cache=True)
def _weigh(latent, rows, i, j, scores, out) -> None:
    """Adds the cache rows `rows[i : i + WEIGH]`, weighted by their scores, to heads `j .. j + 3` of `out`."""
    r0, r1, r2, r3, r4, r5, r6, r7 = (
        rows[i],
        rows[i + 1],
        rows[i + 2],
        rows[i + 3],
        rows[i + 4],
        rows[i + 5],
        rows[i + 6],
        rows[i + 7],
    )
    p0, p1, p2, p3 = (
        scores[j, i : i + WEIGH],
        scores[j + 1, i : i + WEIGH],
        scores[j + 2, i : i + WEIGH],
        scores[j + 3, i : i + WEIGH],
    )
    a00, a01, a02, a03, a04, a05, a06, a07 = p0[0], p0[1], p0[2], p0[3], p0[4], p0[5], p0[6], p0[7]
    a10, a11, a12, a13, a14, a15, a16, a17 = p1[0], p1[1], p1[2], p1[3], p1[4], p1[5], p1[6], p1[7]
    a20, a21, a22, a23, a24, a25, a26, a27 = p2[0], p2[1], p2[2], p2[3], p2[4], p2[5], p2[6], p2[7]
    a30, a31, a32, a33, a34, a35, a36, a37 = p3[0], p3[1], p3[2], p3[3], p3[4], p3[5], p3[6], p3[7]
    for c in range(latent.shape[1]):
        l0, l1, l2, l3 = latent[r0, c], latent[r1, c], latent[r2, c], latent[r3, c]
        l4, l5, l6, l7 = latent[r4, c], latent[r5, c], latent[r6, c], latent[r7, c]
        out[j, c] += a00 * l0 + a01 * l1 + a02 * l2 + a03 * l3 + a04 * l4 + a05 * l5 + a06 * l6 + a07 * l7
        out[j + 1, c] += a10 * l0 + a11 * l1 + a12 * l2 + a13 * l3 + a14 * l4 + a15 * l5 + a16 * l6 + a17 * l7
        out[j + 2, c] += a20 * l0 + a21 * l1 + a22 * l2 + a23 * l3 + a24 * l4 + a25 * l5 + a26 * l6 + a27 * l7
        out[j + 3, c] += a30 * l0 + a31 * l1 + a32 * l2 + a33 * l3 + a34 * l4 + a35 * l5 + a36 * l6 + a37 * l7


@njit(nogil=True, fastmath=True, cache=True)
def _attend_heads(q_latent, q_pe, latent, pe, rows, length, scaling, first, last, scores, out) -> None:
    """Heads `first .. last - 1` (whole fours) of `attend` over `rows[:length]`; `rows` padded to a multiple of WEIGH
    (repeating its last row), `scores [h, len(rows)]` their scratch."""
    n = rows.shape[0]
    for i in range(0, n, BLOCK):
        for j in range(first, last, HEADS):
            _scores(q_latent, q_pe, latent, pe, rows, i, j, scores)
    for j in range(first, last):
        top = scores[j, 0]
        for i in range(1, length):
            top = max(top, scores[j, i])
        total = np.float32(0.0)
        for i in range(n):
            scores[j, i] = np.exp((scores[j, i] - top) * scaling) if i < length else np.float32(0.0)
            total += scores[j, i]
        inv = np.float32(1.0) / total
        for i in range(n):
            scores[j, i] *= inv
        out[j] = 0.0
    for i in range(0, n, WEIGH):
        for j in range(first, last, HEADS):
            _weigh(latent, rows, i, j, scores, out)


@njit(nogil=True, fastmath=True, parallel=True, cache=True)
def attend(q_latent, q_pe, latent, pe, rows, scaling, groups, out) -> None:
    """One decode token's absorbed attention, float32: `q_latent [h, r]` and `q_pe [h, rope]` (rotated) over
    its sequence's cache rows `rows [L]` of `latent [R, r]` and `pe [R, rope]` -> `out [h, r]`, the latent rows
    weighted by `softmax(scaling * (latent q_latent + pe q_pe))` per head. The heads in `groups` parallel
    groups; a head's result does not depend on how many."""
    heads, length = q_latent.shape[0], rows.shape[0]
    padded = np.empty(-(-length // WEIGH) * WEIGH, np.int64)
    padded[:length] = rows
    padded[length:] = rows[length - 1]
    quads = -(-heads // HEADS)
    if quads * HEADS != heads:  # whole fours of heads: the last one filled with zero queries
        q_latent = _zero_padded(q_latent, quads * HEADS)
        q_pe = _zero_padded(q_pe, quads * HEADS)
    result = out if quads * HEADS == heads else np.empty((quads * HEADS, out.shape[1]), np.float32)
    scores = np.empty((quads * HEADS, padded.shape[0]), np.float32)
    for g in prange(groups):
        first, last = g * quads // groups * HEADS, (g + 1) * quads // groups * HEADS
        _attend_heads(q_latent, q_pe, latent, pe, padded, length, np.float32(scaling), first, last, scores, result)
    if quads * HEADS != heads:
        out[:] = result[:heads]


@njit(nogil=True, cache=True)
def _zero_padded(a, rows):
    """`a [h, d]` with zero rows after it, to `rows` rows."""
    padded = np.zeros((rows, a.shape[1]), a.dtype)
    padded[: a.shape[0]] = a
    return padded
