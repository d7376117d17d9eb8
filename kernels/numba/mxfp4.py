"""MXFP4 routed-expert kernels (gpt-oss): the release's e2m1 codes and e8m0 scales times int8 activations,
integer dot products on the instruction sets of `simd.py`.

Weights, per matrix `[O, I]` (I a multiple of 32; `kernels/mxfp4.py` has the format): `blocks [O, I / 2]
uint8` (the release's `[O, I / 32, 16]` viewed flat; value `2j` of the row in the low nibble of byte `j`,
`2j + 1` in the high one) and `scales [O, I / 32] uint8`, `w = e2m1(code) * 2^(s - 127)`. Nothing is
repacked: the arrays are the checkpoint's bytes. Twice an e2m1 value is an integer `c` in -12..12; a byte
lookup (`vpshufb`, 16 entries) turns each nibble into `c + 12`, an unsigned byte, and the integer lanes
start at `-12 * (sum of the lane's xq)`, as the INT4 kernels do with their offset 8.

Activations (`quantize_activations`), per token and block of 32 inputs: `a = amax / 127` (float32),
`xq = rint(x / a)` clamped to [-127, 127], zero where `a == 0`, laid out per span of 64 weight bytes
(128 inputs): `xq[128 s + b]` is input `128 s + 2 b` (the low nibble of the span's byte `b`) and
`xq[128 s + 64 + b]` input `128 s + 2 b + 1`; `ascale [T, 4 spans]`, `bias [T, 16 spans]` int32. Padded
with zeros to whole spans.

Canonical arithmetic (the same bits from every instruction set): integer lane `i` of span `s` is exactly
`sum (c - 0) * xq` over the 8 values in bytes `4i..4i+3` of the span; `S = 2^(s_k - 128) * a_k` (float32, the
half of `c` folded into the power of two, exact) for the lane's block `k`; `acc[i] = fma(lane, S, acc[i])`,
spans in order from +0; then `simd.py`'s pairwise sum of the 16 accumulators. A scale byte of 255 (NaN in
e8m0, absent from real checkpoints) reads as 2^127.

The experts: `h = clamped_swiglu(x W_gate^T + b_gate, x W_up^T + b_up)` with gate and up rows interleaved
(row `2r` gate r, `2r + 1` up r, as gpt-oss's release stores them), `y = h W_down^T + b_down`.
`clamped_swiglu(g, u) = (min(max(u, -limit), limit) + 1) * g' * sigmoid(alpha * g')`, `g' = min(g, limit)`,
the float32 sums clamped in float32 and the rest computed in float64, rounded once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from hetero_moe.kernels.numba import int8dot
from hetero_moe.kernels.numba.amx import amx_room
from hetero_moe.kernels.numba.int8dot import check, dots, tile
from hetero_moe.kernels.numba.simd import MXFP4, SCALE_E8M0, TILE, Simd
from numba import njit, prange


def activation_shape(in_dim: int) -> tuple[int, int, int]:
    """Columns of (xq, ascale, bias) for inputs of `in_dim` (a multiple of 32)."""
    return int8dot.activation_shape(MXFP4, 32, in_dim)


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`x [T, I]` float32 -> `(xq, ascale, bias)`, layout in the module docstring (`int8dot`'s quantizer)."""
    return int8dot.quantize(x, 32, MXFP4)


@njit(inline="always", cache=True)
def clamped_swiglu(gate, up, alpha, limit):
    """gpt-oss's activation of the float32 sums `gate`, `up` (module docstring); float32."""
    g = min(gate, limit)
    u = min(max(up, -limit), limit)
    g64 = np.float64(g)
    return np.float32((np.float64(u) + 1.0) * (g64 / (1.0 + math.exp(-np.float64(alpha) * g64))))


@njit(parallel=True, nogil=True, cache=True)
def gate_up(simd, xq, ascale, bias, pair_token, seg, seg_expert, w13, s13, b13, alpha, limit, rows_per_task, h):
    """`h[p] = clamped_swiglu(x[t] W_gate[e]^T + b_gate[e], x[t] W_up[e]^T + b_up[e])` for every pair p =
    (token t, expert e), grouped by expert (`pair_token [P]`, `seg [U + 1]`, `seg_expert [U]`, as
    `common.group_by_expert` gives them). `w13 [E, 2I, H / 2]` uint8 and `s13 [E, 2I, H / 32]` uint8, gate and
    up rows interleaved; `b13 [E, 2I]` float32, interleaved alike; `alpha`, `limit` float32; `h [P, I]`
    float32. Tasks are blocks of `rows_per_task` outputs of one expert; tiles of up to 4 pairs share each
    weight load."""
    inter = h.shape[1]
    check(simd, w13, s13, xq, ascale, bias)
    if w13.shape[1] != 2 * inter or b13.shape[1] != 2 * inter or h.shape[0] < pair_token.shape[0]:
        raise ValueError("w13 and b13 must hold 2 * I rows and h one row per pair")
    chunks = (inter + rows_per_task - 1) // rows_per_task
    for task in prange(seg_expert.shape[0] * chunks):
        u, c = task // chunks, task % chunks
        e = seg_expert[u]
        r0, r1 = c * rows_per_task, min((c + 1) * rows_per_task, inter)
        rows = np.empty(TILE, np.int64)
        both = np.empty((TILE, 2 * (r1 - r0)), np.float32)  # gate and up, interleaved
        w, s = w13[e, 2 * r0 : 2 * r1], s13[e, 2 * r0 : 2 * r1]
        room = amx_room(simd, w, seg[u + 1] - seg[u])
        p = seg[u]
        while p < seg[u + 1]:
            n = tile(simd, seg[u + 1] - p)
            for j in range(n):
                rows[j] = pair_token[p + j]
            dots(simd, n, w, s, xq, ascale, bias, rows, both, p > seg[u], room, False)
            for j in range(n):
                for r in range(r1 - r0):
                    g = both[j, 2 * r] + b13[e, 2 * (r0 + r)]
                    up = both[j, 2 * r + 1] + b13[e, 2 * (r0 + r) + 1]
                    h[p + j, r0 + r] = clamped_swiglu(g, up, alpha, limit)
            p += n


# float32 kernels for CPUs without AVX2 (the `float` backend): close to the integer ones, not the same bits.


def scale_table() -> np.ndarray:
    """float32 `2^(s - 127)` of every e8m0 byte (255 as 2^127, as the integer kernels read it)."""
    return np.ldexp(np.float32(1.0), np.minimum(np.arange(256), 254) - 127).astype(np.float32)


VALUES = np.array([v / 2 for v in (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)], np.float32)


@njit(inline="always", fastmath=True, cache=True)
def _float_row(wrow, srow, x, values, table) -> float:
    total = np.float32(0.0)
    for k in range(srow.shape[0]):
        acc = np.float32(0.0)
        for j in range(16):
            byte = wrow[16 * k + j]
            acc += values[byte & 15] * x[32 * k + 2 * j] + values[byte >> 4] * x[32 * k + 2 * j + 1]
        total += table[srow[k]] * acc
    return total


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def float_gate_up(x, pair_token, seg, seg_expert, w13, s13, b13, alpha, limit, values, table, h):
    """`gate_up` in float32: `x [T, H]` float32, the rest as `gate_up`."""
    inter = h.shape[1]
    for task in prange(seg_expert.shape[0] * inter):
        u, r = task // inter, task % inter
        e = seg_expert[u]
        for p in range(seg[u], seg[u + 1]):
            xt = x[pair_token[p]]
            g = _float_row(w13[e, 2 * r], s13[e, 2 * r], xt, values, table) + b13[e, 2 * r]
            up = _float_row(w13[e, 2 * r + 1], s13[e, 2 * r + 1], xt, values, table) + b13[e, 2 * r + 1]
            h[p, r] = clamped_swiglu(g, up, alpha, limit)


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def float_down(h, seg, seg_expert, w2, s2, b2, values, table, y):
    """`down` in float32: `h [P, I]` float32."""
    hidden = y.shape[1]
    for task in prange(seg_expert.shape[0] * hidden):
        u, r = task // hidden, task % hidden
        e = seg_expert[u]
        for p in range(seg[u], seg[u + 1]):
            y[p, r] = _float_row(w2[e, r], s2[e, r], h[p], values, table) + b2[e, r]


@dataclass(frozen=True)
class Kernels:
    """The MXFP4 kernels of one backend. `act` is what `activations` returns; pass it on unchanged:

    - `activations(x [T, I] float32) -> act`
    - `gate_up(act, pair_token, seg, seg_expert, w13, s13, b13, alpha, limit, rows_per_task, h [P, I])`
    - `down(act_h, seg, seg_expert, w2, s2, b2, rows_per_task, y [P, H])`, `act_h = activations(h)`
    """

    isa: str
    activations: Callable[[np.ndarray], tuple]
    gate_up: Callable[..., None]
    down: Callable[..., None]


@functools.cache
def kernels(isa: str) -> Kernels:
    """The kernels of instruction set `isa`: a `simd.CODEGEN` name the caller has checked against the CPU
    (`simd.choose_isa`; the emulated VNNI sets for tests), or `float`. Nothing is compiled here."""
    if isa == "float":
        values, table = VALUES, scale_table()

        def float_gate_up_(act, pair_token, seg, seg_expert, w13, s13, b13, alpha, limit, rows_per_task, h):
            float_gate_up(act, pair_token, seg, seg_expert, w13, s13, b13, alpha, limit, values, table, h)

        def float_down_(act, seg, seg_expert, w2, s2, b2, rows_per_task, y):
            float_down(act, seg, seg_expert, w2, s2, b2, values, table, y)

        return Kernels(isa, lambda x: x, float_gate_up_, float_down_)
    simd = Simd(isa, MXFP4, 32, SCALE_E8M0)

    def activations(x: np.ndarray) -> tuple:
        return quantize_activations(x)

    def gate_up_(act, pair_token, seg, seg_expert, w13, s13, b13, alpha, limit, rows_per_task, h):
        gate_up(simd, *act, pair_token, seg, seg_expert, w13, s13, b13, alpha, limit, rows_per_task, h)

    def down_(act, seg, seg_expert, w2, s2, b2, rows_per_task, y):
        int8dot.down(simd, *act, seg, seg_expert, w2, s2, rows_per_task, int8dot.task_count(), y)  # INT4 spans
        y[: seg[-1]] += b2[np.repeat(seg_expert, np.diff(seg))]  # each pair's expert's bias

    return Kernels(isa, activations, gate_up_, down_)
