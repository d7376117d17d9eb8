"""Kernels with int8 activations (`kernels/numba/int8dot.py`, `simd.py`).

Every integer backend this CPU runs gives the bits of a plain numpy reference that follows the canonical
order of `simd.py` (int64 lanes, float32 operations, fma emulated exactly), over awkward shapes, every
group size, bf16 and fp16 scales; a token's result does not depend on the tokens tiled with it; results
are close to float64 dequantize-then-matmul (which catches a mistake the same-order reference shares).
The AVX-512 VNNI and AVX-VNNI code is compiled for CPUs this machine is not, in a subprocess, and its
assembly checked. The INT8 weight quantizers agree bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from fractions import Fraction

import gguf
import numpy as np
import pytest
import torch
from hetero_moe.kernels.numba import int8dot
from hetero_moe.kernels.numba.common import group_by_expert, silu_mul_rows
from hetero_moe.kernels.numba.int4 import SCALE_BF16, SCALE_FP16
from hetero_moe.kernels.numba.simd import (
    AFFINE,
    INT4,
    INT8,
    IQ4_VALUES,
    IQ4NL,
    ISAS,
    Q4_0,
    SCALE_F32,
    UINT4,
    UINT8,
    amx_permitted,
    choose_isa,
    spans,
    target_features,
)
from hetero_moe.kernels.quant import dequantize_int4, dequantize_int8, quantize_int8
from numba import njit

INTEGER = [isa for isa in ISAS if isa != "float"]


def runs(isa: str) -> bool:
    """Whether this machine runs `isa`'s code: the CPU's features, and for AMX the OS's grant."""
    try:
        return choose_isa(isa) == isa
    except ValueError:
        return False


RUNNABLE = [isa for isa in INTEGER if runs(isa)]
# the VNNI code paths with vpdpbusd spelled in plain IR: bit-exactness of their lanes on any AVX2 CPU
EMULATED = [f"{isa}-emulated" for isa in ("avx512vnni", "avxvnni") if isa not in RUNNABLE and "avx2" in RUNNABLE]
GROUPS = [32, 64, 128]
FORMATS = {INT4: "int4", INT8: "int8", IQ4NL: "iq4nl", UINT4: "uint4", UINT8: "uint8"}
OFFSET = {INT4: 8, INT8: 128, IQ4NL: 128, UINT4: 0, UINT8: 0}
NIBBLES = (INT4, IQ4NL, UINT4)
# Each (format, group, scale kind) is its own compiled specialization of every kernel, per backend, and
# compiling dominates this file's time. The best backend here gets every group (the group and scale code
# is the same IR for every backend) and both scale kinds; the others (and the float fallback) one spec per
# format: the shipped rules' own (INT4 g64, INT8 g32, bf16), which the other test files compile anyway.
SPECS = [(INT4, 64, SCALE_BF16), (INT8, 32, SCALE_BF16), (INT4, 32, SCALE_FP16), (INT8, 128, SCALE_FP16)]
SHIPPED = SPECS[:2]
# the formats GGUF blocks are repacked into (`kernels/ggml_blocks.py`)
BLOCK_SPECS = [(UINT4, 32, SCALE_F32), (UINT8, 32, SCALE_F32), (IQ4NL, 32, SCALE_FP16), (IQ4NL, 32, SCALE_F32)]
BLOCK_SPECS += [(INT8, 16, SCALE_F32)]
PRIMARY = RUNNABLE[:1]
OTHERS = RUNNABLE[1:] + EMULATED
SHAPES = [(40, 72), (97, 200), (13, 130), (5, 1000)]  # (out, in): odd sizes, ragged groups and spans


# --- the reference ------------------------------------------------------------------------------


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 `a * b + c` rounded once: the product is exact in float64, the sum's error is recovered
    (TwoSum) and the float64 sum rounded to odd, which then rounds to float32 correctly."""
    p = a.astype(np.float64) * b.astype(np.float64)
    c = c.astype(np.float64)
    s = p + c
    v = s - p
    err = (p - (s - v)) + (c - v)
    even = (s.view(np.int64) & 1) == 0
    s = np.where((err != 0) & even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def ref_activations(x: np.ndarray, g: int, activations: str = "group") -> tuple[np.ndarray, np.ndarray]:
    """`x [T, I]` -> natural-order `xq [T, Ip]` int64 and `a [T, Ip / g]` float32; as llama.cpp's Q8_0 blocks the
    scales rounded to fp16 values (up to fp16's largest; the codes rounded with the float32 scale), as its Q8_K
    blocks each group with the scale of its 256 inputs."""
    t, n = x.shape
    ip = -(-n // g) * g
    blocks = np.zeros((t, ip), np.float32)
    blocks[:, :n] = x
    blocks = blocks.reshape(t, ip // g, g)
    a = np.abs(blocks).max(axis=-1) / np.float32(127.0)
    if activations == "q8_k":
        a = np.repeat(a.reshape(t, -1, 256 // g).max(axis=-1), 256 // g, axis=1)
    safe = np.where(a > 0, a, np.float32(1.0))
    q = np.clip(np.rint(blocks / safe[..., None]), -127, 127)
    q = np.where(a[..., None] > 0, q, 0).astype(np.int64)
    if activations == "q8_0":  # where fp16 holds them
        with np.errstate(over="ignore"):
            a = np.where(a <= 65504, a.astype(np.float16).astype(np.float32), a)
    return q.reshape(t, ip), a


def lane_map(fmt: int, g: int, ip: int) -> tuple[np.ndarray, np.ndarray]:
    """`[L, E]` inputs of every integer lane (`ip` for padding) and `[L]` each lane's group, derived from
    the weight layouts: INT4 byte `k g/2 + j` holds inputs `k g + j` (low) and `k g + g/2 + j` (high)."""
    span_bytes = 64 if fmt in NIBBLES else max(64, g)
    row_bytes = ip // 2 if fmt in NIBBLES else ip
    elems, groups = [], []
    for s in range(-(-row_bytes // span_bytes)):
        for i in range(16):
            if fmt in NIBBLES:
                lane = []
                for b in range(64 * s + 4 * i, 64 * s + 4 * i + 4):
                    k, j = divmod(b, g // 2)
                    lane += [k * g + j, k * g + g // 2 + j]
                group = (64 * s + 4 * i) // (g // 2)
            else:
                lane = [span_bytes * s + 64 * m + 4 * i + c for m in range(span_bytes // 64) for c in range(4)]
                group = lane[0] // g
            elems.append([min(e, ip) for e in lane])
            groups.append(group)
    return np.array(elems), np.array(groups)


def natural_codes(fmt: int, g: int, weights: np.ndarray) -> np.ndarray:
    """Unsigned weight codes `[O, Ip]` in input order (IQ4NL's looked up)."""
    if fmt not in NIBBLES:
        return weights.astype(np.int64)
    o = weights.shape[0]
    grouped = weights.reshape(o, -1, g // 2).astype(np.int64)
    codes = np.concatenate([grouped & 15, grouped >> 4], axis=-1).reshape(o, -1)
    return np.array(IQ4_VALUES)[codes] + 128 if fmt == IQ4NL else codes


def affine_rows(fmt: int, g: int, row_bytes: int, scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """`[O, G]` float32 scales and mins -> the affine formats' rows: per span its scales, then its mins."""
    span_bytes, _, gps = spans(fmt, g)
    n = -(-row_bytes // span_bytes)
    out = np.zeros((scales.shape[0], n, 2, gps), np.float32)
    for i, v in enumerate((scales, mins)):
        padded = np.zeros((scales.shape[0], n * gps), np.float32)
        padded[:, : v.shape[1]] = v
        out[:, :, i] = padded.reshape(-1, n, gps)
    return out.reshape(scales.shape[0], -1)


def split_affine(fmt: int, g: int, rows: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """`affine_rows` back to `[O, G]` scales and mins."""
    gps = spans(fmt, g)[2]
    r = rows.reshape(rows.shape[0], -1, 2, gps)
    return r[:, :, 0].reshape(rows.shape[0], -1)[:, :groups], r[:, :, 1].reshape(rows.shape[0], -1)[:, :groups]


def scale_values(bits: np.ndarray, kind: int) -> np.ndarray:
    if kind == SCALE_F32:
        return bits
    if kind == SCALE_BF16:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float16).astype(np.float32)


def pad_column(a: np.ndarray, value=0) -> np.ndarray:
    return np.concatenate([a, np.full((a.shape[0], 1), value, a.dtype)], axis=1)


def ref_dots(fmt: int, g: int, weights: np.ndarray, bits: np.ndarray, kind: int, xq: np.ndarray, a: np.ndarray):
    """`[T, O]` float32: rows `weights [O, B]` (scales `bits [O, G]`) times tokens `xq [T, Ip]` (natural
    order, scales `a [T, G]`), in the canonical order."""
    ip = xq.shape[1]
    elems, groups = lane_map(fmt, g, ip)
    mins = None
    if fmt in AFFINE:
        bits, mins = split_affine(fmt, g, bits, ip // g)
    codes = pad_column(natural_codes(fmt, g, weights) - OFFSET[fmt])[:, elems]  # [O, L, E]
    xl = pad_column(xq)[:, elems]  # [T, L, E]
    # exact: |products| <= 128 * 255 and a lane has at most 8 of them
    lanes = np.matmul(xl.transpose(1, 0, 2).astype(np.float64), codes.transpose(1, 2, 0).astype(np.float64))
    lanes = lanes.transpose(1, 2, 0).astype(np.float32)  # [T, O, L], exact
    n_groups = bits.shape[1]
    sw = pad_column(scale_values(bits, kind))[:, np.minimum(groups, n_groups)]  # [O, L]
    sa = pad_column(a)[:, np.minimum(groups, n_groups)]  # [T, L]
    scale = sw[None, :, :] * sa[:, None, :]  # float32 products
    acc = np.zeros((*lanes.shape[:2], 16), np.float32)
    for s in range(lanes.shape[2] // 16):
        acc = fma32(lanes[..., 16 * s : 16 * s + 16], scale[..., 16 * s : 16 * s + 16], acc)
    v8 = acc[..., :8] + acc[..., 8:]
    v4 = v8[..., :4] + v8[..., 4:]
    v2 = v4[..., :2] + v4[..., 2:]
    total = v2[..., 0] + v2[..., 1]
    if mins is None:
        return total
    gps = spans(fmt, g)[2]
    xsum = (xq.reshape(xq.shape[0], -1, g).sum(axis=2) * a).astype(np.float32)  # a X, float32 products
    m = np.zeros((*total.shape, gps), np.float32)
    for s in range(-(-mins.shape[1] // gps)):
        k = slice(gps * s, gps * s + gps)
        mw, ax = mins[:, k], xsum[:, k]
        if mw.shape[1] < gps:  # past the row: zero
            mw, ax = np.pad(mw, ((0, 0), (0, gps - mw.shape[1]))), np.pad(ax, ((0, 0), (0, gps - ax.shape[1])))
        m = fma32(mw[None, :, :], ax[:, None, :], m)
    if gps == 4:
        m = m[..., :2] + m[..., 2:]
    return total - (m[..., 0] + m[..., 1])


def ref_layout(fmt: int, g: int, xq: np.ndarray, a: np.ndarray):
    """The kernels' `(xq, ascale, bias)` expected for natural-order `xq`, `a`."""
    t, ip = xq.shape
    elems, _ = lane_map(fmt, g, ip)
    cols, ascale_cols, bias_cols = int8dot.activation_shape(fmt, g, ip)
    laid = np.zeros((t, cols), np.int64)
    padded = pad_column(xq)
    if fmt in NIBBLES:
        for lane in range(elems.shape[0]):
            s, i = divmod(lane, 16)
            for c in range(4):
                laid[:, 128 * s + 4 * i + c] = padded[:, elems[lane, 2 * c]]
                laid[:, 128 * s + 64 + 4 * i + c] = padded[:, elems[lane, 2 * c + 1]]
    else:
        laid[:, :ip] = xq
    ascale = np.zeros((t, ascale_cols), np.float32)
    ascale[:, : a.shape[1]] = a
    if fmt in AFFINE:
        ax = (xq.reshape(t, -1, g).sum(axis=2) * a).astype(np.float32)
        ascale = affine_rows(fmt, g, laid.shape[1] // (2 if fmt in NIBBLES else 1), a, ax)
    bias = -OFFSET[fmt] * padded[:, elems].sum(axis=2)
    assert bias.shape[1] == bias_cols
    return laid, ascale, bias


def kernels(isa: str, fmt: int, g: int, kind: int, lanes: bool = False, activations: str = "group") -> int8dot.Kernels:
    backend = int8dot.Backend(isa) if isa in EMULATED else int8dot.select_backend(isa)
    return backend.kernels(FORMATS[fmt] + "_lanes" * lanes, g, kind, activations)


def silu_rows(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """The integer kernels' silu (`common.silu_mul_rows`, checked against float64 below)."""
    out = np.ascontiguousarray(gate, np.float32).copy()
    silu_mul_rows(out, np.ascontiguousarray(up, np.float32), out.shape[0])
    return out


def test_silu_rows_is_close_to_float64() -> None:
    rng = np.random.default_rng(0)
    gate = np.concatenate([rng.standard_normal(5000) * 10, np.linspace(-120, 120, 4801), [0.0, -0.0, 1e-30, -1e-30]])
    gate = gate.astype(np.float32).reshape(1, -1)
    up = rng.standard_normal(gate.shape).astype(np.float32)
    g64, u64 = gate.astype(np.float64), up.astype(np.float64)
    with np.errstate(over="ignore"):
        ref = g64 / (1 + np.exp(-g64)) * u64
    assert np.all(np.abs(silu_rows(gate, up) - ref) <= 1e-6 * np.abs(ref) + 1e-30)


# --- data ---------------------------------------------------------------------------------------


def random_weights(rng, fmt: int, g: int, out_dim: int, in_dim: int, kind: int):
    """Random codes (every byte value) and scales of a few magnitudes, some groups zero."""
    ip = -(-in_dim // g) * g
    row_bytes = ip // 2 if fmt in NIBBLES else ip
    weights = rng.integers(0, 128 if fmt == UINT8 else 256, (out_dim, row_bytes), dtype=np.uint8)
    mag = 10.0 ** rng.integers(-4, 1, (out_dim, ip // g))
    values = (rng.random((out_dim, ip // g)) * mag).astype(np.float32)
    values[rng.random(values.shape) < 0.05] = 0
    if fmt in AFFINE:
        mins = (rng.standard_normal(values.shape) * mag).astype(np.float32)
        return weights, affine_rows(fmt, g, row_bytes, values, mins)
    if kind == SCALE_F32:
        return weights, values
    if kind == SCALE_BF16:
        bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    else:
        bits = values.astype(np.float16).view(np.uint16)
    return weights, bits


def random_experts(rng, fmt: int, g: int, e: int, inter: int, hidden: int, kind: int):
    """`w13 [E, 2I, B1]`, `s13`, `w2 [E, H, B2]`, `s2` of `random_weights`."""
    up = [random_weights(rng, fmt, g, 2 * inter, hidden, kind) for _ in range(e)]
    down = [random_weights(rng, fmt, g, hidden, inter, kind) for _ in range(e)]
    return tuple(np.stack([m[i] for m in mats]) for mats in (up, down) for i in (0, 1))


def random_tokens(rng, tokens: int, in_dim: int) -> np.ndarray:
    x = rng.standard_normal((tokens, in_dim)).astype(np.float32) * (10.0 ** rng.integers(-3, 3, (tokens, 1)))
    x[:, : min(32, in_dim)][rng.random(tokens) < 0.2] = 0  # zero blocks: a = 0
    x[rng.random(x.shape) < 0.002] *= 300  # outliers
    return x.astype(np.float32)


def dequantized(fmt: int, g: int, weights: np.ndarray, bits: np.ndarray, kind: int, in_dim: int) -> np.ndarray:
    if fmt not in (INT4, INT8) or kind == SCALE_F32:  # float64 from the codes
        groups = -(-in_dim // g)
        mins = np.zeros((weights.shape[0], groups))
        if fmt in AFFINE:
            bits, mins = split_affine(fmt, g, bits, groups)
        codes = natural_codes(fmt, g, weights) - OFFSET[fmt]
        scales = scale_values(bits, kind).astype(np.float64)
        return (codes * np.repeat(scales, g, axis=1) - np.repeat(mins, g, axis=1))[:, :in_dim]
    sdtype = torch.bfloat16 if kind == SCALE_BF16 else torch.float16
    scales = torch.from_numpy(bits.view(np.int16).copy()).view(sdtype)
    fn = dequantize_int4 if fmt == INT4 else dequantize_int8
    return fn(torch.from_numpy(weights.copy()), scales, g, in_dim).double().numpy()


def assert_bits(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    diff = ours.view(np.uint32) != ref.astype(np.float32).view(np.uint32)
    assert not diff.any(), f"{diff.sum()} of {diff.size} differ, first at {np.argwhere(diff)[0]}"


def assert_close(ours: np.ndarray, w64: np.ndarray, xq: np.ndarray, a: np.ndarray, g: int) -> None:
    """Against float64 `w64 [O, I]` times the dequantized activations, within float32 accumulation error."""
    in_dim = w64.shape[1]
    x64 = (xq * np.repeat(a, g, axis=1).astype(np.float64))[:, :in_dim]
    exact = x64 @ w64.T
    bound = np.abs(x64) @ np.abs(w64).T
    assert np.all(np.abs(ours - exact) <= 1e-5 * bound + 1e-30)


# --- tests --------------------------------------------------------------------------------------


def test_fma_reference_is_correctly_rounded() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    a = (rng.standard_normal(n) * 2.0 ** rng.integers(-20, 20, n)).astype(np.float32)
    b = (1 + rng.integers(0, 1 << 12, n) * 2.0**-12).astype(np.float32)  # short mantissas: many near-ties
    c = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    ours = fma32(a, b, c)
    for i in range(n):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        near = np.float32(float(exact))
        candidates = [near, np.nextafter(near, np.float32(np.inf)), np.nextafter(near, np.float32(-np.inf))]
        best = min(candidates, key=lambda f: (abs(Fraction(float(f)) - exact), int(np.float32(f).view(np.uint32)) & 1))
        assert ours[i] == best, (a[i], b[i], c[i])


def test_backend_choice() -> None:
    assert choose_isa(None, frozenset({"avx2", "fma", "f16c"})) == "avx2"
    assert choose_isa(None, frozenset({"avx2", "fma"})) == "float"
    assert choose_isa(None, frozenset({"avx2", "fma", "f16c", "avxvnni"})) == "avxvnni"
    vnni512 = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avxvnni"})
    assert choose_isa(None, vnni512) == "avx512vnni"
    assert choose_isa(None, frozenset({"avx", "sse4.2"})) == "float"
    assert choose_isa(None, frozenset({"avx512f", "avx512vnni"})) == "float"  # no AVX2/FMA bits: not trusted
    assert choose_isa("avx2", vnni512) == "avx2"
    assert choose_isa(None, vnni512 | {"amx-tile", "amx-int8"}) == "avx512amx"
    assert choose_isa(None, vnni512 | {"amx-tile", "amx-bf16"}) == "avx512vnni"  # no int8 tiles
    with pytest.raises(ValueError, match="amx-tile, amx-int8"):
        choose_isa("avx512amx", vnni512)
    host = target_features()
    if {"amx-tile", "amx-int8"} <= host and not amx_permitted():  # the CPU has AMX, the OS keeps it
        assert choose_isa() == "avx512vnni"
    with pytest.raises(ValueError, match="avx512bw, avx512vl, avx512vnni"):
        choose_isa("avx512vnni", frozenset({"avx2", "fma", "f16c", "avx512f"}))
    with pytest.raises(ValueError, match="unknown backend 'sse'"):
        int8dot.select_backend("sse")
    assert int8dot.select_backend().name == choose_isa()
    for isa in INTEGER:
        if isa not in RUNNABLE:
            with pytest.raises(ValueError, match="lacks"):
                int8dot.select_backend(isa)


def test_fp16_value_rounds_as_numpy() -> None:
    rng = np.random.default_rng(5)
    values = (rng.standard_normal(20000) * np.exp(rng.uniform(-25, 12, 20000))).astype(np.float32)
    halfway = (np.arange(1, 2000, dtype=np.float32) + np.float32(0.5)) * np.float32(2.0**-24)  # subnormal ties
    steps = np.float32(1.0) + (np.arange(400, dtype=np.float32) + np.float32(0.5)) * np.float32(2.0**-10)  # normal ties
    edges = [0.0, -0.0, 6.1035156e-05, 6.1e-05, 2.0**-25, 2.0**-26, 65504.0, 65519.0, 65520.0, 1e6]
    values = np.concatenate([values, halfway, -halfway, steps, steps * np.float32(1000), np.array(edges, np.float32)])
    got = np.array([int8dot.fp16_value(v) for v in values], np.float32)
    with np.errstate(over="ignore"):  # past 65504: infinity, as in fp16_value
        want = values.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_activations_for_fp16_scales_are_llamacpp_q8_0_blocks() -> None:
    """For weights with fp16 scales, a token's codes and scales are those of llama.cpp's Q8_0 blocks of it (as the
    `gguf` package writes them), which its dot products with Q4_0, Q8_0 and IQ4_NL weights take."""
    rng = np.random.default_rng(8)
    x = random_tokens(rng, 24, 1024) * np.float32(1e-3) ** rng.integers(0, 2, (24, 1)).astype(np.float32)
    blocks = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).reshape(24, 32, 34)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 2:].view(np.int8).reshape(24, 1024)
    xq, ascale, _ = int8dot.quantize_activations(x, 32, int8dot.activation_format(INT8, "q8_0"))
    np.testing.assert_array_equal(ascale[:, :32], d)
    np.testing.assert_array_equal(xq[:, :1024], qs)
    assert int8dot.activation_format(INT4) == INT4
    assert int8dot.activation_format(Q4_0, "q8_0") == INT4 | int8dot.ROUND_FP16


@pytest.mark.parametrize("fmt", [INT4, INT8])
@pytest.mark.parametrize("g", GROUPS)
def test_activations_for_rows_across_lanes(fmt: int, g: int) -> None:
    """Tokens quantized for rows across lanes (whole groups on vectors, `simd.quantize_group`; a ragged last one in
    scalar code): the codes and scales of `ref_activations` in input order, each group's bias the weights' offset
    times minus its codes' sum; groups of zeros (no codes, no bias) and outliers among them."""
    rng = np.random.default_rng(g + fmt + 3)
    x = random_tokens(rng, 9, 3 * g + 40)
    x[2, g : 2 * g] = 0
    want, a = ref_activations(x, g)
    lanes = int8dot.activation_format(int8dot.FORMATS[FORMATS[fmt] + "_lanes"])
    xq, ascale, bias = int8dot.quantize_activations(x, g, lanes)
    np.testing.assert_array_equal(xq, want)
    np.testing.assert_array_equal(ascale, a)
    np.testing.assert_array_equal(bias, -OFFSET[fmt] * want.reshape(9, -1, g).sum(axis=2))


@pytest.mark.parametrize(("fmt", "g"), [(UINT4, 32), (UINT8, 32), (INT8, 16), (IQ4NL, 32)])
def test_activations_in_super_blocks(fmt: int, g: int) -> None:
    """One scale a block of 256 inputs (llama.cpp's Q8_K), in each format's layout, and the layout of the per-group
    activations otherwise."""
    rng = np.random.default_rng(g + fmt)
    x = random_tokens(rng, 7, 768)
    xq, a = ref_activations(x, g, "q8_k")
    act = int8dot.activation_format(fmt, "q8_k")
    for got, want in zip(int8dot.quantize_activations(x, g, act), ref_layout(fmt, g, xq, a), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="no activations 'q8_1'"):
        int8dot.select_backend().kernels("uint4", 32, SCALE_F32, "q8_1")


@pytest.mark.parametrize(
    ("fmt", "g"), [(f, g) for f in (INT4, INT8) for g in GROUPS] + [(IQ4NL, 32), (UINT4, 32), (UINT8, 32), (INT8, 16)]
)
@pytest.mark.parametrize("in_dim", [1, 72, 130, 200, 257])
def test_activation_layout(fmt: int, g: int, in_dim: int) -> None:
    rng = np.random.default_rng(in_dim + g)
    x = random_tokens(rng, 40, in_dim)
    xq, a = ref_activations(x, g)
    for quantize in (int8dot.quantize_activations, int8dot.quantize_activations_parallel):
        ours = quantize(x, g, fmt)
        for got, want in zip(ours, ref_layout(fmt, g, xq, a), strict=True):
            assert got.shape == want.shape
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("isa", "fmt", "g", "kind", "out_dim", "in_dim"),
    [(isa, *spec, *SHAPES[i]) for isa in PRIMARY for i, spec in enumerate(SPECS)]
    + [(isa, *spec, *SHAPES[3 - i]) for isa in OTHERS for i, spec in enumerate(SHIPPED)],
)
def test_linear(isa: str, fmt: int, g: int, out_dim: int, in_dim: int, kind: int) -> None:
    rng = np.random.default_rng(out_dim * 7 + g)
    weights, bits = random_weights(rng, fmt, g, out_dim, in_dim, kind)
    k = kernels(isa, fmt, g, kind)
    w64 = dequantized(fmt, g, weights, bits, kind, in_dim)
    for tokens in (1, 3, 17, 300):
        x = random_tokens(rng, tokens, in_dim)
        xq, a = ref_activations(x, g)
        for rows in (1, 8):
            y = k.linear(k.activations(x), weights, bits, rows)
            assert_bits(y, ref_dots(fmt, g, weights, bits, kind, xq, a))
        assert_bits(k.linear_x(x, weights, bits, 8), y)  # quantizing in the same kernel call
        half = tokens // 2  # down_x: two experts (the same weights twice), each on its own rows
        y2 = np.empty_like(y)
        k.down_x(x, np.array([0, half, tokens]), np.array([1, 0]), np.stack([weights] * 2), np.stack([bits] * 2), 8, y2)
        assert_bits(y2, y)
        assert_close(y, w64, xq, a, g)


@pytest.mark.parametrize(
    ("isa", "fmt", "g", "kind"),
    [(isa, *spec) for isa in PRIMARY for spec in BLOCK_SPECS]  # the other backends: the code paths that differ
    + [(isa, *spec) for isa in OTHERS for spec in BLOCK_SPECS if spec[0] in (UINT4, UINT8) or spec[2] == SCALE_F32],
)
def test_block_formats_linear(isa: str, fmt: int, g: int, kind: int) -> None:
    """The formats of GGUF's blocks, bit-exact per backend, on rows with and without a ragged last span."""
    rng = np.random.default_rng(fmt * 100 + g + kind)
    k = kernels(isa, fmt, g, kind)
    for out_dim, in_dim in ((13, 200), (40, 256)):
        weights, bits = random_weights(rng, fmt, g, out_dim, in_dim, kind)
        w64 = dequantized(fmt, g, weights, bits, kind, in_dim)
        for tokens in (1, 3, 17):
            x = random_tokens(rng, tokens, in_dim)
            xq, a = ref_activations(x, g)
            y = k.linear(k.activations(x), weights, bits, 8)
            assert_bits(y, ref_dots(fmt, g, weights, bits, kind, xq, a))
            if fmt not in AFFINE:  # the mins' products are rounded once more
                assert_close(y, w64, xq, a, g)
            else:
                exact = (xq * np.repeat(a, g, axis=1))[:, :in_dim] @ w64.T
                assert np.allclose(y, exact, rtol=1e-4, atol=1e-5 * np.abs(exact).max())


def block_rows(fmt: int, weights: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """INT4 or INT8 rows (group 32, fp16 scales) as llama.cpp's Q4_0 or Q8_0 rows: per block its scale's
    two bytes, then its codes (Q8_0's signed: `u - 128`)."""
    codes = weights.reshape(weights.shape[0], bits.shape[1], -1)
    if fmt == INT8:
        codes = codes ^ np.uint8(0x80)
    scale = bits.astype("<u2").view(np.uint8).reshape(bits.shape[0], bits.shape[1], 2)
    return np.concatenate([scale, codes], axis=2).reshape(weights.shape[0], -1)


@pytest.mark.parametrize("isa", RUNNABLE + EMULATED)
@pytest.mark.parametrize("fmt", [INT4, INT8])
def test_rows_of_blocks_read_in_place(isa: str, fmt: int) -> None:
    """Q4_0 / Q8_0 rows as a GGUF file holds them give INT4's / INT8's bits, ragged last spans included, with the
    tokens in llama.cpp's Q8_0 blocks; through the expert kernels too (on the first backend: the loads are the same
    code)."""
    rng = np.random.default_rng(fmt)
    k = kernels(isa, fmt, 32, SCALE_FP16, activations="q8_0")
    blocks = int8dot.select_backend(isa) if isa not in EMULATED else int8dot.Backend(isa)
    kb = blocks.kernels("q4_0" if fmt == INT4 else "q8_0", 32, SCALE_FP16, "q8_0")
    for out_dim, in_dim in ((13, 96), (40, 1440)):  # 3 and 45 blocks
        weights, bits = random_weights(rng, fmt, 32, out_dim, in_dim, SCALE_FP16)
        raw = block_rows(fmt, weights, bits)
        for tokens in (1, 3, 17):
            x = random_tokens(rng, tokens, in_dim)
            xq, a = ref_activations(x, 32, "q8_0")
            y = kb.linear(kb.activations(x), raw, raw, 8)
            assert_bits(y, ref_dots(fmt, 32, weights, bits, SCALE_FP16, xq, a))
    if isa not in PRIMARY:
        return
    e, inter, hidden = 5, 64, 96
    w13, s13, w2, s2 = random_experts(rng, fmt, 32, e, inter, hidden, SCALE_FP16)
    x, index = random_tokens(rng, 9, hidden), route(rng, 9, 3, e)
    _, _, _, _, h, y = run_experts(k, x, index, e, w13, s13, w2, s2, inter)
    gate, up = (
        np.stack([block_rows(fmt, w13[i, r], s13[i, r]) for i in range(e)])
        for r in (slice(0, inter), slice(inter, None))
    )
    down = np.stack([block_rows(fmt, w2[i], s2[i]) for i in range(e)])
    assert_block_experts(kb, x, index, e, (gate, up, down), h, y)


def assert_block_experts(kb, x, index, e: int, rows: tuple, h: np.ndarray, y: np.ndarray) -> None:
    """The expert kernels `kb` of rows of blocks (gate, up, down `[E, O, row bytes]`; gate and up as a pair)
    give the gate/up output `h` and the down output `y` of the same experts repacked."""
    gate, up, down = rows
    token, _, seg, expert = group_by_expert(index, e)
    h2 = np.empty_like(h)
    kb.gate_up(kb.activations(x), token, seg, expert, (gate, up), (gate, up), 3, h2)
    y2 = np.empty_like(y)
    kb.down(kb.activations(h2), seg, expert, down, down, 3, y2)
    assert_bits(h2, h)
    assert_bits(y2, y)


def q6_k_rows(q: np.ndarray, sc: np.ndarray, d: np.ndarray) -> np.ndarray:
    """llama.cpp's Q6_K rows (`ggml-common.h`'s block_q6_K: ql, qh, scales, d) of codes `q [R, n]` (0..63,
    value q - 32), int8 scales `sc [R, n / 16]` and fp16 `d [R, n / 256]`."""
    rows = q.shape[0]
    q = q.reshape(rows, -1, 2, 4, 32)  # block, half of 128, quarter of 32, l
    low = q & 15
    ql = np.stack([low[:, :, :, 0] | (low[:, :, :, 2] << 4), low[:, :, :, 1] | (low[:, :, :, 3] << 4)], axis=3)
    qh = sum((q[:, :, :, i] >> 4) << (2 * i) for i in range(4))
    ql, qh = ql.astype(np.uint8).reshape(rows, -1, 128), qh.astype(np.uint8).reshape(rows, -1, 64)
    scales = sc.astype(np.int8).view(np.uint8).reshape(rows, -1, 16)
    dbytes = d.astype("<f2").view(np.uint8).reshape(rows, -1, 2)
    return np.concatenate([ql, qh, scales, dbytes], axis=2).reshape(rows, -1)


def random_q6_k(rng, rows: int, in_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q6_K rows, and the INT8 codes (`q + 96`) and float32 scales (`d * sc`, exact) they hold."""
    q = rng.integers(0, 64, (rows, in_dim))
    sc = rng.integers(-128, 128, (rows, in_dim // 16))
    d = (rng.standard_normal((rows, in_dim // 256)) * 1e-3).astype(np.float16)
    scales = np.repeat(d.astype(np.float32), 16, axis=1) * sc.astype(np.float32)
    raw = q6_k_rows(q, sc, d)
    raw.flags.writeable = False
    return raw, (q + 96).astype(np.uint8), scales


def q4_k_rows(q: np.ndarray, sc: np.ndarray, mn: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
    """llama.cpp's Q4_K rows (`ggml-common.h`'s block_q4_K: d, dmin, 12 bytes of 6-bit scales and mins, qs) of
    codes `q [R, n]` (0..15), scales and mins `sc`, `mn [R, n / 32]` (0..63), fp16 `d`, `dmin [R, n / 256]`:
    `w = d * sc * q - dmin * mn`."""
    rows = q.shape[0]
    chunks = q.reshape(rows, -1, 4, 2, 32)  # block, chunk of 64 inputs, first or last 32, l
    qs = (chunks[:, :, :, 0] | (chunks[:, :, :, 1] << 4)).astype(np.uint8).reshape(rows, -1, 128)
    sc, mn = sc.reshape(rows, -1, 8), mn.reshape(rows, -1, 8)
    packed = np.zeros((*sc.shape[:2], 12), np.int64)  # ggml's quantize_row_q4_K packing
    packed[..., 0:4] = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    packed[..., 4:8] = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
    packed[..., 8:12] = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    head = [v.astype("<f2").view(np.uint8).reshape(rows, -1, 2) for v in (d, dmin)]
    return np.concatenate([*head, packed.astype(np.uint8), qs], axis=2).reshape(rows, -1)


def random_q4_k(rng, rows: int, in_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K rows, and the UINT4 codes (INT4's order) and rows of scales `d * sc` and mins `dmin * mn` they hold."""
    q = rng.integers(0, 16, (rows, in_dim))
    sc, mn = (rng.integers(0, 64, (rows, in_dim // 32)) for _ in range(2))
    d, dmin = ((rng.standard_normal((rows, in_dim // 256)) * 1e-3).astype(np.float16) for _ in range(2))
    scales, mins = (np.repeat(v.astype(np.float32), 8, axis=1) * u.astype(np.float32) for v, u in ((d, sc), (dmin, mn)))
    groups = q.reshape(rows, -1, 2, 16)
    codes = (groups[:, :, 0] | (groups[:, :, 1] << 4)).astype(np.uint8).reshape(rows, -1)
    raw = q4_k_rows(q, sc, mn, d, dmin)
    raw.flags.writeable = False
    return raw, codes, affine_rows(UINT4, 32, codes.shape[1], scales, mins)


def iq4_xs_rows(q: np.ndarray, ls: np.ndarray, d: np.ndarray) -> np.ndarray:
    """llama.cpp's IQ4_XS rows (block_iq4_xs: d, scales_h, scales_l, qs) of nibble indices `q [R, n]` (0..15, into
    `IQ4_VALUES`), 6-bit scales `ls [R, n / 32]` (value `ls - 32`) and fp16 `d [R, n / 256]`."""
    rows = q.shape[0]
    groups = q.reshape(rows, -1, 8, 2, 16)  # block, group of 32, first or last 16, j
    qs = (groups[:, :, :, 0] | (groups[:, :, :, 1] << 4)).astype(np.uint8).reshape(rows, -1, 128)
    ls = ls.reshape(rows, -1, 8)
    high = sum(((ls[..., j] >> 4) & 3) << (2 * j) for j in range(8)).astype("<u2")
    low = (ls[..., 0::2] & 15) | ((ls[..., 1::2] & 15) << 4)
    head = [d.astype("<f2").view(np.uint8).reshape(rows, -1, 2), high.view(np.uint8).reshape(rows, -1, 2)]
    return np.concatenate([*head, low.astype(np.uint8), qs], axis=2).reshape(rows, -1)


def random_iq4_xs(rng, rows: int, in_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IQ4_XS rows, and the IQ4NL codes (INT4's order) and float32 scales `d * (ls - 32)` (exact) they hold."""
    q = rng.integers(0, 16, (rows, in_dim))
    ls = rng.integers(0, 64, (rows, in_dim // 32))
    d = (rng.standard_normal((rows, in_dim // 256)) * 1e-3).astype(np.float16)
    scales = np.repeat(d.astype(np.float32), 8, axis=1) * (ls - 32).astype(np.float32)
    groups = q.reshape(rows, -1, 2, 16)
    codes = (groups[:, :, 0] | (groups[:, :, 1] << 4)).astype(np.uint8).reshape(rows, -1)
    raw = iq4_xs_rows(q, ls, d)
    raw.flags.writeable = False
    return raw, codes, scales


SUPER_BLOCK_TYPES = {  # in-place format -> (the format it runs as, group, rows and what they hold)
    "q6_k": (INT8, 16, random_q6_k),
    "q4_k": (UINT4, 32, random_q4_k),
    "iq4_xs": (IQ4NL, 32, random_iq4_xs),
}


@pytest.mark.parametrize("isa", RUNNABLE + EMULATED)
@pytest.mark.parametrize("block_type", list(SUPER_BLOCK_TYPES))
def test_super_block_rows_read_in_place(isa: str, block_type: str) -> None:
    """Q6_K, Q4_K and IQ4_XS rows as a GGUF file holds them give the bits of the formats they are repacked into
    (INT8 with group 16 and float32 scales `d * sc`; UINT4 with group 32, scales `d * sc` and mins `dmin * m`;
    IQ4NL with group 32 and scales `d * (ls - 32)`), the codes and scales put together from the blocks in the
    kernel; through the expert kernels too. With activations of a scale a group, and of one a super-block of 256
    (llama.cpp's Q8_K, as a GGUF file's weights take them)."""
    rng = np.random.default_rng(6)
    fmt, g, rows_of = SUPER_BLOCK_TYPES[block_type]
    backend = int8dot.Backend(isa) if isa in EMULATED else int8dot.select_backend(isa)
    for activations in ("group", "q8_k"):
        kb = backend.kernels(block_type, g, SCALE_F32, activations)
        for out_dim, in_dim in ((5, 256), (13, 768)):
            raw, codes, scales = rows_of(rng, out_dim, in_dim)
            for tokens in (1, 3, 17):
                x = random_tokens(rng, tokens, in_dim)
                xq, a = ref_activations(x, g, activations)
                y = kb.linear(kb.activations(x), raw, raw, 8)
                assert_bits(y, ref_dots(fmt, g, codes, scales, SCALE_F32, xq, a))
                assert_bits(kb.linear_x(x, raw, raw, 8), y)
    if isa not in PRIMARY:
        return
    e, inter, hidden = 4, 256, 512
    gate, up, down = (
        [rows_of(rng, rows, cols) for _ in range(e)] for rows, cols in ((inter, hidden),) * 2 + ((hidden, inter),)
    )
    w13 = np.stack([np.concatenate([gate[i][1], up[i][1]]) for i in range(e)])
    s13 = np.stack([np.concatenate([gate[i][2], up[i][2]]) for i in range(e)])
    w2, s2 = (np.stack([m[j] for m in down]) for j in (1, 2))
    x, index = random_tokens(rng, 9, hidden), route(rng, 9, 3, e)
    k = kernels(isa, fmt, g, SCALE_F32, activations="q8_k")
    _, _, _, _, h, y = run_experts(k, x, index, e, w13, s13, w2, s2, inter)
    assert_block_experts(kb, x, index, e, tuple(np.stack([m[0] for m in mats]) for mats in (gate, up, down)), h, y)


def route(rng, tokens: int, top_k: int, e: int) -> np.ndarray:
    """Top-k of a few experts only (some get no token); -1 marks a pair computed elsewhere."""
    index = np.stack([rng.permutation(min(e, top_k + 2))[:top_k] for _ in range(tokens)]).astype(np.int64)
    index[rng.random(index.shape) < 0.15] = -1
    return index


def run_experts(k, x, index, e, w13, s13, w2, s2, inter, rows: int = 3):
    token, slot, seg, expert = group_by_expert(index, e)
    h = np.empty((len(token), inter), np.float32)
    k.gate_up(k.activations(x), token, seg, expert, w13, s13, rows, h)
    y = np.empty((len(token), x.shape[1]), np.float32)
    k.down(k.activations(h), seg, expert, w2, s2, rows, y)
    return token, slot, seg, expert, h, y


EXPERT_SHAPES = [(10, 40, 72), (6, 97, 200), (9, 260, 130)]  # (experts, inter, hidden)
ROUTING = [(1, 1), (1, 8), (3, 2), (17, 6), (300, 3), (17, 4)]  # (tokens, top-k)


@pytest.mark.parametrize(
    ("isa", "fmt", "g", "kind", "e", "inter", "hidden", "tokens", "top_k"),
    [(isa, *SPECS[i % 4], *EXPERT_SHAPES[i % 3], *ROUTING[i]) for isa in PRIMARY for i in range(len(ROUTING))]
    + [(isa, *spec, *EXPERT_SHAPES[2], *ROUTING[3]) for isa in RUNNABLE[1:] for spec in SHIPPED],
)
def test_experts(isa: str, fmt: int, g: int, e: int, inter: int, hidden: int, tokens: int, top_k: int, kind: int):
    check_experts(isa, fmt, g, e, inter, hidden, tokens, top_k, kind)


@pytest.mark.parametrize(("isa", "fmt", "g", "kind"), [(isa, *spec) for isa in PRIMARY for spec in BLOCK_SPECS])
def test_block_formats_experts(isa: str, fmt: int, g: int, kind: int) -> None:
    check_experts(isa, fmt, g, 6, 97, 200, 17, 4, kind)


@pytest.mark.parametrize(
    ("isa", "fmt", "g", "kind"),
    [(isa, fmt, g, kind) for isa in EMULATED for fmt, g, kind in SHIPPED],
)
def test_experts_emulated_vnni(isa: str, fmt: int, g: int, kind: int) -> None:
    """The expert kernels around the VNNI row code (tiles of 4, 2 and 1 tokens included)."""
    check_experts(isa, fmt, g, 9, 260, 130, 17, 6, kind)


def check_experts(isa: str, fmt: int, g: int, e: int, inter: int, hidden: int, tokens: int, top_k: int, kind: int):
    top_k = min(top_k, e)
    rng = np.random.default_rng(e * 1000 + inter + tokens + g)
    w13, s13, w2, s2 = random_experts(rng, fmt, g, e, inter, hidden, kind)
    x = random_tokens(rng, tokens, hidden)
    index = route(rng, tokens, top_k, e)
    k = kernels(isa, fmt, g, kind)
    token, _, seg, expert, h, y = run_experts(k, x, index, e, w13, s13, w2, s2, inter)

    xq, a = ref_activations(x, g)
    hq, ha = ref_activations(h, g)
    for u, ex in enumerate(expert):
        pairs = np.arange(seg[u], seg[u + 1])
        t = token[pairs]
        gate_up = ref_dots(fmt, g, w13[ex], s13[ex], kind, xq[t], a[t])  # [n, 2I]
        assert_bits(h[pairs], silu_rows(gate_up[:, :inter], gate_up[:, inter:]))
        assert_bits(y[pairs], ref_dots(fmt, g, w2[ex], s2[ex], kind, hq[pairs], ha[pairs]))
        if u == 0:  # and the math, in float64
            gu64 = dequantized(fmt, g, w13[ex], s13[ex], kind, hidden)
            gate_up64 = (xq[t] * np.repeat(a[t], g, axis=1))[:, :hidden] @ gu64.T
            assert np.allclose(gate_up, gate_up64, rtol=1e-4, atol=1e-4 * np.abs(gate_up64).max())
            assert_close(y[pairs], dequantized(fmt, g, w2[ex], s2[ex], kind, inter), hq[pairs], ha[pairs], g)


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize(("fmt", "g", "kind"), [*SHIPPED, SPECS[3]])
def test_gate_up_quantizes_h_for_down_as_quantizing_it_after(isa: str, fmt: int, g: int, kind: int) -> None:
    """`gate_up` given room for `down`'s quantized activations (`_fusing_room`, rows across lanes) quantizes each
    task's columns of h itself, where tasks hold whole groups: the bits `quantize` gives the float h it writes
    otherwise. 272 rows (a task of 256 and one of 16 on AMX; the last group ragged), tasks of 16 rows (which split
    groups: not fused) and 128, 1, 17 and 300 tokens."""
    rng = np.random.default_rng(g + fmt + kind + 2)
    e, inter, hidden = 4, 272, 208
    w13, s13, w2, s2 = random_experts(rng, fmt, g, e, inter, hidden, kind)
    k = kernels(isa, fmt, g, kind, lanes=True)
    simd13, _, args = k.experts_args(k, *across_lanes(fmt, g, w13, s13), inter, *across_lanes(fmt, g, w2, s2), 64)
    g13, fmt13, g2, fmt2, w1, s1, w3, s3, up_row = args[:9]
    empty = (1, 0, np.zeros((0, 0), np.int8), np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int32))
    fused_any = False
    for tokens in (1, 17, 300):
        x = random_tokens(rng, tokens, hidden)
        token, _, seg, expert = group_by_expert(route(rng, tokens, 2, e), e)
        act = int8dot.quantize(x, g13, fmt13)
        for rows in (16, 128):
            common = (simd13, *act, token, seg, expert, w1, s1, w3, s3, up_row, rows, int8dot.task_count())
            h = np.empty((len(token), inter), np.float32)
            assert not int8dot.gate_up(*common, h, empty)
            quantized = int8dot._fusing_room(h, g2, fmt2)
            if int8dot.gate_up(*common, np.full_like(h, np.nan), quantized):
                fused_any = True
                for ours, want in zip(quantized[2:], int8dot.quantize(h, g2, fmt2), strict=True):
                    assert np.array_equal(ours, want)
            else:
                assert rows == 16 or len(token) == 0
    assert fused_any


# the task code is each format's `gate_up` and `down` (tested on every backend above): here the split of the tasks, in
# the layout with the most constraints on it (INT4 in rows across lanes: whole blocks of 16 rows)
@pytest.mark.parametrize("isa", PRIMARY)
def test_routed_and_shared_experts_in_the_same_regions_give_their_bits(isa: str) -> None:
    """`experts_shared` (a MoE block's routed and shared experts, gate and up rows in one parallel region, down rows
    in another, tasks of about equal bytes across both) gives the bits of `experts` called for each, the shared
    experts' sum added: 1, 3, 17 and 300 tokens (tiles of several tokens take tasks of the least rows), experts
    without a token, pairs computed elsewhere, shared experts wider than the routed ones."""
    fmt, g, kind = SPECS[0]
    rng = np.random.default_rng(g + fmt + kind + 1)
    e, inter, shared_inter, hidden = 6, 48, 96, 208
    routed, shared = (
        random_experts(rng, fmt, g, e, inter, hidden, kind),
        random_experts(rng, fmt, g, 1, shared_inter, hidden, kind),
    )
    routed, shared = (tuple(a for i in (0, 2) for a in across_lanes(fmt, g, *w[i : i + 2])) for w in (routed, shared))
    k = kernels(isa, fmt, g, kind, lanes=True)
    for tokens in (1, 3, 17, 300):
        x = random_tokens(rng, tokens, hidden)
        index = route(rng, tokens, 2, e)
        weights = rng.random(index.shape).astype(np.float32)
        apart = np.empty((2, tokens, hidden), np.float32)
        k.experts(k, x, index, weights, routed[0], routed[1], inter, *routed[2:], 16, apart[0])
        ones = (np.zeros((tokens, 1), np.int64), np.ones((tokens, 1), np.float32))
        k.experts(k, x, *ones, shared[0], shared[1], shared_inter, *shared[2:], 16, apart[1])
        simd13, simd2, routed_args = k.experts_args(k, routed[0], routed[1], inter, *routed[2:], 16)
        shared_args = k.experts_args(k, shared[0], shared[1], shared_inter, *shared[2:], 16)[2]
        out = np.empty((tokens, hidden), np.float32)
        h_rows, y_rows = np.empty((index.size, inter), np.float32), np.empty((index.size, hidden), np.float32)
        used = int8dot.experts_shared(simd13, simd2, routed_args, simd13, simd2, shared_args, x, index, weights,
                                      int8dot.task_count(), out, h_rows, y_rows)  # fmt: skip
        assert used == len(np.unique(index[index >= 0]))
        assert_bits(out, apart[0] + apart[1])


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("fmt", [INT4, INT8])
def test_token_alone_or_tiled_gives_the_same_bits(isa: str, fmt: int) -> None:
    rng = np.random.default_rng(5)
    _, g, kind = next(spec for spec in SPECS if spec[0] == fmt)
    e, inter, hidden = 4, 97, 200
    w13, s13, w2, s2 = random_experts(rng, fmt, g, e, inter, hidden, kind)
    x = random_tokens(rng, 11, hidden)
    index = np.tile(np.arange(3, dtype=np.int64), (11, 1))  # every token to experts 0, 1, 2: tiles of 4, 4, 2, 1
    k = kernels(isa, fmt, g, kind)
    token, _, _, _, h, y = run_experts(k, x, index, e, w13, s13, w2, s2, inter)
    for t in range(11):
        _, _, _, _, h1, y1 = run_experts(k, x[t : t + 1], index[t : t + 1], e, w13, s13, w2, s2, inter)
        mine = np.flatnonzero(token == t)
        assert_bits(h[mine], h1)
        assert_bits(y[mine], y1)
    linear_all = k.linear(k.activations(x), w2[0], s2[0], 4)
    for t in range(11):
        assert_bits(linear_all[t : t + 1], k.linear(k.activations(x[t : t + 1]), w2[0], s2[0], 4))


def ref_lane_dots(fmt: int, g: int, weights: np.ndarray, bits: np.ndarray, kind: int, xq: np.ndarray, a: np.ndarray):
    """`ref_dots` for rows across lanes (`simd.py`, "Rows across lanes"): per row and token, each group's exact
    integer sum, then `acc = fma(float(sum), sw * a, acc)` group by group."""
    t, ip = xq.shape
    codes = (natural_codes(fmt, g, weights) - OFFSET[fmt]).reshape(-1, ip // g, g)
    sums = np.einsum("okg,tkg->tok", codes, xq.reshape(t, ip // g, g))  # int64, exact
    scale = scale_values(bits, kind)[None, :, :] * a[:, None, :]  # float32 products
    acc = np.zeros(sums.shape[:2], np.float32)
    for k in range(ip // g):
        acc = fma32(sums[..., k].astype(np.float32), scale[..., k], acc)
    return acc


def across_lanes(fmt: int, g: int, w: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Experts' `[E, O, B]` codes and `[E, O, G]` scales laid out as rows across lanes, matrix by matrix."""
    laid = [int8dot.to_lanes(fmt, g, w[e], s[e]) for e in range(w.shape[0])]
    return np.stack([c for c, _ in laid]), np.stack([b for _, b in laid])


def lane_matrix(fmt: int, g: int, codes: np.ndarray) -> np.ndarray:
    """`[O, B]` row codes laid out by the definition in `simd.py`, independently of `to_lanes`: block by block,
    64-byte chunks of 4 bytes a row (INT4: inputs `8 c + j` low and `8 c + 4 + j` high nibbles)."""
    natural = natural_codes(fmt, g, codes)
    out = []
    for b in range(codes.shape[0] // 16):
        rows = natural[16 * b : 16 * b + 16]
        for c in range(codes.shape[1] // 4):
            for r in range(16):
                if fmt == INT4:
                    out += [rows[r, 8 * c + j] | rows[r, 8 * c + 4 + j] << 4 for j in range(4)]
                else:
                    out += [rows[r, 4 * c + j] for j in range(4)]
    return np.array(out, np.uint8).reshape(codes.shape)


@pytest.mark.parametrize(("fmt", "g"), [(INT4, 32), (INT4, 128), (INT8, 64)])
def test_rows_across_lanes_layout(fmt: int, g: int) -> None:
    rng = np.random.default_rng(g)
    w, bits = random_weights(rng, fmt, g, 48, 200, SCALE_BF16)
    laid, lane_bits = int8dot.to_lanes(fmt, g, w, bits)
    assert np.array_equal(laid, lane_matrix(fmt, g, w))
    assert np.array_equal(lane_bits.reshape(3, -1, 16), bits.reshape(3, 16, -1).transpose(0, 2, 1))
    back = int8dot.from_lanes(fmt, g, laid, lane_bits)
    assert np.array_equal(back[0], w) and np.array_equal(back[1], bits)
    with pytest.raises(ValueError, match="whole blocks of 16 rows"):
        int8dot.to_lanes(fmt, g, w[:40], bits[:40])


LANE_CASES = [(isa, *spec) for isa in PRIMARY for spec in SPECS] + [(isa, *spec) for isa in OTHERS for spec in SHIPPED]


@pytest.mark.parametrize(("isa", "fmt", "g", "kind"), LANE_CASES)
def test_rows_across_lanes(isa: str, fmt: int, g: int, kind: int) -> None:
    """Experts stored as rows across lanes give the bits of `ref_lane_dots` (and are close to float64): 1, 3, 17
    and 300 tokens (tiles of 8, 4, 2 and 1; the tiles after an expert's first read its rows from cache, which on
    16-lane isas go two blocks a pass: a pair and a block alone in tasks of 48 rows), ragged last groups, experts
    without a token, tasks of 16 and 48 rows (and of 8: an error, they would split a block); each token alone gives
    the bits it gives among others."""
    rng = np.random.default_rng(g + fmt + kind)
    e, inter, hidden = 4, 48, 208
    w13, s13, w2, s2 = random_experts(rng, fmt, g, e, inter, hidden, kind)
    (l13, b13), (l2, b2) = across_lanes(fmt, g, w13, s13), across_lanes(fmt, g, w2, s2)
    k = kernels(isa, fmt, g, kind, lanes=True)
    for tokens in (1, 3, 17, 300):
        x = random_tokens(rng, tokens, hidden)
        index = route(rng, tokens, 2, e)
        xq, a = ref_activations(x, g)
        for rows in (16, 48):
            token, _, seg, expert, h, y = run_experts(k, x, index, e, l13, b13, l2, b2, inter, rows)
            hq, ha = ref_activations(h, g)
            for u, ex in enumerate(expert):
                pairs = np.arange(seg[u], seg[u + 1])
                gate_up = ref_lane_dots(fmt, g, w13[ex], s13[ex], kind, xq[token[pairs]], a[token[pairs]])
                assert_bits(h[pairs], silu_rows(gate_up[:, :inter], gate_up[:, inter:]))
                assert_bits(y[pairs], ref_lane_dots(fmt, g, w2[ex], s2[ex], kind, hq[pairs], ha[pairs]))
                if u == 0:
                    w64 = dequantized(fmt, g, w2[ex], s2[ex], kind, inter)
                    assert_close(y[pairs], w64, hq[pairs], ha[pairs], g)
        if tokens == 17:
            for t in range(tokens):
                mine = np.flatnonzero(token == t)
                *_, h1, y1 = run_experts(k, x[t : t + 1], index[t : t + 1], e, l13, b13, l2, b2, inter, 16)
                assert_bits(h[mine], h1)
                assert_bits(y[mine], y1)
    with pytest.raises(ValueError, match="whole blocks of 16 rows"):
        run_experts(k, x, index, e, l13, b13, l2, b2, inter, 8)


def test_rows_across_lanes_need_the_integer_kernels() -> None:
    with pytest.raises(ValueError, match="integer kernels"):
        int8dot.select_backend("float").kernels("int4_lanes", 64, SCALE_BF16)


@pytest.mark.parametrize(("fmt", "g", "kind"), SHIPPED)
def test_float_backend_is_close(fmt: int, g: int, kind: int) -> None:
    rng = np.random.default_rng(g)
    e, inter, hidden = 5, 97, 130
    w13, s13, w2, s2 = random_experts(rng, fmt, g, e, inter, hidden, kind)
    x = rng.standard_normal((6, hidden)).astype(np.float32)
    index = route(rng, 6, 3, e)
    k = int8dot.select_backend("float").kernels(FORMATS[fmt], g, kind)
    token, _, seg, expert, h, y = run_experts(k, x, index, e, w13, s13, w2, s2, inter)
    for u, ex in enumerate(expert):
        pairs = np.arange(seg[u], seg[u + 1])
        gu = x[token[pairs]].astype(np.float64) @ dequantized(fmt, g, w13[ex], s13[ex], kind, hidden).T
        with np.errstate(over="ignore"):  # exp of large negative gates: silu -> 0
            h64 = gu[:, :inter] / (1 + np.exp(-gu[:, :inter])) * gu[:, inter:]
        assert np.allclose(h[pairs], h64, rtol=1e-4, atol=1e-4 * np.abs(h64).max())
        y64 = h[pairs].astype(np.float64) @ dequantized(fmt, g, w2[ex], s2[ex], kind, inter).T
        assert np.allclose(y[pairs], y64, rtol=1e-4, atol=1e-4 * np.abs(y64).max())
    x = rng.standard_normal((6, inter)).astype(np.float32)
    y = k.linear(k.activations(x), w2[0], s2[0], 8)
    y64 = x.astype(np.float64) @ dequantized(fmt, g, w2[0], s2[0], kind, inter).T
    assert np.allclose(y, y64, rtol=1e-4, atol=1e-4 * np.abs(y64).max())


def test_activations_must_fit_the_weights() -> None:
    isa = RUNNABLE[0] if RUNNABLE else pytest.skip("no integer backend on this CPU")
    k = int8dot.select_backend(isa).kernels("int8", 32, SCALE_BF16)
    weights, bits = random_weights(np.random.default_rng(0), INT8, 32, 4, 256, SCALE_BF16)
    with pytest.raises(ValueError, match="too short"):
        k.linear(k.activations(np.ones((1, 64), np.float32)), weights, bits, 2)
    with pytest.raises(ValueError, match="do not fit"):
        k.linear(k.activations(np.ones((1, 256), np.float32)), weights, np.ascontiguousarray(bits[:, :4]), 2)
    with pytest.raises(ValueError, match="contiguous"):
        k.linear(k.activations(np.ones((1, 256), np.float32)), weights[:, ::-1], bits, 2)


def test_timed_clocks_every_kernel_call_and_puts_the_entry_points_back() -> None:
    isa = RUNNABLE[0] if RUNNABLE else pytest.skip("no integer backend on this CPU")
    k = int8dot.select_backend(isa).kernels("int4", 64, SCALE_BF16)
    weights, bits = random_weights(np.random.default_rng(1), INT4, 64, 40, 200, SCALE_BF16)
    x = random_tokens(np.random.default_rng(2), 3, 200)
    untimed = k.linear(k.activations(x), weights, bits, 8)
    entry = (int8dot.gate_up, int8dot.down, int8dot.quantize)
    with int8dot.timed() as clock:
        timed = k.linear(k.activations(x), weights, bits, 8)
        k.down(k.activations(x), np.array([0, 3]), np.zeros(1, np.int64), weights[None], bits[None], 8, timed)
    np.testing.assert_array_equal(timed, untimed)
    assert clock.calls == 4 and clock.weights_s > 0 and clock.activations_s > 0
    assert (int8dot.gate_up, int8dot.down, int8dot.quantize) == entry
    with pytest.raises(ValueError), int8dot.timed() as clock:  # an error inside: clocked, and put back too
        k.linear(k.activations(np.ones((1, 64), np.float32)), weights, bits, 8)
    assert clock.calls == 2 and (int8dot.gate_up, int8dot.down, int8dot.quantize) == entry


# --- INT8 weight format -------------------------------------------------------------------------


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("out_dim", "in_dim"), [(1, 1), (7, 100), (40, 72), (130, 257)])
def test_int8_quantizer_matches_reference(out_dim, in_dim, group, sdtype, wdtype) -> None:
    gen = torch.Generator().manual_seed(out_dim + in_dim + group)
    mags = torch.tensor([0.0, 1e-41, 1e-7, 3e-3, 1.0, 5e3, 1e6], dtype=torch.float64)
    w = torch.randn(out_dim, in_dim, generator=gen, dtype=torch.float64) * mags[torch.arange(out_dim) % len(mags), None]
    w = w.to(wdtype)
    ours, ours_scales = int8dot.quantize_int8_fast(w, group, sdtype)
    ref, ref_scales = quantize_int8(w, group, sdtype)
    assert ours.shape == ref.shape == (out_dim, -(-in_dim // group) * group)
    assert torch.equal(ours_scales.view(torch.uint16), ref_scales.view(torch.uint16))
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("sdtype", [torch.bfloat16, torch.float16])
def test_int8_round_trip(sdtype: torch.dtype) -> None:
    w = torch.randn(33, 200, generator=torch.Generator().manual_seed(0))
    weights, scales = quantize_int8(w, 64, sdtype)
    assert int(weights.min()) >= 1  # q = -128 never occurs
    back = dequantize_int8(weights, scales, 64, 200)
    step = scales.float().repeat_interleave(64, dim=1)[:, :200]
    assert torch.all((back - w).abs() <= 0.5 * step * (1 + 1e-6) + 1e-3 * step)


# --- instruction sets this machine may lack: compiled, never run --------------------------------

COMPILE_ONLY = textwrap.dedent(
    """
    import sys
    import numpy as np
    from numba import njit
    from hetero_moe.kernels.numba.simd import Simd, span_dots

    @njit
    def dots(simd, w, scales, xq, ascale, bias, rows, out):
        span_dots(simd, 1, w, scales, xq, ascale, bias, rows, out)
        span_dots(simd, 2, w, scales, xq, ascale, bias, rows, out)
        span_dots(simd, 4, w, scales, xq, ascale, bias, rows, out)

    arrays = (np.zeros((2, 64), np.uint8), np.zeros((2, 4), np.uint16), np.zeros((2, 128), np.int8),
              np.zeros((2, 4), np.float32), np.zeros((2, 16), np.int32), np.zeros(4, np.int64),
              np.zeros((4, 2), np.float32))
    from numba import typeof
    for fmt, g in ((4, 32), (8, 128)):
        sig = tuple(typeof(a) for a in (Simd(sys.argv[1], fmt, g, int(fmt == 8)), *arrays))
        dots.compile(sig)
        for line in dots.inspect_asm(sig).splitlines():
            if "vpdpbusd" in line or "vpmaddubsw" in line:
                print(fmt, g, line.strip())
    """
)


@pytest.mark.parametrize(
    ("isa", "cpu", "features", "register", "prefix"),
    [
        ("avx512vnni", "znver4", "+avx512f,+avx512bw,+avx512vl,+avx512vnni", "%zmm", "vpdpbusd"),
        ("avxvnni", "alderlake", "+avxvnni,+avx2,+fma", "%ymm", "{vex}\tvpdpbusd"),
        ("avx2", "haswell", "+avx2,+fma", "%ymm", "vpmaddubsw"),
    ],
)
def test_compiles_for_other_cpus(tmp_path, isa: str, cpu: str, features: str, register: str, prefix: str) -> None:
    env = {**os.environ, "NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": features, "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", COMPILE_ONLY, isa], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    for fmt, g in ((4, 32), (8, 128)):
        mine = [line for line in lines if line.startswith(f"{fmt} {g} ")]
        assert mine and all(prefix in line and register in line for line in mine), lines
    if isa != "avx2":
        assert not any("vpmaddubsw" in line for line in lines)


AMX_COMPILE_ONLY = textwrap.dedent(
    """
    import numpy as np
    from numba import njit
    from hetero_moe.kernels.numba.amx import amx_room, tile_rounds
    from hetero_moe.kernels.numba.int8dot import dots
    from hetero_moe.kernels.numba.simd import INT4_LANES, INT8_LANES, Simd

    @njit
    def many(simd, w, scales, xq, ascale, bias, rows, out):
        room = amx_room(simd, w, 16)
        dots(simd, 16, w, scales, xq, ascale, bias, rows, out, False, room, False)
        dots(simd, 9, w, scales, xq, ascale, bias, rows, out, True, room, False)
        return tile_rounds(3)

    for fmt, g, row_bytes in ((INT4_LANES, 64, 64), (INT8_LANES, 32, 128)):
        arrays = (np.zeros((16, row_bytes), np.uint8), np.zeros((16, 128 // g), np.uint16),
                  np.zeros((16, 128), np.int8), np.zeros((16, 128 // g), np.float32),
                  np.zeros((16, 128 // g), np.int32), np.zeros(16, np.int64), np.zeros((16, 16), np.float32))
        arrays[0].flags.writeable = arrays[1].flags.writeable = False
        from numba import typeof
        sig = tuple(typeof(a) for a in (Simd("avx512amx", fmt, g), *arrays))
        many.compile(sig)
        for line in many.inspect_asm(sig).splitlines():
            if any(op in line for op in ("tdpbssd", "tileloadd", "tilestored", "ldtilecfg", "tilerelease")):
                print(fmt, line.split()[0])
    """
)


def test_amx_compiles_for_sapphire_rapids(tmp_path) -> None:
    """The AMX backend's code, compiled for a CPU with AMX in a subprocess on any machine: tile products of signed
    bytes, tile loads and stores, each call loading its configuration and releasing the tiles."""
    features = "+avx2,+fma,+f16c,+avx512f,+avx512bw,+avx512vl,+avx512vnni,+amx-tile,+amx-int8"
    env = {**os.environ, "NUMBA_CPU_NAME": "sapphirerapids", "NUMBA_CPU_FEATURES": features}
    env["NUMBA_CACHE_DIR"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", AMX_COMPILE_ONLY], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for fmt in (14, 15):  # INT4_LANES, INT8_LANES
        ops = {line.split()[1] for line in out.stdout.splitlines() if line.startswith(f"{fmt} ")}
        assert ops == {"tdpbssd", "tileloadd", "tilestored", "ldtilecfg", "tilerelease"}, out.stdout


@pytest.mark.parametrize("g", GROUPS)
def test_amx_tile_configuration(g: int) -> None:
    """Palette 1; C tiles of 16 rows of 64 bytes, A tiles 16 tokens of a tile product's inputs, B tiles a row of 64
    bytes for each 4 of them; the other tiles unconfigured."""
    from hetero_moe.kernels.numba.amx import TILES_A, TILES_B, TILES_C, tile_config

    config = np.array(tile_config(g), np.uint8)
    colsb, rows = config[16:32].view(np.uint16), config[48:56]
    k = min(g, 64)
    assert config[0] == 1 and not config[1:16].any() and not config[32:48].any() and not config[56:].any()
    for tiles, want_rows, want_colsb in ((TILES_C, 16, 64), (TILES_A, 16, k), (TILES_B, k // 4, 64)):
        assert all(rows[t] == want_rows and colsb[t] == want_colsb for t in tiles)
    unused = set(range(8)) - {*TILES_C, *TILES_A, *TILES_B}
    assert unused and not any(rows[t] or colsb[t] for t in unused)


@pytest.mark.skipif("avx512amx" not in RUNNABLE, reason="no AMX on this CPU, or the OS does not grant it")
def test_amx_peak_loop_runs() -> None:
    """`tile_rounds` (`bench experts`' AMX peak) runs its products on zeroed tiles: C stays 0."""
    from hetero_moe.kernels.numba.amx import tile_rounds

    run = njit(lambda rounds: tile_rounds(rounds))
    assert run(0) == 0 and run(100) == 0


@pytest.mark.skipif("avx512amx" not in RUNNABLE, reason="no AMX on this CPU, or the OS does not grant it")
@pytest.mark.parametrize(("fmt", "g", "kind"), SPECS)
def test_amx_long_rows_and_many_tokens(fmt: int, g: int, kind: int) -> None:
    """Rows of 1,408 inputs (three chunks of `amx.CHUNK`, the last one short: each tile of tokens keeps its
    accumulators from chunk to chunk) times 8, 17, 40 and 300 tokens (one tile, a ragged one, several, and calls of
    at most `AMX_TOKENS`) on AMX give the bits of `ref_lane_dots`."""
    from hetero_moe.kernels.numba.amx import AMX_TOKENS, CHUNK

    inputs = 1408
    assert 2 * CHUNK < inputs < 3 * CHUNK and 2 * AMX_TOKENS < 300
    rng = np.random.default_rng(g + fmt)
    w, bits = random_weights(rng, fmt, g, 48, inputs, kind)
    laid, lane_bits = int8dot.to_lanes(fmt, g, w, bits)
    k = kernels("avx512amx", fmt, g, kind, lanes=True)
    for tokens in (8, 17, 40, 300):
        x = random_tokens(rng, tokens, inputs)
        xq, a = ref_activations(x, g)
        assert_bits(k.linear(k.activations(x), laid, lane_bits, 16), ref_lane_dots(fmt, g, w, bits, kind, xq, a))


@pytest.mark.parametrize("isa", RUNNABLE + EMULATED)
def test_the_peak_loop_runs_every_dot_product(isa: str) -> None:
    """`dot_rounds` (`bench experts`' int8 peak): lane 0 of each chain starts at its number and adds, every
    round, u . s over its 4 bytes, u = (r, 3, 3, 3) and s = (5, r, 5, 5) for r rounds (a byte); and the compiled
    loop holds one dot product a chain (none hoisted out of it, none shared)."""
    from hetero_moe.kernels.numba.simd import Simd, dot_rounds, peak_chains

    run = njit(lambda simd, rounds: dot_rounds(simd, rounds))
    chains = peak_chains(isa)
    for rounds in (0, 1, 10, 100):
        per_round = rounds * 5 + 3 * rounds + 3 * 5 * 2
        assert run(Simd(isa, INT8, 32), rounds) == sum(range(chains)) + chains * rounds * per_round
    if isa in RUNNABLE:
        (asm,) = run.inspect_asm().values()
        products = asm.count("vpmaddubsw") if isa == "avx2" else asm.count("vpdpbusd")
        assert products >= chains
