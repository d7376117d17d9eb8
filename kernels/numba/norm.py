"""RMSNorm of float32 rows in Numba, and the residual add before it in the same pass: a CPU decode step's
norms in one call each instead of torch's half-dozen small operations. Each row on its own, so a token's
result does not depend on the tokens batched with it; the sum of squares is rounded differently from
torch's (close to, not the same bits)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def rms_norm_row(x, w, eps, out) -> None:
    """`out = w * x / sqrt(mean(x^2) + eps)` for one row, in float32 in a fixed order: the squares summed in 8
    partial sums (input i to sum i % 8, the tail to the first), those added pairwise, then IEEE square root and
    division. Without fast math, here and in every kernel that calls it (a caller's fast math reaches the code
    LLVM inlines into it): inlined with fast math into a loop over rows, the first row's bits depended on how many
    rows the loop had (a tiny DeepSeek-V2's batched decode: a latent cache row one ulp off when three tokens
    shared the step, and another token eight steps on)."""
    n = x.shape[0]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
    whole = n - n % 8
    for i in range(0, whole, 8):
        s0 += x[i] * x[i]
        s1 += x[i + 1] * x[i + 1]
        s2 += x[i + 2] * x[i + 2]
        s3 += x[i + 3] * x[i + 3]
        s4 += x[i + 4] * x[i + 4]
        s5 += x[i + 5] * x[i + 5]
        s6 += x[i + 6] * x[i + 6]
        s7 += x[i + 7] * x[i + 7]
    for i in range(whole, n):
        s0 += x[i] * x[i]
    total = ((s0 + s4) + (s1 + s5)) + ((s2 + s6) + (s3 + s7))
    inv = np.float32(1.0) / np.sqrt(total / np.float32(n) + np.float32(eps))
    for i in range(n):
        out[i] = w[i] * (x[i] * inv)


@njit(nogil=True, cache=True)
def rms_norm(x, w, eps):
    """RMSNorm of each row of `x [T, n]` float32 with weight `w [n]` -> `[T, n]`."""
    out = np.empty_like(x)
    for t in range(x.shape[0]):
        rms_norm_row(x[t], w, eps, out[t])
    return out


@njit(nogil=True, cache=True)
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
