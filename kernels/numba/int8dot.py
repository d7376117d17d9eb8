"""Kernels with int8 activations: INT4 and INT8 weights times int8-quantized tokens, integer dot products.

Weights (per row, groups of g = 32, 64 or 128 along the input, zero-padded to `Ip`):

- INT4: `packed [O, Ip / 2] uint8`, the layout of `int4.py` (offset 8).
- INT8: `weights [O, Ip] uint8`, `u = q + 128` with `q` in -127..127 (offset 128).
- Both: `scales [O, Ip / g] uint16`, bf16 or fp16 bits; `w = s * (code - offset)`.

llama.cpp's other block types run in formats of their own, repacked losslessly (`kernels/ggml_blocks.py`):
IQ4NL (INT4's nibbles, each looked up into INT8's byte; fp16 or float32 scales), INT8 with group 16 and
float32 scales (Q6_K), and the affine UINT4 and UINT8 (`w = s * code - m`, INT4's and INT8's layouts,
float32 scales and mins; see `simd.py`).

Activations (`quantize_activations`), per token and block of g inputs: `a = amax / 127` (float32),
`xq = rint(x / a)` clamped to [-127, 127], all zero where `a == 0`. A GGUF file's weights take the tokens as
llama.cpp quantizes them for their block type (`ACTIVATIONS`, `activation_format`), so that the integer sums and
the scales are llama.cpp's own: for Q4_0, Q5_0, Q8_0 and IQ4_NL its Q8_0 blocks, `a` kept rounded to the nearest
fp16 value (`ROUND_FP16`; a scale past fp16's largest, from activations past 8.3 million, stays float32); for the
K-quants and IQ4_XS its Q8_K blocks, `amax` over each 256 inputs for all their groups (`BLOCKS_256`). They are laid
out for the weights' spans (`simd.spans`: 128 inputs for INT4, `max(64, g)` for INT8) and padded with zeros to
whole spans:

- `xq [T, spans * span_elems] int8`. INT8: input order. INT4: the order of the nibbles, so a load of
  weight bytes and one of `xq` line up: within span `s`, `xq[128 s + b]` is the input in the low nibble of
  the span's byte `b` and `xq[128 s + 64 + b]` the one in its high nibble.
  MXFP4 (`mxfp4.py`, group 32, offset 12) alike: its byte `b` holds inputs `128 s + 2 b` and `128 s + 2 b + 1`.
- `ascale [T, spans * groups_per_span] float32`, zero past the last block.
- `bias [T, spans * 16] int32`: `-offset` times the sum of `xq` over each integer lane's inputs, so the
  lanes hold `(code - offset) * xq` exactly (lane definition in `simd.py`).

The dot of a row with a token is `simd.span_dots`: exact integer lanes, then float32 in a fixed order, so
every instruction set gives the same bits, and a token's result does not depend on the tokens tiled
with it. `select_backend` picks the instruction set once and binds the kernels; on a CPU without AVX2
(`float`) it binds float32 kernels (today's `int4.py` ones for INT4) that are close, not bit-identical.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType

import numba
import numpy as np
import torch
from hetero_moe.kernels.numba import int4
from hetero_moe.kernels.numba.amx import AMX_LEAST, AMX_TOKENS, amx_dots, amx_room, many_rows
from hetero_moe.kernels.numba.common import combine, dot, group_by_expert, silu_mul, silu_mul_rows
from hetero_moe.kernels.numba.int4 import SCALE_BF16, SCALE_FP16, decode_scales, fp16_table
from hetero_moe.kernels.numba.quantize import (
    SCALE_KINDS,
    SOURCE_F32,
    SOURCES,
    TINY,
    bf16_bits,
    decoding_table,
    fp16_bits,
    widen_group,
)
from hetero_moe.kernels.numba.simd import (
    AFFINE,
    BLOCK_ROWS,
    INT4,
    INT4_LANES,
    INT8,
    INT8_LANES,
    IQ4_XS,
    IQ4NL,
    LANE_ROWS,
    LANE_TILE,
    LANES,
    LOOKUP,
    MXFP4,
    NIBBLES,
    Q4_0,
    Q4_K,
    Q6_K,
    Q8_0,
    SCALE_F32,
    TILE,
    UINT4,
    UINT8,
    VALID,
    Simd,
    cached_span_dots,
    choose_isa,
    prefetch_bytes,
    quantize_group,
    span_dots,
    spans,
    uses_amx,
)
from numba import njit, prange
from numba.extending import overload

PARALLEL_ELEMENTS = 1 << 16  # activations of at least this many values are quantized in parallel
# How tokens are quantized for a format's weights (`Backend.kernels`): "group", ours, a float32 scale a group of
# the weights; "q8_0" and "q8_k", llama.cpp's for a GGUF file's weights (its Q8_0 blocks for Q4_0, Q5_0, Q8_0 and
# IQ4_NL, its Q8_K blocks for the K-quants and IQ4_XS). Ours differed from llama.cpp's by up to 2^-11 in each
# Q8_0 scale and by a scale a group against one a 256 inputs; as llama.cpp's, a tiny DeepSeek-V3 GGUF with Q4_0
# experts correlates with llama.cpp at 0.99986 at worst over 64 positions (0.974 before), and a V2-Lite-shaped
# Q4_K_M file in our integer kernels at 0.995 (one position was at -0.07).
ACTIVATIONS = ("group", "q8_0", "q8_k")
ROUND_FP16 = 1 << 8  # an activation format's flag: the scales kept rounded to fp16 values (Q8_0's)
BLOCKS_256 = 1 << 9  # the other flag: one scale for the groups of each 256 inputs (Q8_K's)
FP16_MAX = np.float32(65504.0)
FORMAT_BITS = ROUND_FP16 - 1  # an activation format without its flags
TASKS_PER_THREAD = 8  # parallel tasks a thread gets at decode (`_task_rows`)
FORMATS = {
    "int4": INT4,
    "int8": INT8,
    "iq4nl": IQ4NL,
    "uint4": UINT4,
    "uint8": UINT8,
    "q4_0": Q4_0,
    "q8_0": Q8_0,
    "q6_k": Q6_K,
    "q4_k": Q4_K,
    "iq4_xs": IQ4_XS,
    "int4_lanes": INT4_LANES,
    "int8_lanes": INT8_LANES,
}


def activation_shape(fmt: int, g: int, in_dim: int) -> tuple[int, int, int]:
    """Columns of (xq, ascale, bias) for inputs of `in_dim` and weights of format `fmt`, group `g`."""
    span_bytes, span_elems, gps = spans(fmt, g)
    ip = -(-in_dim // g) * g
    if fmt in LANES:
        return ip, ip // g, ip // g
    row_bytes = ip // 2 if fmt in NIBBLES else ip
    n = -(-row_bytes // span_bytes)
    return n * span_elems, n * gps * (2 if fmt in AFFINE else 1), n * 16


@njit(inline="always", cache=True)
def _nibbles(fmt) -> bool:
    return fmt in (INT4, MXFP4, IQ4NL, UINT4)


@njit(inline="always", cache=True)
def _amax(bits, start: int, stop: int, one_bits, one):
    """max |x[start:stop]| of finite float32 inputs, from their bits `bits` (`x.view(np.uint32)`): without the
    sign bit, the larger bits are the larger magnitude, and an integer maximum vectorizes where a float one
    did not. `one_bits` and `one` are a scratch value's uint32 and float32 views."""
    amax = np.uint32(0)
    run = bits[start:stop]  # indices from a range: no wraparound checks
    for i in range(run.shape[0]):
        amax = max(amax, run[i] & np.uint32(0x7FFFFFFF))
    one_bits[0] = amax
    return one[0]


@njit(inline="always", cache=True)
def _round_into(x, start: int, stop: int, a, xq, at: int) -> int:
    """`xq[at + i] = clamp(rint(x[start + i] / a), -127, 127)` for the inputs start..stop-1; their sum (int32: at
    most 128 inputs). Two plain loops over contiguous runs."""
    src, dst = x[start:stop], xq[at : at + stop - start]  # indices from a range: the loops vectorize
    for i in range(src.shape[0]):
        v = np.rint(src[i] / a)
        v = np.float32(-127.0) if v < np.float32(-127.0) else v
        v = np.float32(127.0) if v > np.float32(127.0) else v
        dst[i] = np.int8(np.int32(v))
    total = np.int32(0)
    for i in range(dst.shape[0]):
        total += np.int32(dst[i])
    return total


def activation_format(fmt: int, activations: str = "group") -> int:
    """The format `quantize_activations` takes for weights of format `fmt` and tokens quantized as `activations`
    says (`ACTIVATIONS`): rows of blocks their codes' format, with the flag of llama.cpp's blocks."""
    codes = BLOCK_ROWS.get(fmt, (fmt,))[0]
    return codes | {"group": 0, "q8_0": ROUND_FP16, "q8_k": BLOCKS_256}[activations]


@njit(inline="always", cache=True)
def fp16_value(a):
    """The float32 `a` (finite) rounded to the nearest fp16 value, ties to even (numpy's `astype(float16)`, x86's
    `vcvtps2ph`), as a float32: the 10 mantissa bits of normal values kept; subnormal ones in steps of 2^-24;
    beyond 65504, infinity."""
    m = abs(a)
    if m < np.float32(6.103515625e-05):  # 2^-14, the least normal fp16
        return np.float32(np.rint(a * np.float32(16777216.0)) / np.float32(16777216.0))
    bits = np.array([a], np.float32).view(np.uint32)
    v = bits[0]
    bits[0] = (v + np.uint32(0xFFF) + ((v >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    r = bits.view(np.float32)[0]
    if abs(r) > np.float32(65504.0):
        return np.float32(np.inf) if a > 0 else np.float32(-np.inf)
    return r


def _vector_group(x, start, g, xq, ascale, bias, k, offset) -> bool:
    """`simd.quantize_group` where the arrays are contiguous (-> True), else nothing (-> False). Jitted code only."""
    raise TypeError("_vector_group runs inside jitted code")


@overload(_vector_group, inline="always")
def _vector_group_for(x, start, g, xq, ascale, bias, k, offset):
    if all(getattr(a, "layout", None) == "C" for a in (x, xq, ascale, bias)):

        def vector(x, start, g, xq, ascale, bias, k, offset) -> bool:
            quantize_group(x, start, g, xq, ascale, bias, k, offset)
            return True

        return vector
    return lambda x, start, g, xq, ascale, bias, k, offset: False


@njit(inline="always", cache=True)
def _group_scale(bits, start: int, stop: int, n_in: int, super_blocks: bool, a, one_bits, one):
    """The activation scale of the group `start:stop` of a token's bits: its max / 127, or with `super_blocks` that of
    the 256 inputs the group starts (`a`, the group before's, inside them)."""
    if not super_blocks:
        return _amax(bits, start, stop, one_bits, one) / np.float32(127.0)
    if start % 256 == 0:  # the first group of 256 inputs: the scale of all their groups
        return _amax(bits, start, min(start + 256, n_in), one_bits, one) / np.float32(127.0)
    return a


@njit(nogil=True, cache=True)
def _quantize_lanes(x, g: int, offset: int, half_scales: bool, super_blocks: bool, xq, ascale, bias) -> None:
    """One token `x [I]` quantized for rows across lanes group by group (`_quantize_token`'s bits): `xq` in input
    order, `ascale` a group, `bias[k] = -offset * sum(xq of group k)`; whole groups on vectors (`_vector_group`), a
    ragged last one and the scales of `half_scales` or `super_blocks` (`_quantize_token`) in scalar code; every value
    written. Its own function, not inlined: `gate_up`'s tasks call it too
    (`_fuses`), and a copy in each parallel region doubled their compile time."""
    n_in = x.shape[0]
    bits, one_bits = x.view(np.uint32), np.zeros(1, np.uint32)
    one = one_bits.view(np.float32)
    vectors = not half_scales and not super_blocks and g % 16 == 0
    a = np.float32(0.0)
    for k in range((n_in + g - 1) // g):
        start, stop = k * g, min(k * g + g, n_in)
        if vectors and stop - start == g and _vector_group(x, start, g, xq, ascale, bias, k, offset):
            continue
        a = _group_scale(bits, start, stop, n_in, super_blocks, a, one_bits, one)
        ascale[k] = fp16_value(a) if half_scales and a <= FP16_MAX else a
        if a > 0:
            bias[k] = -offset * _round_into(x, start, stop, a, xq, start)
        else:
            bias[k] = 0
            xq[start:stop] = 0
        xq[stop : start + g] = 0  # a ragged group's padding


@njit(inline="always", cache=True)
def _quantize_token(x, g, fmt, half_scales, super_blocks, xq, ascale, bias) -> None:
    """One token `x [I]` -> `xq`, `ascale`, `bias` (rows, zeroed by the caller); `half_scales`: scales kept as fp16
    values (`ROUND_FP16`), `super_blocks`: a scale a 256 inputs (`BLOCKS_256`). Each group's inputs go to `xq` in
    runs that are contiguous there too (half a group per nibble for the formats of nibbles): a branch per run, not
    per input."""
    n_in = x.shape[0]
    half = g // 2
    span_elems = 128 if _nibbles(fmt) else max(64, g)
    gps = span_elems // g
    affine = fmt in (UINT4, UINT8)
    lanes = fmt in (INT4_LANES, INT8_LANES)
    bits, one_bits = x.view(np.uint32), np.zeros(1, np.uint32)
    one = one_bits.view(np.float32)
    a = np.float32(0.0)
    if lanes:  # input order; the group's bias; every byte written (the arrays are not zeroed)
        _quantize_lanes(x, g, 8 if fmt == INT4_LANES else 128, half_scales, super_blocks, xq, ascale, bias)
        return
    for k in range((n_in + g - 1) // g):
        start, stop = k * g, min(k * g + g, n_in)
        a = _group_scale(bits, start, stop, n_in, super_blocks, a, one_bits, one)
        # the scale kept for the codes rounded with `a`: as fp16 where fp16 holds it (beyond, llama.cpp's overflows)
        kept = fp16_value(a) if half_scales and a <= FP16_MAX else a
        at = (k // gps) * 2 * gps + k % gps if affine else k
        ascale[at] = kept
        if not a > 0:
            continue
        total = 0
        if fmt == MXFP4:  # inputs 2b and 2b + 1 of a span in the low and high nibble of its byte b
            for i in range(start, stop):
                q = min(max(np.rint(x[i] / a), np.float32(-127.0)), np.float32(127.0))
                xq[128 * (i // 128) + 64 * (i % 2) + (i % 128) // 2] = np.int8(q)
                total += np.int64(q)
        elif _nibbles(fmt):  # byte k * half + j holds input j of the group in its low nibble, half + j in its high
            byte = k * half
            for part in range(2):
                lo = start + part * half
                if lo < stop:
                    total += _round_into(x, lo, min(lo + half, stop), a, xq, 128 * (byte // 64) + 64 * part + byte % 64)
        else:
            total = _round_into(x, start, stop, a, xq, start)
        if affine:
            ascale[at + gps] = kept * np.float32(total)
    if lanes:
        return
    offset = 0
    if fmt == INT4:
        offset = 8
    elif fmt == MXFP4:
        offset = LOOKUP[0]
    elif fmt in (INT8, IQ4NL):
        offset = 128
    lanes = np.zeros(16, np.int32)
    for s in range(bias.shape[0] // 16):
        lanes[:] = 0
        for m in range(span_elems // 64):
            base = span_elems * s + 64 * m
            for i in range(64):
                lanes[i // 4] += xq[base + i]
        for lane in range(16):
            bias[16 * s + lane] = -offset * lanes[lane]


@njit(inline="always", cache=True)
def _activation_arrays(x, g, fmt):
    t, n_in = x.shape
    ip = (n_in + g - 1) // g * g
    if fmt in (INT4_LANES, INT8_LANES):  # every value written by `_quantize_token`
        return np.empty((t, ip), np.int8), np.empty((t, ip // g), np.float32), np.empty((t, ip // g), np.int32)
    span_bytes = 64 if _nibbles(fmt) else max(64, g)
    span_elems = 128 if _nibbles(fmt) else max(64, g)
    n = ((ip // 2 if _nibbles(fmt) else ip) + span_bytes - 1) // span_bytes
    xq = np.zeros((t, n * span_elems), np.int8)
    ascale = np.zeros((t, n * span_elems // g * (2 if fmt in (UINT4, UINT8) else 1)), np.float32)
    bias = np.zeros((t, n * 16), np.int32)
    return xq, ascale, bias


@njit(nogil=True, cache=True)
def quantize_activations(x, g, fmt):
    """`x [T, I]` float32 -> `(xq, ascale, bias)` for weights of format `fmt` (a codes' format, with a flag of
    llama.cpp's blocks or not: `activation_format`) and group `g`; shapes in `activation_shape`, layout in the module
    docstring. One thread."""
    half_scales, super_blocks, fmt = (fmt & ROUND_FP16) != 0, (fmt & BLOCKS_256) != 0, fmt & FORMAT_BITS
    xq, ascale, bias = _activation_arrays(x, g, fmt)
    for t in range(x.shape[0]):
        _quantize_token(x[t], g, fmt, half_scales, super_blocks, xq[t], ascale[t], bias[t])
    return xq, ascale, bias


@njit(parallel=True, nogil=True, cache=True)
def quantize_activations_parallel(x, g, fmt):
    """`quantize_activations`, parallel over tokens."""
    half_scales, super_blocks, fmt = (fmt & ROUND_FP16) != 0, (fmt & BLOCKS_256) != 0, fmt & FORMAT_BITS
    xq, ascale, bias = _activation_arrays(x, g, fmt)
    for t in prange(x.shape[0]):
        _quantize_token(x[t], g, fmt, half_scales, super_blocks, xq[t], ascale[t], bias[t])
    return xq, ascale, bias


def quantize(x: np.ndarray, g: int, fmt: int) -> tuple:
    """`quantize_activations`, in parallel over tokens from `PARALLEL_ELEMENTS` values up."""
    return (quantize_activations_parallel if x.size >= PARALLEL_ELEMENTS else quantize_activations)(x, g, fmt)


@njit(inline="always", cache=True)
def tile(simd, n: int) -> int:
    """Tokens the next `dots` call takes, of `n` left: on AMX (`simd.amx`) from `AMX_LEAST` on all of them, in equal
    calls of at most `AMX_TOKENS`; else `simd.tile` (8 or 4), or 4, 2 or 1. No later call of a run takes more."""
    if simd.amx and n >= AMX_LEAST:
        calls = (n + AMX_TOKENS - 1) // AMX_TOKENS
        return (n + calls - 1) // calls
    most = simd.tile
    if n >= most:
        return most
    return 4 if n >= 4 else (2 if n >= 2 else 1)


def dots(simd, n, w, scales, xq, ascale, bias, rows, out, cached, room, laid) -> None:
    """`simd.span_dots` of the `n` (from `tile`) tokens in `rows` with every row of `w`, `cached_span_dots` if
    `cached` (the call before read the same rows); on AMX (`simd.amx`) from `AMX_LEAST` tokens `amx.amx_dots` in
    `room` (`amx.amx_room` of `w`, made once for the calls of the same rows), which holds the tokens laid out as A
    tiles already if `laid` (the call before took the same tokens and room). Jitted code only."""
    raise TypeError("dots runs inside jitted code")


@njit(inline="always", cache=True)
def _few_dots(simd, n, w, scales, xq, ascale, bias, rows, out) -> None:
    """`dots` of 4, 2 or 1 tokens: every format's tiles."""
    if n == TILE:
        span_dots(simd, 4, w, scales, xq, ascale, bias, rows, out)
    elif n == 2:
        span_dots(simd, 2, w, scales, xq, ascale, bias, rows, out)
    else:
        span_dots(simd, 1, w, scales, xq, ascale, bias, rows, out)


@njit(inline="always", cache=True)
def _cached_dots(simd, n, w, scales, xq, ascale, bias, rows, out) -> None:
    """`dots` of 8, 4, 2 or 1 tokens with rows in cache."""
    if n == LANE_TILE:
        cached_span_dots(simd, 8, w, scales, xq, ascale, bias, rows, out)
    elif n == TILE:
        cached_span_dots(simd, 4, w, scales, xq, ascale, bias, rows, out)
    elif n == 2:
        cached_span_dots(simd, 2, w, scales, xq, ascale, bias, rows, out)
    else:
        cached_span_dots(simd, 1, w, scales, xq, ascale, bias, rows, out)


@overload(dots, inline="always")
def _dots(simd, n, w, scales, xq, ascale, bias, rows, out, cached, room, laid):
    """`dots` for the token's format: tiles of 8, and rows in cache their own code, only where rows lie across
    lanes (`LANE_TILE`, `cached_span_dots`); there, on AMX, tiles from `AMX_LEAST` tokens go to `amx.amx_dots`.
    The first tile of a run of calls is the largest (`tile`): on AMX, if any tile is, the first is."""
    if simd.fmt not in LANES:

        def few_dots(simd, n, w, scales, xq, ascale, bias, rows, out, cached, room, laid) -> None:
            _few_dots(simd, n, w, scales, xq, ascale, bias, rows, out)

        return few_dots

    def lane_dots(simd, n, w, scales, xq, ascale, bias, rows, out, cached, room, laid) -> None:
        if cached:
            _cached_dots(simd, n, w, scales, xq, ascale, bias, rows, out)
        elif n == LANE_TILE:
            span_dots(simd, 8, w, scales, xq, ascale, bias, rows, out)
        else:
            _few_dots(simd, n, w, scales, xq, ascale, bias, rows, out)

    if not uses_amx(simd):
        return lane_dots

    def amx_lane_dots(simd, n, w, scales, xq, ascale, bias, rows, out, cached, room, laid) -> None:
        if n >= AMX_LEAST:
            amx_dots(simd, n, room, w, scales, xq, ascale, rows, out, laid)
        elif cached:
            _cached_dots(simd, n, w, scales, xq, ascale, bias, rows, out)
        else:
            _few_dots(simd, n, w, scales, xq, ascale, bias, rows, out)

    return amx_lane_dots


@njit(inline="always", cache=True)
def check(simd, w, scales, xq, ascale, bias) -> None:
    """Weights `w [..., B]` with `scales [..., G]` fit the token's format and the activations."""
    span_bytes, span_elems, gps = simd.span
    row_bytes = w.shape[-1]
    n = (row_bytes + span_bytes - 1) // span_bytes
    lane_bias = 16  # int32 bias lanes a span
    if simd.lanes:  # whole groups, whole blocks of rows, each block one run of memory
        fits = row_bytes % span_bytes == 0 and scales.shape[-1] == n and w.shape[-2] % LANE_ROWS == 0
        fits = fits and w.strides[-2] == row_bytes and scales.strides[-2] == 2 * n
        lane_bias = 1  # one bias a group
    elif simd.block_bytes:  # rows of blocks of 32 inputs, their scales inside
        n = (row_bytes // simd.block_bytes * 32 + span_elems - 1) // span_elems
        fits = row_bytes % simd.block_bytes == 0 and scales.shape == w.shape
    elif simd.affine:  # whole spans of (scales, mins)
        fits = row_bytes % 16 == 0 and scales.shape[-1] == 2 * gps * n
        gps *= 2
    else:
        fits = row_bytes % 16 == 0 and scales.shape[-1] * span_bytes == gps * row_bytes
    if not fits or w.shape[:-1] != scales.shape[:-1]:
        raise ValueError("weights and scales do not fit the backend's format and group size")
    if xq.shape[1] < n * span_elems or ascale.shape[1] < n * gps or bias.shape[1] < n * lane_bias:
        raise ValueError("activations are too short for the weights (quantized for another format or size?)")
    if (
        w.strides[-1] != 1
        or scales.strides[-1] != scales.itemsize
        or xq.strides[1] != 1
        or ascale.strides[1] != 4
        or bias.strides[1] != 4
    ):
        raise ValueError("rows of weights, scales and activations must be contiguous")


def task_count() -> int:
    """Parallel tasks a decode-sized kernel call aims at: `TASKS_PER_THREAD` for each of Numba's threads now."""
    return TASKS_PER_THREAD * numba.get_num_threads()


@njit(inline="always", cache=True)
def _task_rows(rows: int, seg, least: int, tasks: int, tile_tokens: int, many: int) -> int:
    """Rows of one expert a parallel task takes: `least`, or, where no expert has more than `tile_tokens` tokens
    (decode), more, as many as make about `tasks` tasks (`task_count`), in multiples of `least`. Each task
    starts a stream of its own: one token of V2-Lite's INT4 experts took 1.08x the time in tasks of 64 rows that
    it took in tasks of 352 rows or more (Zen 4, 2 threads, from DRAM). With more tokens a task's rows are read
    once a tile, and stay in L2 only while tasks are small: `least` rows, or `many` (`many_rows`) if more."""
    units = seg.shape[0] - 1
    most = 0
    for u in range(units):
        most = max(most, seg[u + 1] - seg[u])
    if units == 0 or most > tile_tokens:
        return max(least, many)
    chunks = max(1, (tasks + units - 1) // units)
    per = (rows + chunks - 1) // chunks
    return max(least, (per + least - 1) // least * least)


@njit(inline="always", cache=True)
def _task_span(simd, task: int, chunks: int, seg, seg_expert, rows_per_task: int, rows: int):
    """(expert, first row, end row, first pair, end pair, tiles of pairs) of task `task`: chunk `task % chunks` of
    `rows_per_task` rows of unit `task // chunks`, for its pairs `seg[u] .. seg[u + 1]`."""
    u, c = task // chunks, task % chunks
    first, end = seg[u], seg[u + 1]
    r0, r1 = c * rows_per_task, min((c + 1) * rows_per_task, rows)
    return seg_expert[u], r0, r1, first, end, (end - first + simd.tile - 1) // simd.tile


@njit(inline="always", cache=True)
def _next_task(task: int, chunks: int, seg_expert, rows_per_task: int, rows: int) -> tuple[int, int, int]:
    """(expert, first row, end row) of the task after `task` (the last task's own): the task the thread running
    `task` runs next, as Numba splits a `prange` into one run of tasks a thread."""
    nxt = min(task + 1, seg_expert.shape[0] * chunks - 1)
    c = nxt % chunks
    return seg_expert[nxt // chunks], c * rows_per_task, min((c + 1) * rows_per_task, rows)


@njit(inline="always", cache=True)
def _prefetch_part(w, i: int, parts: int) -> None:
    """Part `i` of `parts` of the rows `w` (C-contiguous) prefetched into L2. A task of several tiles streams its
    rows from DRAM during its first tile and computes from cache during the others: prefetching the next task's
    rows a part a tile overlaps the two (V2-Lite INT8 g32 experts at 683 tokens, 2 threads: 0.95x the time). Not on
    AMX, where one call reads a task's rows for all of its tokens, spread across its products (session 23)."""
    prefetch_bytes(w, i * w.nbytes // parts, (i + 1) * w.nbytes // parts)


@njit(parallel=True, nogil=True, cache=True)
def gate_up(
    simd, xq, ascale, bias, pair_token, seg, seg_expert, w1, s1, w3, s3, up_row, rows_per_task, tasks, h, quantized
) -> bool:
    """`h[p] = silu(x[t] W_gate[e]^T) * (x[t] W_up[e]^T)` for every pair p = (token t, expert e), or `h` quantized
    for `down` straight from the tasks (`quantized`, `_fuses`) -> whether it was.

    Pairs are grouped by expert as in `int4.gate_up` (`pair_token [P]`, `seg [U + 1]`, `seg_expert [U]`);
    tiles of up to 4 pairs of an expert share each weight load. `xq, ascale, bias` of the tokens from
    `quantize_activations`; gate rows `w1[e, :I]` uint8 (`[E, R, B]`, B = Hp / 2 for INT4, Hp for INT8) and
    up rows `w3[e, up_row : up_row + I]`, with their scales in `s1`, `s3` (`[E, R, Hp / g]` uint16 bf16 or
    fp16 bits as `simd.kind`); `h [P, I]` float32. One `[E, 2I, B]` array of gate rows then up rows is
    passed twice with `up_row = I`; separate arrays with `up_row = 0`. Tasks are blocks of rows of one expert:
    `rows_per_task` or more (`_task_rows`); a row's result does not depend on them. `quantized`: `(g, fmt, xq,
    ascale, bias)` of `quantize_activations` for `down` (`_fusing_room`; empty arrays: `h` in float32).
    """
    _check_gate_up(simd, xq, ascale, bias, pair_token, w1, s1, w3, s3, up_row, rows_per_task, h)
    rows_per_task = _task_rows(h.shape[1], seg, rows_per_task, tasks, simd.tile, many_rows(simd))
    _check_quantized(quantized, h)
    chunks = (h.shape[1] + rows_per_task - 1) // rows_per_task
    for task in prange(seg_expert.shape[0] * chunks):
        _gate_up_task(simd, xq, ascale, bias, pair_token, seg, seg_expert, w1, s1, w3, s3, up_row, rows_per_task,
                      chunks, task, h, quantized)  # fmt: skip
    return _fuses(quantized, rows_per_task)


@njit(inline="always", cache=True)
def _fuses(quantized, rows_per_task: int) -> bool:
    """Whether `gate_up`'s tasks of `rows_per_task` rows quantize their own columns of `h` into `quantized` (`g, fmt,
    xq, ascale, bias`), the bits `quantize_activations` gives `h`: where the arrays are not empty, `down` takes rows
    across lanes (activations quantized group by group) and tasks hold whole groups. It saves writing `h` in float32
    and reading it back (a V2-Lite INT8 layer at 683 tokens: 0.97-0.98x the time, session 23)."""
    g, fmt, xq, _, _ = quantized
    return xq.shape[0] > 0 and fmt in (INT4_LANES, INT8_LANES) and rows_per_task % g == 0


@njit(inline="always", cache=True)
def _check_quantized(quantized, h) -> None:
    g, _, xq, ascale, bias = quantized
    groups = (h.shape[1] + g - 1) // g
    if xq.shape[0] and (
        xq.shape[0] < h.shape[0] or xq.shape[1] < groups * g or min(ascale.shape[1], bias.shape[1]) < groups
    ):
        raise ValueError("the quantized h must hold every pair's groups")


@njit(inline="always", cache=True)
def _fusing_room(h, g: int, fmt: int):
    """`gate_up`'s `quantized` for `h` and `down`'s group `g`, format `fmt` (`activation_format`): zeroed arrays
    where `_fuses` may fuse, else empty ones (of the same types)."""
    if fmt in (INT4_LANES, INT8_LANES):
        return (g, fmt, *_activation_arrays(h, g, fmt))
    return g, fmt, np.zeros((0, 0), np.int8), np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int32)


@njit(inline="always", cache=True)
def _check_gate_up(simd, xq, ascale, bias, pair_token, w1, s1, w3, s3, up_row, rows_per_task, h) -> None:
    inter = h.shape[1]
    check(simd, w1, s1, xq, ascale, bias)
    check(simd, w3, s3, xq, ascale, bias)
    if w1.shape[1] < inter or w3.shape[1] < up_row + inter or w3.shape[0] != w1.shape[0] or up_row < 0:
        raise ValueError("w1 and w3 must hold the I gate and up rows of every expert")
    if h.shape[0] < pair_token.shape[0]:
        raise ValueError("h must hold one row per pair")
    if simd.lanes and (rows_per_task % LANE_ROWS or up_row % LANE_ROWS or inter % LANE_ROWS):
        raise ValueError("rows across lanes take tasks, up rows and row counts in whole blocks of 16 rows")


@njit(inline="always", cache=True)
def _gate_up_task(simd, xq, ascale, bias, pair_token, seg, seg_expert, w1, s1, w3, s3, up_row, rows_per_task, chunks,
                  task, h, quantized) -> None:  # fmt: skip
    """Task `task` of `gate_up` (`_task_span`): its columns of `h`, or their groups quantized (`_fuses`)."""
    g, fmt, hq, hscale, hbias = quantized
    fused = _fuses(quantized, rows_per_task)
    e, r0, r1, first, end, tiles = _task_span(simd, task, chunks, seg, seg_expert, rows_per_task, h.shape[1])
    most = tile(simd, end - first)
    rows = np.empty(most, np.int64)
    gate = np.empty((most, r1 - r0), np.float32)
    up = np.empty((most, r1 - r0), np.float32)
    e2, q0, q1 = _next_task(task, chunks, seg_expert, rows_per_task, h.shape[1])
    gate_next, up_next = w1[e2, q0:q1], w3[e2, up_row + q0 : up_row + q1]
    gate_rows, up_rows = w1[e, r0:r1], w3[e, up_row + r0 : up_row + r1]
    room = amx_room(simd, gate_rows, end - first)  # the up rows' calls find the tokens laid out by the gate rows'

    i, p = 0, first
    while p < end:
        if tiles > 1 and i < tiles and not simd.amx:  # the next task's rows, a part a tile
            _prefetch_part(gate_next, i, tiles)
            _prefetch_part(up_next, i, tiles)
            i += 1
        n = tile(simd, end - p)
        for j in range(n):
            rows[j] = pair_token[p + j]
        cached = p > first  # the tiles before read these rows
        dots(simd, n, gate_rows, s1[e, r0:r1], xq, ascale, bias, rows, gate, cached, room, False)
        dots(simd, n, up_rows, s3[e, up_row + r0 : up_row + r1], xq, ascale, bias, rows, up, cached, room, True)
        silu_mul_rows(gate, up, n)
        for j in range(n):
            if fused:
                k, offset = r0 // g, 8 if fmt == INT4_LANES else 128
                _quantize_lanes(gate[j], g, offset, False, False, hq[p + j, r0:], hscale[p + j, k:], hbias[p + j, k:])
            else:
                h[p + j, r0:r1] = gate[j]
        p += n


@njit(parallel=True, nogil=True, cache=True)
def down(simd, xq, ascale, bias, seg, seg_expert, w2, s2, rows_per_task, tasks, y):
    """`y[p] = h[p] W_down[e]^T` for every pair, grouped by expert as in `gate_up`; `xq, ascale, bias`
    quantize `h [P, I]` (one row per pair); `w2 [E, H, B]` uint8 (B = Ip / 2 or Ip), `s2 [E, H, Ip / g]`,
    `y [P, H]` float32. A dense layer is one expert every token goes to (`Kernels.linear`)."""
    _check_down(simd, xq, ascale, bias, seg, w2, s2, rows_per_task, y)
    rows_per_task = _task_rows(y.shape[1], seg, rows_per_task, tasks, simd.tile, many_rows(simd))
    chunks = (y.shape[1] + rows_per_task - 1) // rows_per_task
    for task in prange(seg_expert.shape[0] * chunks):
        _down_task(simd, xq, ascale, bias, seg, seg_expert, w2, s2, rows_per_task, chunks, task, y)


@njit(inline="always", cache=True)
def _check_down(simd, xq, ascale, bias, seg, w2, s2, rows_per_task, y) -> None:
    check(simd, w2, s2, xq, ascale, bias)
    if w2.shape[1] != y.shape[1] or xq.shape[0] < seg[-1] or y.shape[0] < seg[-1]:
        raise ValueError("w2 must hold H rows, and h and y one row per pair")
    if simd.lanes and rows_per_task % LANE_ROWS:
        raise ValueError("rows across lanes take tasks in whole blocks of 16 rows")


@njit(inline="always", cache=True)
def _down_task(simd, xq, ascale, bias, seg, seg_expert, w2, s2, rows_per_task, chunks, task, y) -> None:
    """Task `task` of `down` (`_task_span`)."""
    e, r0, r1, first, end, tiles = _task_span(simd, task, chunks, seg, seg_expert, rows_per_task, y.shape[1])
    most = tile(simd, end - first)
    rows = np.empty(most, np.int64)
    out = np.empty((most, r1 - r0), np.float32)
    e2, q0, q1 = _next_task(task, chunks, seg_expert, rows_per_task, y.shape[1])
    down_next, down_rows = w2[e2, q0:q1], w2[e, r0:r1]
    room = amx_room(simd, down_rows, end - first)
    i, p = 0, first
    while p < end:
        if tiles > 1 and i < tiles and not simd.amx:  # the next task's rows, a part a tile
            _prefetch_part(down_next, i, tiles)
            i += 1
        n = tile(simd, end - p)
        for j in range(n):
            rows[j] = p + j
        dots(simd, n, down_rows, s2[e, r0:r1], xq, ascale, bias, rows, out, p > first, room, False)
        for j in range(n):
            y[p + j, r0:r1] = out[j]
        p += n


@njit(inline="always", cache=True)
def _tasks_both(rows_a, seg_a, bytes_a, simd_a, rows_b, seg_b, bytes_b, simd_b, least, tasks) -> tuple:
    """`_task_rows` of two sets of tasks in one region (`gate_up_both`, `down_both`) -> (rows a task of set a
    takes, its chunks of an expert's `rows_a`, the same of set b): `least` rows each (or `many_rows`), or
    where no expert of either has more than its `simd.tile` tokens (decode) tasks of about equal bytes in both sets
    (rows of `bytes_a` and `bytes_b`), about `tasks` in all, in multiples of `least`."""
    tile_a, tile_b = simd_a.tile, simd_b.tile
    most_a = most_b = 0
    for u in range(seg_a.shape[0] - 1):
        most_a = max(most_a, seg_a[u + 1] - seg_a[u])
    for u in range(seg_b.shape[0] - 1):
        most_b = max(most_b, seg_b[u + 1] - seg_b[u])
    a, b = max(least, many_rows(simd_a)), max(least, many_rows(simd_b))
    if most_a <= tile_a and most_b <= tile_b:
        total = (seg_a.shape[0] - 1) * rows_a * bytes_a + (seg_b.shape[0] - 1) * rows_b * bytes_b
        per = max(1, (total + tasks - 1) // tasks)
        a = max(least, ((per + bytes_a - 1) // bytes_a + least - 1) // least * least)
        b = max(least, ((per + bytes_b - 1) // bytes_b + least - 1) // least * least)
    return a, (rows_a + a - 1) // a, b, (rows_b + b - 1) // b


@njit(parallel=True, nogil=True, cache=True)
def gate_up_both(simd, routed, shared_simd, shared, rows_per_task, tasks) -> tuple[bool, bool]:
    """`gate_up` of two sets of pairs in one parallel region, each with its `Simd` token: `routed` and `shared` each
    `gate_up`'s arguments from `xq` to `up_row`, then `h` and `quantized`. Their tasks take about equal bytes
    (`_tasks_both`); a row's result is `gate_up`'s. A MoE block's shared experts run so beside its routed ones. ->
    whether each set's `h` was quantized (`_fuses`)."""
    xq, ascale, bias, pair_token, seg, seg_expert, w1, s1, w3, s3, up_row, h, quantized = routed
    sxq, sascale, sbias, spair_token, sseg, sseg_expert, sw1, ss1, sw3, ss3, sup_row, sh, squantized = shared
    _check_gate_up(simd, xq, ascale, bias, pair_token, w1, s1, w3, s3, up_row, rows_per_task, h)
    _check_gate_up(shared_simd, sxq, sascale, sbias, spair_token, sw1, ss1, sw3, ss3, sup_row, rows_per_task, sh)
    ra, ca, rb, cb = _tasks_both(h.shape[1], seg, w1.shape[2], simd, sh.shape[1], sseg, sw1.shape[2], shared_simd,
                                 rows_per_task, tasks)  # fmt: skip
    _check_quantized(quantized, h)
    _check_quantized(squantized, sh)
    n = seg_expert.shape[0] * ca
    for task in prange(n + sseg_expert.shape[0] * cb):
        if task < n:
            _gate_up_task(simd, xq, ascale, bias, pair_token, seg, seg_expert, w1, s1, w3, s3, up_row, ra, ca, task, h,
                          quantized)  # fmt: skip
        else:
            _gate_up_task(shared_simd, sxq, sascale, sbias, spair_token, sseg, sseg_expert, sw1, ss1, sw3, ss3,
                          sup_row, rb, cb, task - n, sh, squantized)  # fmt: skip
    return _fuses(quantized, ra), _fuses(squantized, rb)


@njit(parallel=True, nogil=True, cache=True)
def down_both(simd, routed, shared_simd, shared, rows_per_task, tasks) -> None:
    """`down` of two sets of pairs in one parallel region, as `gate_up_both`: `routed` and `shared` each `down`'s
    arguments from `xq` to `s2`, then `y`."""
    xq, ascale, bias, seg, seg_expert, w2, s2, y = routed
    sxq, sascale, sbias, sseg, sseg_expert, sw2, ss2, sy = shared
    _check_down(simd, xq, ascale, bias, seg, w2, s2, rows_per_task, y)
    _check_down(shared_simd, sxq, sascale, sbias, sseg, sw2, ss2, rows_per_task, sy)
    ra, ca, rb, cb = _tasks_both(y.shape[1], seg, w2.shape[2], simd, sy.shape[1], sseg, sw2.shape[2], shared_simd,
                                 rows_per_task, tasks)  # fmt: skip
    n = seg_expert.shape[0] * ca
    for task in prange(n + sseg_expert.shape[0] * cb):
        if task < n:
            _down_task(simd, xq, ascale, bias, seg, seg_expert, w2, s2, ra, ca, task, y)
        else:
            _down_task(shared_simd, sxq, sascale, sbias, sseg, sseg_expert, sw2, ss2, rb, cb, task - n, sy)


@njit(nogil=True, cache=True)
def _quantize_any(x, g, fmt):
    """`quantize` inside jitted code."""
    if x.size >= PARALLEL_ELEMENTS:
        return quantize_activations_parallel(x, g, fmt)
    return quantize_activations(x, g, fmt)


# The kernels `experts` calls: bound here, as `timed` swaps the module's public names for Python wrappers.
_gate_up, _down, _gate_up_both, _down_both = gate_up, down, gate_up_both, down_both


@njit(nogil=True, cache=True)
def experts(
    simd13,
    simd2,
    g13,
    fmt13,
    g2,
    fmt2,
    x,
    index,
    weights,
    w1,
    s1,
    w3,
    s3,
    up_row,
    inter,
    w2,
    s2,
    rows_per_task,
    tasks,
    out,
    h_rows,
    y_rows,
):
    """A routed experts block in one call, the same calls and bits as one after another: `index [T, k]`
    grouped by expert (`group_by_expert`; -1 is no pair), `x [T, H]` quantized for the gate and up rows
    (group `g13`, codes of format `fmt13`), `gate_up` into `h [P, inter]`, `h` quantized for the down rows
    (`g2`, `fmt2`), `down`, then `out [T, H] = sum_j weights[t, j] * y` (`combine`). Weights as `gate_up`
    and `down` take them, for `w1.shape[0]` experts; `h_rows [>= P, inter]` and `y_rows [>= P, H]` float32 room
    for `h` and `y` (`scratch`). Returns the number of experts used. Decode steps call
    it once a layer: a dozen Python calls between kernels, each slow once streamed weights have evicted
    the interpreter's code and data from the caches, become one."""
    token, slot, seg, expert = group_by_expert(index, w1.shape[0])
    if token.shape[0] == 0:
        out[:] = 0.0
        return 0
    xq, ascale, bias = _quantize_any(x, g13, fmt13)
    if h_rows.shape[0] < token.shape[0] or h_rows.shape[1] != inter or y_rows.shape[1] != out.shape[1]:
        raise ValueError("h_rows and y_rows must be [>= P, inter] and [>= P, H]")
    h = h_rows[: token.shape[0]]
    quantized = _fusing_room(h, g2, fmt2)
    _, _, hq, hscale, hbias = quantized
    if not _gate_up(simd13, xq, ascale, bias, token, seg, expert, w1, s1, w3, s3, up_row, rows_per_task, tasks, h,
                    quantized):  # fmt: skip
        hq, hscale, hbias = _quantize_any(h, g2, fmt2)
    y = y_rows[: token.shape[0]]
    _down(simd2, hq, hscale, hbias, seg, expert, w2, s2, rows_per_task, tasks, y)
    combine(y, token, slot, weights, out)
    return expert.shape[0]


@njit(nogil=True, cache=True)
def quantized_down(simd, g, fmt, x, seg, seg_expert, w2, s2, rows_per_task, tasks, y):
    """`down` of `x [P, I]` float32, quantized first (group `g`, codes of format `fmt`): one call for both, as
    `experts` (dense layers, heads' and attention projections in a decode step)."""
    xq, ascale, bias = _quantize_any(x, g, fmt)
    _down(simd, xq, ascale, bias, seg, seg_expert, w2, s2, rows_per_task, tasks, y)


@njit(nogil=True, cache=True)
def experts_shared(simd13, simd2, routed, shared_simd13, shared_simd2, shared, x, index, weights, tasks, out, h_rows,
                   y_rows):  # fmt: skip
    """`experts` of the routed pairs of `index`, `weights` and of a MoE block's shared experts (one expert every token
    goes to with weight 1), their gate and up rows in one parallel region and their down rows in another
    (`gate_up_both`, `down_both`): `out` = the routed experts' sum + the shared experts', the bits of `experts`
    called for each. `routed`, `shared`: `Kernels.experts_args`' weights (with their `Simd` tokens); `h_rows`,
    `y_rows` room for the routed pairs, as `experts` takes it. Returns the number of routed experts used."""
    g13, fmt13, g2, fmt2, w1, s1, w3, s3, up_row, inter, w2, s2, rows_per_task = routed
    sg13, sfmt13, sg2, sfmt2, sw1, ss1, sw3, ss3, sup_row, sinter, sw2, ss2, _ = shared
    t = x.shape[0]
    token, slot, seg, expert = group_by_expert(index, w1.shape[0])
    stoken, sslot, sseg, sexpert = group_by_expert(np.zeros((t, 1), np.int64), sw1.shape[0])
    if h_rows.shape[0] < token.shape[0] or h_rows.shape[1] != inter or y_rows.shape[1] != out.shape[1]:
        raise ValueError("h_rows and y_rows must be [>= P, inter] and [>= P, H]")
    h, sh = h_rows[: token.shape[0]], np.empty((t, sinter), np.float32)
    xq, ascale, bias = _quantize_any(x, g13, fmt13)
    sxq, sascale, sbias = (xq, ascale, bias) if (sg13, sfmt13) == (g13, fmt13) else _quantize_any(x, sg13, sfmt13)
    quantized, squantized = _fusing_room(h, g2, fmt2), _fusing_room(sh, sg2, sfmt2)
    routed13 = (xq, ascale, bias, token, seg, expert, w1, s1, w3, s3, up_row, h, quantized)
    shared13 = (sxq, sascale, sbias, stoken, sseg, sexpert, sw1, ss1, sw3, ss3, sup_row, sh, squantized)
    fused, sfused = _gate_up_both(simd13, routed13, shared_simd13, shared13, rows_per_task, tasks)
    _, _, hq, hscale, hbias = quantized
    if not fused:
        hq, hscale, hbias = _quantize_any(h, g2, fmt2)
    _, _, shq, shscale, shbias = squantized
    if not sfused:
        shq, shscale, shbias = _quantize_any(sh, sg2, sfmt2)
    y, sy = y_rows[: token.shape[0]], np.empty_like(out)
    routed2, shared2 = (hq, hscale, hbias, seg, expert, w2, s2, y), (shq, shscale, shbias, sseg, sexpert, sw2, ss2, sy)
    _down_both(simd2, routed2, shared_simd2, shared2, rows_per_task, tasks)
    combine(y, token, slot, weights, out)
    shared_out = np.empty_like(out)
    combine(sy, stoken, sslot, np.ones((t, 1), np.float32), shared_out)
    out += shared_out
    return expert.shape[0]


# The kernels the jitted callers below call, bound here for the reason `_gate_up` is.
_experts, _quantized_down = experts, quantized_down

# Jitted code that runs several steps of a layer in one call (`latent.decode`, `moe.block`) takes each quantized
# linear and routed experts block as its `Simd` tokens and one tuple of kernel arguments, bound once at load
# (`Kernels.linear_args`, `Kernels.experts_args`), and runs it with `apply_linear` and `apply_experts`: the same
# kernels and bits as the calls from Python. The tokens go apart from the tuples: Numba types a tuple holding one
# in Python on every call (27-46 us), a tuple of arrays and numbers from a cache (0.3 us).


@njit(inline="always", cache=True)
def apply_linear(simd, args, x, threads: int):
    """`x [E * T, I]` float32 through the linear of `simd`, `args` (`Kernels.linear_args`) -> `[E * T, O]`
    float32: rows `j * T .. (j + 1) * T` through matrix j of its E (one matrix, or one per head, head-major), on
    `threads` threads (`numba.get_num_threads()`, which jitted code cannot cache)."""
    g, fmt, w, s, matrices, rows_per_task = args
    e = matrices.shape[0]
    seg = np.arange(e + 1) * (x.shape[0] // e)
    y = np.empty((x.shape[0], w.shape[1]), np.float32)
    _quantized_down(simd, g, fmt, x, seg, matrices, w, s, rows_per_task, TASKS_PER_THREAD * threads, y)
    return y


@njit(inline="always", cache=True)
def check_matrices(simd, args, x) -> None:
    """`check` of the matrices of `args` (`Kernels.linear_args`) against rows `x [T, I]` as `matrix_rows`
    quantizes them."""
    g, fmt, w, s, _, _ = args
    xq, ascale, bias = quantize_activations(x[:1], g, fmt)
    check(simd, w, s, xq, ascale, bias)


@njit(inline="always", cache=True)
def matrix_rows(simd, args, j: int, x, out) -> None:
    """`out [T, O] = x [T, I]` float32 through matrix j of the linear of `simd`, `args` (`Kernels.linear_args`), on
    the calling thread: the bits of `apply_linear`'s rows of that matrix, for jitted code that runs each head's
    matrix inside a parallel region of its own. Unchecked: `check_matrices` first, outside the region (a check
    that may raise would keep a `prange` serial)."""
    g, fmt, w, s, matrices, _ = args
    xq, ascale, bias = quantize_activations(x, g, fmt)
    e = matrices[j]
    most = tile(simd, x.shape[0])
    rows = np.empty(most, np.int64)
    y = np.empty((most, w.shape[1]), np.float32)
    room = amx_room(simd, w[e], x.shape[0])
    p = 0
    while p < x.shape[0]:
        n = tile(simd, x.shape[0] - p)
        for k in range(n):
            rows[k] = p + k
        dots(simd, n, w[e], s[e], xq, ascale, bias, rows, y, p > 0, room, False)
        for k in range(n):
            out[p + k] = y[k]
        p += n


@njit(inline="always", cache=True)
def apply_experts(simd13, simd2, args, x, index, weights, out, h_rows, y_rows, threads: int) -> int:
    """`experts` of `x [T, H]`, `index` and `weights` `[T, k]` into `out [T, H]` with the weights of `simd13`,
    `simd2`, `args` (`Kernels.experts_args`) and the room `h_rows`, `y_rows` (`scratch`), on `threads` threads ->
    the number of experts used."""
    g13, fmt13, g2, fmt2, w1, s1, w3, s3, up_row, inter, w2, s2, rows_per_task = args
    blocks = (w1, s1, w3, s3, up_row, inter, w2, s2, rows_per_task, TASKS_PER_THREAD * threads, out, h_rows, y_rows)
    return _experts(simd13, simd2, g13, fmt13, g2, fmt2, x, index, weights, *blocks)


# INT8 weights at load time: `kernels/quant.py:quantize_int8`, bit for bit (the rules of `quantize.py`).


@njit(inline="always", cache=True)
def _quantize_group8(bits, values, kind: int, fp16, one_bits, one, out) -> int:
    """One widened group `values [g]` -> `out [g]` bytes `q + 128`; returns the scale's bits."""
    amax = np.uint32(0)
    for j in range(bits.shape[0]):
        amax = max(amax, np.uint32(bits[j] & np.uint32(0x7FFFFFFF)))
    one_bits[0] = amax
    one[0] = one[0] / np.float32(127.0)
    f = np.int64(one_bits[0])
    if kind == SCALE_BF16:
        stored = bf16_bits(f)
        one_bits[0] = np.uint32(stored) << np.uint32(16)
        scale = one[0]
    else:
        stored = fp16_bits(f)
        scale = fp16[stored]
    if scale > 0:
        divisor = max(scale, TINY)
        for j in range(out.shape[0]):
            q = min(max(np.rint(values[j] / divisor), np.float32(-127.0)), np.float32(127.0))
            out[j] = np.uint8(q + np.float32(128.0))
    else:
        for j in range(out.shape[0]):
            out[j] = 128
    return stored


@njit(parallel=True, nogil=True, cache=True)
def quantize_rows8(w, group: int, source: int, kind: int, fp16, weights, scales) -> None:
    """`w [O, I]` bits (as `quantize.quantize_rows` reads them) -> `weights [O, Ip]` uint8 and
    `scales [O, Ip / g]` uint16 bits. One row per task."""
    for r in prange(w.shape[0]):
        bits = np.empty(group, np.uint32)
        values = bits.view(np.float32)
        one_bits = np.empty(1, np.uint32)
        one = one_bits.view(np.float32)
        for k in range(scales.shape[1]):
            widen_group(w[r], k * group, source, fp16, bits, values)
            out = weights[r, k * group : (k + 1) * group]
            scales[r, k] = _quantize_group8(bits, values, kind, fp16, one_bits, one, out)


def quantize_int8_fast(w: torch.Tensor, group: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`w [O, I]` (CPU, any float dtype) -> `weights [O, Ip] uint8`, `scales [O, Ip / g]` in `scale_dtype`:
    the bits of `kernels.quant.quantize_int8` for finite `w`."""
    if w.dim() != 2 or w.device.type != "cpu" or not w.is_floating_point():
        raise ValueError(f"expected a 2-D floating-point CPU tensor, got {w.dtype} {tuple(w.shape)} on {w.device}")
    if group <= 0:
        raise ValueError(f"group must be positive, got {group}")
    if scale_dtype not in SCALE_KINDS:
        raise ValueError(f"scale dtype must be torch.bfloat16 or torch.float16, got {scale_dtype}")
    if w.dtype not in SOURCES:
        w = w.float()
    w = w.detach().contiguous()
    source = SOURCES[w.dtype]
    bits = w.numpy().view(np.uint32) if source == SOURCE_F32 else w.view(torch.uint16).numpy()
    out_dim, in_dim = w.shape
    groups = -(-in_dim // group)
    weights = torch.empty(out_dim, groups * group, dtype=torch.uint8)
    scales = torch.empty(out_dim, groups, dtype=scale_dtype)
    kind = SCALE_KINDS[scale_dtype]
    quantize_rows8(bits, group, source, kind, decoding_table(), weights.numpy(), scales.view(torch.uint16).numpy())
    return weights, scales


# float32 kernels for CPUs without AVX2 (`float` backend): activations stay float32, zero-padded to Ip.


@njit(nogil=True, cache=True)
def float_activations(x, g):
    """`x [T, I]` -> `(xp [T, Ip], xsum [T, Ip / g])` float32, the inputs of `int4.gate_up` / `int4.down`."""
    t, n_in = x.shape
    ip = (n_in + g - 1) // g * g
    xp = np.zeros((t, ip), np.float32)
    xsum = np.zeros((t, ip // g), np.float32)
    for i in range(t):
        for j in range(n_in):
            xp[i, j] = x[i, j]
        for k in range(ip // g):
            xsum[i, k] = np.sum(xp[i, k * g : (k + 1) * g])
    return xp, xsum


@njit(inline="always", fastmath=True, cache=True)
def _dot_row8(wrow, scales, x, g: int) -> float:
    """One INT8 row `wrow [Ip]` times `x [Ip]`; `scales` float32."""
    total = np.float32(0.0)
    for k in range(scales.shape[0]):
        acc = np.float32(0.0)
        for j in range(k * g, (k + 1) * g):
            acc += (np.float32(wrow[j]) - np.float32(128.0)) * x[j]
        total += scales[k] * acc
    return total


@njit(inline="always", fastmath=True, cache=True)
def _decode_row8(wrow, scales, g: int, values) -> None:
    for k in range(scales.shape[0]):
        for j in range(k * g, (k + 1) * g):
            values[j] = scales[k] * (np.float32(wrow[j]) - np.float32(128.0))


@njit(inline="always", fastmath=True, cache=True)
def _float_row(fmt: int, wrow, scales, g: int, x, xsum) -> float:
    if fmt == INT4:
        return int4.dot_row(wrow, scales, x, xsum, g // 2)
    return _dot_row8(wrow, scales, x, g)


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def float_gate_up8(x, pair_token, seg, seg_expert, w13, s13, g, kind, fp16, rows_per_task, h):
    """`gate_up` for INT8 weights in float32: `x [T, Hp]` from `float_activations`, the rest as `gate_up`."""
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
                _decode_row8(w13[e, r], gscale, g, gate_w)
                _decode_row8(w13[e, inter + r], uscale, g, up_w)
            for p in range(seg[u], seg[u + 1]):
                t = pair_token[p]
                if shared:
                    gate, up = dot(gate_w, x[t]), dot(up_w, x[t])
                else:
                    gate = _dot_row8(w13[e, r], gscale, x[t], g)
                    up = _dot_row8(w13[e, inter + r], uscale, x[t], g)
                h[p, r] = silu_mul(gate, up)


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def float_down8(h, seg, seg_expert, w2, s2, g, kind, fp16, rows_per_task, y):
    """`down` for INT8 weights in float32: `h [P, Ip]` from `float_activations`."""
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
                _decode_row8(w2[e, r], scales, g, weights)
            for p in range(seg[u], seg[u + 1]):
                y[p, r] = dot(weights, h[p]) if shared else _dot_row8(w2[e, r], scales, h[p], g)


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def float_linear(fmt, x, xsum, weights, scales, g, kind, fp16, rows_per_task):
    """`linear` in float32 for INT4 (`fmt` = INT4) or INT8 weights: `x [T, Ip]`, `xsum [T, Ip / g]` from
    `float_activations` -> `y [T, O]`."""
    t, out_dim = x.shape[0], weights.shape[0]
    if x.shape[1] != (2 * weights.shape[1] if fmt == INT4 else weights.shape[1]) or x.shape[1] != g * scales.shape[1]:
        raise ValueError("activations, weights and scales do not fit")
    y = np.empty((t, out_dim), np.float32)
    chunks = (out_dim + rows_per_task - 1) // rows_per_task
    for c in prange(chunks):
        bits = np.empty(scales.shape[1], np.uint32)
        sw = bits.view(np.float32)
        for r in range(c * rows_per_task, min((c + 1) * rows_per_task, out_dim)):
            decode_scales(scales[r], kind, fp16, bits, sw)
            for i in range(t):
                y[i, r] = _float_row(fmt, weights[r], sw, g, x[i], xsum[i])
    return y


@dataclass
class KernelClock:
    """Seconds spent in this module's kernels while `timed` is on: `weights` (gate_up and down, which also
    runs the dense layers: the integer dot products over weights; `experts`, a whole routed experts block
    with its quantizing, grouping and combining, and `quantized_down`, `down` with its quantizing) and
    `activations` (quantizing the inputs), and the calls of both; `other` the other kernels `timed` was given."""

    weights_s: float = 0.0
    activations_s: float = 0.0
    calls: int = 0
    other_s: float = 0.0
    other_calls: int = 0


@contextlib.contextmanager
def timed(others: Iterable[tuple[ModuleType, str]] = ()) -> Iterator[KernelClock]:
    """For benchmarks: while inside, every call of this module's kernels (from any op, through `Kernels`, or
    from `mxfp4.py`) adds its wall time to the yielded clock, and so does every call of `others` (module,
    attribute name: kernels elsewhere, called as module attributes) to its `other` fields. It swaps the entry
    points for timing wrappers and puts them back on exit, so the kernels themselves check nothing. One thread
    at a time."""
    clock = KernelClock()
    this = sys.modules[__name__]
    kinds = {"gate_up": "weights_s", "down": "weights_s", "experts": "weights_s", "quantized_down": "weights_s"}
    kinds["quantize"] = "activations_s"
    targets = [(this, name, field, "calls") for name, field in kinds.items()]
    targets += [(module, name, "other_s", "other_calls") for module, name in others]
    saved = [getattr(module, name) for module, name, *_ in targets]

    def wrap(fn: Callable, field: str, count: str) -> Callable:
        def timed_call(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                setattr(clock, field, getattr(clock, field) + time.perf_counter() - start)
                setattr(clock, count, getattr(clock, count) + 1)

        return timed_call

    for (module, name, field, count), fn in zip(targets, saved, strict=True):
        setattr(module, name, wrap(fn, field, count))
    try:
        yield clock
    finally:
        for (module, name, *_), fn in zip(targets, saved, strict=True):
            setattr(module, name, fn)


# Backends: the kernels of one instruction set, bound to a weight format, group size and scale dtype.


@dataclass(frozen=True)
class Kernels:
    """Kernels of one weight format on one backend. `act` is what `activations` returns (a tuple of
    arrays whose contents depend on the backend); pass it on unchanged:

    - `activations(x [T, I] float32) -> act`
    - `gate_up(act, pair_token, seg, seg_expert, w13, s13, rows_per_task, h [P, I])` (see `gate_up`): `w13`
      and `s13` gate rows then up rows `[E, 2I, ...]`, or (gate, up) pairs of `[E, I, ...]` arrays
    - `down(act_h, seg, seg_expert, w2, s2, rows_per_task, y [P, H])`, `act_h = activations(h)`
    - `linear(act, weights, scales, rows_per_task) -> y [T, O]`
    - `down_x(x, seg, seg_expert, w2, s2, rows_per_task, y)` and `linear_x(x, weights, scales, rows_per_task)`:
      `down` and `linear` of float32 `x`, quantized in the same kernel call where the backend has integer kernels
    - `experts(k2, x, index, weights, w13, s13, inter, w2, s2, rows_per_task, out [T, H]) -> experts used`:
      a whole routed experts block in one call (see `experts`), `w13`/`s13` as `gate_up` takes them and the
      down rows in `k2`'s format; None on the float backend
    - `linear_args(weights, scales, rows_per_task, matrices=None) -> (simd, args)` for `apply_linear`: one matrix
      `[O, B]`, or with `matrices` (int64 `[E]`, `arange(E)`) E of them, `[E, O, B]`; and
      `experts_args(k2, w13, s13, inter, w2, s2, rows_per_task) -> (simd13, simd2, args)` for `apply_experts`
      (jitted callers); None on the float backend
    """

    activations: Callable[[np.ndarray], tuple]
    gate_up: Callable[..., None]
    down: Callable[..., None]
    linear: Callable[..., np.ndarray]
    down_x: Callable[..., None]
    linear_x: Callable[..., np.ndarray]
    experts: Callable[..., int] | None = None
    simd: Simd | None = None
    linear_args: Callable[..., tuple] | None = None
    experts_args: Callable[..., tuple] | None = None
    act_fmt: int | None = None  # the format `activations` quantizes for (`activation_format`); None: float


@dataclass(frozen=True)
class Backend:
    """An instruction set chosen once (`select_backend`); `kernels` binds its kernels to a format."""

    name: str

    def kernels(self, fmt: str, g: int, kind: int, activations: str = "group") -> Kernels:
        """`fmt` one of `FORMATS`, with a group size `g` and scale `kind` (int4.SCALE_BF16, SCALE_FP16, or
        simd.SCALE_F32) that `simd.VALID` allows for it, the tokens quantized as `activations` says (`ACTIVATIONS`:
        llama.cpp's way for a GGUF file's weights). The formats beyond INT4 and INT8 (GGUF blocks repacked,
        `kernels/ggml_blocks.py`; rows across lanes, `to_lanes`) have integer kernels only: on the `float` backend
        they are a ValueError."""
        groups, kinds = VALID.get(FORMATS.get(fmt, -1), ((), ()))
        if g not in groups or kind not in kinds:
            raise ValueError(f"no kernels for format {fmt!r}, group {g!r}, scale kind {kind!r}")
        if activations not in ACTIVATIONS or (activations == "q8_k" and 256 % g):
            raise ValueError(f"no activations {activations!r} for group {g}: one of {', '.join(ACTIVATIONS)}")
        if self.name == "float" and (fmt not in ("int4", "int8") or kind == SCALE_F32 or g not in (32, 64, 128)):
            raise ValueError(
                f"{fmt} weights with group {g} run on the integer kernels, which need AVX2; this CPU has only "
                f"the float backend"
            )
        return _kernels(self.name, FORMATS[fmt], g, kind, activations)


def _int4_inputs(codes: np.ndarray, g: int) -> np.ndarray:
    """INT4 rows `[O, Ip / 2]` (`int4.py`'s layout: byte `k g / 2 + j` holds input `k g + j` of group k in its low
    nibble and `k g + g / 2 + j` in its high one) -> their codes `[O, Ip]` in input order."""
    o, b = codes.shape
    pieces = codes.reshape(o, b * 2 // g, 1, g // 2)
    return np.concatenate([pieces & 15, pieces >> 4], axis=2).reshape(o, 2 * b)


def to_lanes(fmt: int, g: int, codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A matrix's INT4 (`int4.py`'s rows) or INT8 (`fmt`) `codes [O, B]` uint8 and `scales [O, G]` uint16 -> the
    same shapes laid out as rows across lanes (`simd.py`, "Rows across lanes"; O a multiple of `LANE_ROWS`)."""
    o, b = codes.shape
    if o % LANE_ROWS:
        raise ValueError(f"rows across lanes take whole blocks of {LANE_ROWS} rows, not {o}")
    blocks = o // LANE_ROWS
    if fmt == INT4:
        inputs = _int4_inputs(codes, g).reshape(blocks, LANE_ROWS, -1, 2, 4)  # [block, row, chunk, half, j]
        laid = inputs[..., 0, :] | (inputs[..., 1, :] << 4)
    else:
        laid = codes.reshape(blocks, LANE_ROWS, -1, 4)
    laid = np.ascontiguousarray(laid.transpose(0, 2, 1, 3)).reshape(o, b)
    across = np.ascontiguousarray(scales.reshape(blocks, LANE_ROWS, -1).transpose(0, 2, 1)).reshape(scales.shape)
    return laid, across


def from_lanes(fmt: int, g: int, codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`to_lanes` undone: rows across lanes -> `codes [O, B]` in `int4.py`'s (or INT8's) rows, `scales [O, G]`."""
    o, b = codes.shape
    blocks = o // LANE_ROWS
    laid = codes.reshape(blocks, -1, LANE_ROWS, 4).transpose(0, 2, 1, 3)  # [block, row, chunk, j]
    if fmt == INT4:
        inputs = np.stack([laid & 15, laid >> 4], axis=3).reshape(o, 2 * b)  # [row, chunk, half, j]: input order
        groups = inputs.reshape(o, -1, 2, g // 2)  # [row, group, half, j] -> byte j of the group
        rows = (groups[:, :, 0] | (groups[:, :, 1] << 4)).reshape(o, b)
    else:
        rows = laid.reshape(o, b)
    back = scales.reshape(blocks, -1, LANE_ROWS).transpose(0, 2, 1).reshape(scales.shape)
    return np.ascontiguousarray(rows), np.ascontiguousarray(back)


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.arrays: dict[tuple[str, int], np.ndarray] = {}


_SCRATCH = _Scratch()


def scratch(name: str, rows: int, cols: int) -> np.ndarray:
    """A float32 `[rows, cols]` array of this thread's, its contents left over: the same memory again at the next
    call with this name and width, which makes the array handed out before invalid. Kernels write h and y of
    many tokens in tasks scattered over them, and their first touch of fresh memory cost more than the kernels
    (a prefill of 683 tokens at the V2-Lite shape, Zen 4 VM, 2 threads: down 52 ms into a fresh y, 19 ms into
    one written before). So they are kept, each grown to the most rows asked and touched once when made."""
    key = (name, cols)
    have = _SCRATCH.arrays.get(key)
    if have is None or have.shape[0] < rows:
        have = np.empty((max(rows, 1), cols), np.float32)
        have.fill(0.0)  # every page touched here, in one pass
        _SCRATCH.arrays[key] = have
    return have[:rows]


def across_lanes(isa: str | None, rows: int) -> bool:
    """Whether a matrix of `rows` rows is stored as rows across lanes for backend `isa` (None: the best): on the
    integer backends, whole blocks of `LANE_ROWS` rows."""
    return rows % LANE_ROWS == 0 and choose_isa(isa) != "float"


def select_backend(name: str | None = None) -> Backend:
    """The best backend for the CPU Numba compiles for, or `name` (avx512amx, avx512vnni, avxvnni, avx2, float);
    a ValueError names the features a forced backend lacks. Nothing is compiled here."""
    return Backend(choose_isa(name))


def read_only(a: np.ndarray) -> np.ndarray:
    """`a`, or a read-only view of it. Weights reach the kernels read-only, whether they come from a file's
    memory map or from memory: Numba compiles a kernel once per argument type, and writability is part of
    the type."""
    if not a.flags.writeable:
        return a
    view = a.view()
    view.flags.writeable = False
    return view


_ONE_EXPERT = np.zeros(1, np.int64)  # `linear` runs as `down` with one expert, expert 0
# `gate_up`'s `quantized` where it writes `h` in float32 (`_fuses`)
_FLOAT_H = (1, 0, np.zeros((0, 0), np.int8), np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int32))


@functools.cache
def _fp16(kind: int) -> np.ndarray:
    return fp16_table() if kind == SCALE_FP16 else np.zeros(1, np.float32)


@functools.cache
def _kernels(isa: str, fmt: int, g: int, kind: int, activations: str) -> Kernels:
    fp16 = _fp16(kind)
    if isa == "float":
        return _float_kernels(fmt, g, kind, fp16)
    simd = Simd(isa, fmt, g, kind)
    act_fmt = activation_format(fmt, activations)

    def activations(x: np.ndarray) -> tuple:
        return quantize(x, g, act_fmt)

    def gate_up_(act, pair_token, seg, seg_expert, w13, s13, rows_per_task, h) -> None:
        rows = _gate_up_rows(w13, s13, h.shape[1])
        gate_up(simd, *act, pair_token, seg, seg_expert, *rows, rows_per_task, task_count(), h, _FLOAT_H)

    def down_(act, seg, seg_expert, w2, s2, rows_per_task, y) -> None:
        down(simd, *act, seg, seg_expert, read_only(w2), read_only(s2), rows_per_task, task_count(), y)

    def linear_(act, weights, scales, rows_per_task) -> np.ndarray:
        # one expert every token goes to: `down`'s code and compiled kernel, the same bits
        t = act[0].shape[0]
        y = np.empty((t, weights.shape[0]), np.float32)
        seg = np.array([0, t], np.int64)
        one = (_ONE_EXPERT, read_only(weights[None]), read_only(scales[None]))
        down(simd, *act, seg, *one, rows_per_task, task_count(), y)
        return y

    def down_x(x, seg, seg_expert, w2, s2, rows_per_task, y) -> None:
        w2, s2 = read_only(w2), read_only(s2)
        quantized_down(simd, g, act_fmt, x, seg, seg_expert, w2, s2, rows_per_task, task_count(), y)

    def linear_x(x, weights, scales, rows_per_task) -> np.ndarray:
        y = np.empty((x.shape[0], weights.shape[0]), np.float32)
        seg = np.array([0, x.shape[0]], np.int64)
        one = (_ONE_EXPERT, read_only(weights[None]), read_only(scales[None]))
        quantized_down(simd, g, act_fmt, x, seg, *one, rows_per_task, task_count(), y)
        return y

    def experts_args(k2, w13, s13, inter, w2, s2, rows_per_task) -> tuple:
        s2_ = k2.simd
        w2, s2 = read_only(w2), read_only(s2)
        args = (g, act_fmt, s2_.g, k2.act_fmt, *_gate_up_rows(w13, s13, inter), inter, w2, s2, rows_per_task)
        return simd, s2_, args

    def experts_(k2, x, index, weights, w13, s13, inter, w2, s2, rows_per_task, out) -> int:
        simd13, simd2, args = experts_args(k2, w13, s13, inter, w2, s2, rows_per_task)
        h, y = scratch("h", index.size, inter), scratch("y", index.size, out.shape[1])
        return experts(simd13, simd2, *args[:4], x, index, weights, *args[4:], task_count(), out, h, y)

    def linear_args(weights, scales, rows_per_task, matrices=None) -> tuple:
        if matrices is None:  # one matrix, `[O, B]`
            weights, scales, matrices = weights[None], scales[None], _ONE_EXPERT
        return simd, (g, act_fmt, read_only(weights), read_only(scales), matrices, rows_per_task)

    kernels = (activations, gate_up_, down_, linear_, down_x, linear_x, experts_, simd, linear_args, experts_args)
    return Kernels(*kernels, act_fmt)


def _gate_up_rows(w13, s13, inter: int) -> tuple:
    """`(w1, s1, w3, s3, up_row)` for `gate_up` from `w13`, `s13`: (gate, up) pairs, or gate rows then up
    rows in whole arrays (so that Numba types them alike for any E), read-only (`read_only`: a format's kernels
    then compile once for the ops' weights and any caller's)."""
    if isinstance(w13, tuple):
        (w1, w3), (s1, s3) = w13, s13
        return read_only(w1), read_only(s1), read_only(w3), read_only(s3), 0
    w13, s13 = read_only(w13), read_only(s13)
    return w13, s13, w13, s13, inter


def _float_kernels(fmt: int, g: int, kind: int, fp16: np.ndarray) -> Kernels:
    def activations(x: np.ndarray) -> tuple:
        return float_activations(x, g)

    def gate_up_(act, pair_token, seg, seg_expert, w13, s13, rows_per_task, h) -> None:
        if fmt == INT4:
            int4.gate_up(*act, pair_token, seg, seg_expert, w13, s13, g, kind, fp16, rows_per_task, h)
        else:
            float_gate_up8(act[0], pair_token, seg, seg_expert, w13, s13, g, kind, fp16, rows_per_task, h)

    def down_(act, seg, seg_expert, w2, s2, rows_per_task, y) -> None:
        if fmt == INT4:
            int4.down(*act, seg, seg_expert, w2, s2, g, kind, fp16, rows_per_task, y)
        else:
            float_down8(act[0], seg, seg_expert, w2, s2, g, kind, fp16, rows_per_task, y)

    def linear_(act, weights, scales, rows_per_task) -> np.ndarray:
        return float_linear(fmt, *act, weights, scales, g, kind, fp16, rows_per_task)

    def down_x(x, seg, seg_expert, w2, s2, rows_per_task, y) -> None:
        down_(activations(x), seg, seg_expert, w2, s2, rows_per_task, y)

    def linear_x(x, weights, scales, rows_per_task) -> np.ndarray:
        return linear_(activations(x), weights, scales, rows_per_task)

    return Kernels(activations, gate_up_, down_, linear_, down_x, linear_x)
