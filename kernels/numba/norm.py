"""RMSNorm of float32 rows in Numba, and the residual add before it in the same pass: a CPU decode step's
norms in one call each instead of torch's half-dozen small operations. Each row on its own, so a token's
result does not depend on the tokens batched with it; the sum of squares is rounded differently from
torch's (close to, not the same bits)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(inline="always", fastmath=True, cache=True)
def rms_norm_row(x, w, eps, out) -> None:
    """`out = w * x / sqrt(mean(x^2) + eps)` for one row."""
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
        rms_norm_row(x[t], w, eps, out[t])
    return out


@njit(nogil=True, fastmath=True, cache=True)
def add_rms_norm(h, delta, w, eps):
    """The residual stream `h [T, n]` plus `delta [T, n]`, and its RMSNorm with weight `w [n]` -> (sum, normed),
    both new `[T, n]` float32 arrays."""
    total = np.empty_like(h)
    out = np.empty_like(h)
    for t in range(h.shape[0]):
        for i in range(h.shape[1]):
            total[t, i] = h[t, i] + delta[t, i]
        rms_norm_row(total[t], w, eps, out[t])
    return total, out
