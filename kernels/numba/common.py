"""Pieces the per-format kernels share."""

from __future__ import annotations

import math

import numpy as np
from numba import njit


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


@njit(nogil=True, fastmath=True, cache=True)
def combine(y, token, slot, weights, out) -> None:
    """`out[t] = sum over pairs p of token t: weights[t, slot[p]] * y[p]`, summed in top-k order."""
    out[:] = 0.0
    k = weights.shape[1]
    order = np.full(out.shape[0] * k, -1, np.int64)  # pair of (token, slot), to sum each token in slot order
    for p in range(token.shape[0]):
        order[token[p] * k + slot[p]] = p
    for i in range(out.shape[0]):
        for j in range(k):
            p = order[i * k + j]
            if p < 0:  # no pair: that expert is computed elsewhere
                continue
            w = weights[i, j]
            for h in range(out.shape[1]):
                out[i, h] += w * y[p, h]
