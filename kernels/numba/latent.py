"""Absorbed latent attention (DeepSeek's MLA) for decode tokens on the CPU, float32, in Numba: the small steps
between the quantized projections (`int8dot.py`) in one call instead of dozens of small torch operations.
`prepare`, per token: the latent's RMSNorm and the rotary key into the cache rows, and the query split per
head, its nope part in the row order the per-head W_UK kernel takes, its rope part rotated. (The attention
over the cache stays in torch's GEMMs, which a plain Numba loop was 2x slower than from 512 rows on.)

Rotary layouts (`ROPE_*`), `cos` and `sin` holding one value per pair: `ROPE_PAIRS` (DeepSeek-V2: adjacent
pairs rotated in place), `ROPE_PAIRS_TO_HALVES` (DeepSeek-V3 interleaved: adjacent pairs in, the rotated
first elements then the rotated second ones out), `ROPE_HALVES` (the Llama layout: element i pairs with
i + d / 2). A token's result does not depend on the tokens batched with it; the rounding is close to, not
the same as, the per-op torch path's.
"""

from __future__ import annotations

import numpy as np
from numba import njit

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
