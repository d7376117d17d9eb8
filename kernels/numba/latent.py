"""Absorbed latent attention (DeepSeek's MLA) for decode tokens on the CPU, float32, in Numba: what lies
between the quantized projections (`int8dot.py`), so a decode step's attention is a few kernel calls instead
of dozens of small torch operations.

- `prepare`: per token, the latent's RMSNorm and the rotary key into the cache rows, and the query split
  per head: its nope part in the row order the per-head W_UK kernel takes, its rope part rotated.
- `attend`: per token, one query per head over its cache rows (latent and rope key) -> softmax -> the
  latent as values.

Rotary layouts (`ROPE_*`), `cos` and `sin` holding one value per pair: `ROPE_PAIRS` (DeepSeek-V2: adjacent
pairs rotated in place), `ROPE_PAIRS_TO_HALVES` (DeepSeek-V3 interleaved: adjacent pairs in, the rotated
first elements then the rotated second ones out), `ROPE_HALVES` (the Llama layout: element i pairs with
i + d / 2). Each sum runs in a fixed order, so a token's result does not depend on the tokens batched with
it; the rounding is close to, not the same as, the per-op torch path's.
"""

from __future__ import annotations

import math

import numpy as np
from hetero_moe.kernels.numba.common import dot
from numba import njit, prange

ROPE_PAIRS = 0
ROPE_PAIRS_TO_HALVES = 1
ROPE_HALVES = 2
ROWS_PER_TASK = 64  # cache rows per parallel task of the scores


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


@njit(inline="always", fastmath=True, cache=True)
def _rms_norm(x, w, eps, out) -> None:
    total = np.float32(0.0)
    for i in range(x.shape[0]):
        total += x[i] * x[i]
    inv = np.float32(1.0) / np.sqrt(total / np.float32(x.shape[0]) + np.float32(eps))
    for i in range(x.shape[0]):
        out[i] = w[i] * (x[i] * inv)


@njit(nogil=True, fastmath=True, cache=True)
def rms_norm(x, w, eps):
    """RMSNorm of each row of `x [T, n]` float32 with weight `w [n]` -> `[T, n]`."""
    out = np.empty_like(x)
    for t in range(x.shape[0]):
        _rms_norm(x[t], w, eps, out[t])
    return out


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
        _rms_norm(kv[t, :r], norm_w, eps, latent[row])
        _rotate(kv[t, r:], cos[t], sin[t], layout, pe[row])
        for j in range(heads):
            q_nope[j * t_count + t] = q[t, j * width : j * width + nope]
            _rotate(q[t, j * width + nope : (j + 1) * width], cos[t], sin[t], layout, q_pe[t, j])


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def attend(q_latent, q_pe, latent, pe, rows, seg, scale, out) -> None:
    """Token t of `q_latent [heads * T, r]` (head-major, as W_UK leaves it) and `q_pe [T, heads, rope]` over
    its cache rows `rows[seg[t] : seg[t + 1]]` of `latent [*, r]` and `pe [*, rope]` -> `out [heads * T, r]`
    (head-major, as W_UV takes it). Scores for a block of rows and every head (each row read once), then
    each head's softmax, then the weighted rows, split by columns."""
    t_count, heads = q_pe.shape[0], q_pe.shape[1]
    r = latent.shape[1]
    for t in range(t_count):
        first, length = seg[t], seg[t + 1] - seg[t]
        scores = np.empty((heads, length), np.float32)
        for c in prange((length + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
            for i in range(c * ROWS_PER_TASK, min((c + 1) * ROWS_PER_TASK, length)):
                row = rows[first + i]
                for j in range(heads):
                    s = dot(q_latent[j * t_count + t], latent[row]) + dot(q_pe[t, j], pe[row])
                    scores[j, i] = s * np.float32(scale)
        for j in prange(heads):
            top = scores[j, 0]
            for i in range(1, length):
                top = max(top, scores[j, i])
            total = np.float32(0.0)
            for i in range(length):
                e = np.float32(math.exp(scores[j, i] - top))
                scores[j, i] = e
                total += e
            for i in range(length):
                scores[j, i] /= total
        blocks = (r + 63) // 64
        for b in prange(blocks):
            lo, hi = 64 * b, min(64 * b + 64, r)
            acc = np.zeros((heads, hi - lo), np.float32)
            for i in range(length):
                src = latent[rows[first + i], lo:hi]
                for j in range(heads):
                    p = scores[j, i]
                    for k in range(hi - lo):
                        acc[j, k] += p * src[k]
            for j in range(heads):
                out[j * t_count + t, lo:hi] = acc[j]
