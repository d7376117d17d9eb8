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
