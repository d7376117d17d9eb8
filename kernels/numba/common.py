"""Pieces the per-format kernels share."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(inline="always", fastmath=True, cache=True)
def dot(values, x) -> float:
    """`values [n] · x [n]` in float32, one long loop (it vectorizes)."""
    acc = np.float32(0.0)
    for i in range(values.shape[0]):
        acc += values[i] * x[i]
    return acc


@njit(inline="always", fastmath=True, cache=True)
def silu_mul(gate: float, up: float) -> float:
    return gate / (1.0 + math.exp(-gate)) * up


@njit(inline="always", error_model="numpy", cache=True)
def exp32(x):
    """float32 `e^x` in plain float32 operations, so that a loop of it vectorizes (a call of libm's `exp` does
    not): Cephes' `expf` (x = n ln 2 + r, |r| <= ln 2 / 2, a degree-6 polynomial for e^r, 2^n put into the
    exponent bits), within 2.5e-7 of the true value relative; x is clamped to [-87, 88], where 2^n stays
    normal and finite."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(x * np.float32(1.44269504) + np.float32(0.5))
    r = x - n * np.float32(0.693359375)  # ln 2 in two parts (Cody and Waite)
    r = r - n * np.float32(-2.12194440e-4)
    y = np.float32(1.9875691500e-4)
    y = y * r + np.float32(1.3981999507e-3)
    y = y * r + np.float32(8.3334519073e-3)
    y = y * r + np.float32(4.1665795894e-2)
    y = y * r + np.float32(1.6666665459e-1)
    y = y * r + np.float32(5.0000001201e-1)
    y = y * (r * r) + r + np.float32(1.0)
    return y * np.int32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)


@njit(nogil=True, error_model="numpy", cache=True)
def silu_mul_rows(gate, up, n: int) -> None:
    """`gate[j] = silu(gate[j]) * up[j]` for the first `n` rows of `[>= n, r]` float32 arrays, in float32 with
    `exp32`: the loop vectorizes (with the error model of numpy: no check of a division by zero stops it), a
    quarter of the time of `silu_mul` (Zen 4). The integer kernels' gate and up rows take it."""
    for j in range(n):
        g, u = gate[j], up[j]
        for r in range(g.shape[0]):
            g[r] = g[r] / (np.float32(1.0) + exp32(-g[r])) * u[r]


@njit(nogil=True, cache=True)
def map_experts(index, table):
    """`(table[index], True)` for `index [T, k]` of experts `0 .. len(table) - 1` (`table` int64), or `(empty,
    False)` if one is outside them: the check and the mapping of an op's call in one kernel call, where numpy's
    `min`, `max` and indexing took 16 us after a kernel call (a tiny layer, Zen 3), most of them in cold code."""
    out = np.empty(index.shape, np.int64)
    for t in range(index.shape[0]):
        for j in range(index.shape[1]):
            e = index[t, j]
            if e < 0 or e >= table.shape[0]:
                return np.empty((0, 0), np.int64), False
            out[t, j] = table[e]
    return out, True


@njit(nogil=True, cache=True)
def group_by_expert(index, num_experts: int):
    """`index [T, k]` -> pairs sorted by expert (a counting sort, stable in token order):
    `token [P]`, `slot [P]` (position j in the token's top-k), `seg [U + 1]`, `expert [U]`. An index
    of -1 is no pair (an expert computed elsewhere)."""
    t, k = index.shape
    counts = np.zeros(num_experts + 1, np.int64)
    for i in range(t):
        for j in range(k):
            if index[i, j] < -1 or index[i, j] >= num_experts:
                raise ValueError("expert index out of range")
            if index[i, j] >= 0:
                counts[index[i, j] + 1] += 1
    starts = np.cumsum(counts)  # starts[e] = first pair of expert e
    fill = starts[:-1].copy()
    pairs = starts[num_experts]
    token = np.empty(pairs, np.int64)
    slot = np.empty(pairs, np.int64)
    for i in range(t):
        for j in range(k):
            e = index[i, j]
            if e < 0:
                continue
            token[fill[e]] = i
            slot[fill[e]] = j
            fill[e] += 1
    used = 0
    for e in range(num_experts):
        used += counts[e + 1] > 0
    seg = np.empty(used + 1, np.int64)
    expert = np.empty(used, np.int64)
    u = 0
    for e in range(num_experts):
        if counts[e + 1] > 0:
            seg[u], expert[u] = starts[e], e
            u += 1
    seg[used] = pairs
    return token, slot, seg, expert


PARALLEL_COMBINE = 1 << 16  # outputs of at least this many values are summed in parallel over tokens


@njit(inline="always", fastmath=True, cache=True)
def _combine_token(i: int, y, order, weights, out) -> None:
    """`out[i]` from its pairs `order[i * k : (i + 1) * k]` (-1: no pair), in slot order."""
    k = weights.shape[1]
    out[i] = 0.0
    for j in range(k):
        p = order[i * k + j]
        if p < 0:  # no pair: that expert is computed elsewhere
            continue
        w = weights[i, j]
        for h in range(out.shape[1]):
            out[i, h] += w * y[p, h]


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def _combine_parallel(y, order, weights, out) -> None:
    for i in prange(out.shape[0]):
        _combine_token(i, y, order, weights, out)


@njit(nogil=True, fastmath=True, cache=True)
def combine(y, token, slot, weights, out) -> None:
    """`out[t] = sum over pairs p of token t: weights[t, slot[p]] * y[p]`, summed in top-k order; in parallel
    over tokens from `PARALLEL_COMBINE` values of `out` up (the same bits: each token is summed alone)."""
    k = weights.shape[1]
    order = np.full(out.shape[0] * k, -1, np.int64)  # pair of (token, slot), to sum each token in slot order
    for p in range(token.shape[0]):
        order[token[p] * k + slot[p]] = p
    if out.size >= PARALLEL_COMBINE:
        _combine_parallel(y, order, weights, out)
        return
    for i in range(out.shape[0]):
        _combine_token(i, y, order, weights, out)
