"""llama.cpp's block types, repacked losslessly into the layouts of the int8-activation kernels.

Every weight of a block is `s * code - m` (or `s * (code - offset)`) with small integer codes and float
scales that are exact in float32 (an fp16 times a 6- or 8-bit integer), so each type maps onto one
kernel format (`kernels/numba/int8dot.py`, `simd.py`) without changing a value:

| type | block | runs as | group | scales |
|---|---|---|---|---|
| Q4_0 | 32 | q4_0: int4 (offset 8), in place | 32 | fp16 `d` |
| Q8_0 | 32 | q8_0: int8 (offset 128), in place | 32 | fp16 `d` |
| Q5_0 | 32 | int8 | 32 | fp16 `d` |
| IQ4_NL | 32 | iq4nl (the nibble looked up) | 32 | fp16 `d` |
| Q4_1 | 32 | uint4, `m = -min` | 32 | float32 |
| Q5_1 | 32 | uint8, `m = -min` | 32 | float32 |
| Q4_K | 256 | q4_k: uint4, `s = d * sc`, `m = dmin * mn`, in place | 32 | float32 |
| Q5_K | 256 | uint8, as Q4_K | 32 | float32 |
| Q6_K | 256 | q6_k: int8 (`q + 96`), `s = d * sc`, in place | 16 | float32 |
| IQ4_XS | 256 | iq4_xs: iq4nl, `s = d * (ls - 32)`, in place | 32 | float32 |

Q4_0, Q8_0, Q4_K, Q6_K and IQ4_XS need not be repacked at all: their kernels read the rows of the file's memory map
as they are (`simd.py`, "Rows of blocks"). Q4_0 and Q8_0 have a second way, `LANE_REPACK`: repacked once (and
cached) into rows across lanes, INT4 and INT8 g32 exactly, which run faster than the file's rows. The bit layouts
are llama.cpp's (`ggml-common.h`); `gguf.quants` dequantizes them the same way, and the tests check every type
against it. Nibble formats keep a group's inputs `j` and `j + g/2` in the low and high nibble of its byte `j`
(Q4_0's order, which Q4_K's 64-input chunks are rearranged into); the others hold one code a byte. Where a type
takes more bytes here than in the file (float32 scales, 5- and 6-bit codes widened to bytes), `Repack.row_bytes`
says so and the memory counts it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from hetero_moe.kernels.numba.int4 import SCALE_FP16
from hetero_moe.kernels.numba.int8dot import FORMATS, across_lanes, from_lanes, to_lanes
from hetero_moe.kernels.numba.repack import q4_0_lanes, q8_0_lanes
from hetero_moe.kernels.numba.simd import (
    AFFINE,
    BLOCK_ROWS,
    IQ4_LOOKUP,
    IQ4NL,
    LANE_ROWS,
    LANES,
    NIBBLES,
    OFFSETS,
    SCALE_F32,
    spans,
)

BLOCK = 32  # inputs per block of the small types
CHUNK = 1 << 18  # bytes of blocks repacked at a time
SUPER = 256  # inputs per block of the K-quants and IQ4_XS


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at bytes `at, at + 1` of each block `b [R, nb, bytes]`, as float32 `[R, nb]`."""
    return np.ascontiguousarray(b[..., at : at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _pack(codes: np.ndarray) -> np.ndarray:
    """Codes `[R, n]` (0..15, n a multiple of 32) -> nibbles in Q4_0's order `[R, n / 2]`."""
    g = codes.reshape(*codes.shape[:-1], -1, 2, BLOCK // 2)
    return (g[..., 0, :] | (g[..., 1, :] << 4)).reshape(*codes.shape[:-1], -1)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """Bit `i` of the little-endian bytes `qh [..., count / 8]`, for `i < count`, as `[..., count]` 0/1."""
    return np.unpackbits(qh, axis=-1, count=count, bitorder="little")


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes `[R, nb, 12]` -> 6-bit scales and mins `[R, nb, 8]` (llama.cpp's get_scale_min_k4)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 128 bytes `[R, nb, 128]` -> codes `[R, nb, 256]` in input order: each 32-byte chunk
    holds 64 inputs, the first 32 in its low nibbles."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return ((chunks >> np.array([0, 4], np.uint8).reshape(2, 1)) & 15).reshape(*qs.shape[:-1], SUPER)


# unpackers: blocks `[R, nb, bytes]` -> (codes in the kernel layout `[R, ...]` uint8, scales `[R, G]`
# float32, mins `[R, G]` float32 or None)


def _q4_0(b):
    return b[..., 2:].reshape(b.shape[0], -1), _f16(b, 0), None


def _q8_0(b):
    return (b[..., 2:] ^ np.uint8(0x80)).reshape(b.shape[0], -1), _f16(b, 0), None


def _q5_0(b):
    nib = b[..., 6:]
    low = np.concatenate([nib & 15, nib >> 4], axis=-1)  # inputs 0..15, 16..31
    q = low | (_high_bits(b[..., 2:6], 32) << 4)  # 0..31, value q - 16
    return (q + np.uint8(112)).reshape(b.shape[0], -1), _f16(b, 0), None


def _q4_1(b):
    return b[..., 4:].reshape(b.shape[0], -1), _f16(b, 0), -_f16(b, 2)


def _q5_1(b):
    nib = b[..., 8:]
    low = np.concatenate([nib & 15, nib >> 4], axis=-1)
    return (low | (_high_bits(b[..., 4:8], 32) << 4)).reshape(b.shape[0], -1), _f16(b, 0), -_f16(b, 2)


def _k_affine(b):
    sc, mn = _k_scales(b[..., 4:16])
    d, dmin = _f16(b, 0)[..., None], _f16(b, 2)[..., None]
    return (d * sc).reshape(b.shape[0], -1), (dmin * mn).reshape(b.shape[0], -1)


def _q4_k(b):
    scales, mins = _k_affine(b)
    return _pack(_k_nibbles(b[..., 16:]).reshape(b.shape[0], -1)), scales, mins


def _q5_k(b):
    scales, mins = _k_affine(b)
    high = _high_bits(b[..., 16:48], SUPER).reshape(*b.shape[:-1], 32, 8).swapaxes(-1, -2).reshape(*b.shape[:-1], -1)
    return (_k_nibbles(b[..., 48:]) | (high << 4)).reshape(b.shape[0], -1), scales, mins


def _q6_k(b):
    ql, qh, sc = b[..., :128], b[..., 128:192], b[..., 192:208]
    halves = []
    for h in range(2):  # 128 inputs each: ql's 64 bytes (low nibbles first), qh's 32 (2 bits x 4)
        low = ql[..., 64 * h : 64 * h + 64]
        low = np.concatenate([low & 15, low >> 4], axis=-1)
        high = qh[..., 32 * h : 32 * h + 32]
        high = np.concatenate([(high >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)
        halves.append(low | (high << 4))
    q = np.concatenate(halves, axis=-1)  # 0..63, value q - 32
    scales = _f16(b, 208)[..., None] * sc.view(np.int8).astype(np.float32)
    return (q + np.uint8(96)).reshape(b.shape[0], -1), scales.reshape(b.shape[0], -1), None


def _iq4_xs(b):
    low = b[..., 4:8]
    low = np.stack([low & 15, low >> 4], axis=-1).reshape(*b.shape[:-1], 8)
    high = np.ascontiguousarray(b[..., 2:4]).view(np.uint16)[..., 0:1] >> (2 * np.arange(8, dtype=np.uint16))
    ls = (low | ((high & 3).astype(np.uint8) << 4)).astype(np.float32) - 32
    return b[..., 8:].reshape(b.shape[0], -1), (_f16(b, 0)[..., None] * ls).reshape(b.shape[0], -1), None


@dataclass(frozen=True)
class Repack:
    """How one block type runs on the int8-activation kernels."""

    fmt: str  # int8dot's format
    g: int  # inputs per scale
    kind: int  # scale storage: SCALE_FP16 (uint16 bits) or SCALE_F32
    elems: int  # inputs per block in the file
    nbytes: int  # bytes per block in the file
    unpack: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    # a kernel that writes the repacked rows straight from the file's, `(raw, codes flat, scales flat)` (the same
    # result as `unpack` and the numpy below, which stays the reference), or None
    fast: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None

    @property
    def code(self) -> int:
        """`fmt` as simd's format number."""
        return FORMATS[self.fmt]

    @property
    def affine(self) -> bool:
        return self.code in AFFINE

    @property
    def activations(self) -> str:
        """How llama.cpp quantizes the tokens for this block type, as `Backend.kernels` takes it: Q8_K blocks for
        the K-quants and IQ4_XS, Q8_0 blocks for the types with fp16 scales. Q4_1's and Q5_1's Q8_1 blocks are not
        matched: they take ours (a float32 scale a group)."""
        if self.elems == SUPER:
            return "q8_k"
        return "q8_0" if self.kind == SCALE_FP16 else "group"

    @property
    def in_place(self) -> bool:
        """Whether the kernels read the file's rows themselves (no repacked copy)."""
        return self.code in BLOCK_ROWS

    @property
    def lanes(self) -> bool:
        """Whether the repacked rows are rows across lanes (`LANE_REPACK`)."""
        return self.code in LANES

    @property
    def scale_dtype(self) -> type:
        return np.float32 if self.kind == SCALE_F32 else np.uint16

    def code_bytes(self, in_dim: int) -> int:
        """Bytes of a row's codes (in place: of the file's row)."""
        if self.in_place:
            return in_dim // self.elems * self.nbytes
        return in_dim // 2 if LANES.get(self.code, self.code) in NIBBLES else in_dim

    def scale_cols(self, in_dim: int) -> int:
        if self.in_place:
            return 0
        if not self.affine:
            return in_dim // self.g
        span_bytes, _, gps = spans(self.code, self.g)
        return 2 * gps * -(-self.code_bytes(in_dim) // span_bytes)

    def row_bytes(self, in_dim: int) -> int:
        """Bytes of one repacked row of `in_dim` inputs."""
        return self.code_bytes(in_dim) + self.scale_cols(in_dim) * np.dtype(self.scale_dtype).itemsize

    def check(self, raw: np.ndarray, in_dim: int) -> None:
        if (
            raw.dtype != np.uint8
            or raw.ndim != 2
            or in_dim % self.elems
            or raw.shape[1] != in_dim // self.elems * self.nbytes
        ):
            blocks = f"{in_dim // self.elems} blocks of {self.nbytes} bytes"
            raise ValueError(f"expected uint8 rows of {blocks}, got {raw.dtype} {raw.shape}")

    def repack(self, raw: np.ndarray, in_dim: int, codes: np.ndarray, scales: np.ndarray) -> None:
        """Rows of blocks `raw [R, row bytes]` -> `codes [R, code_bytes]` and `scales [R, scale_cols]`."""
        if self.in_place:
            raise ValueError(f"{self.fmt} rows are read in place, not repacked")
        self.check(raw, in_dim)
        block = LANE_ROWS if self.lanes else 1
        if raw.shape[0] % block:
            raise ValueError(f"rows across lanes take whole blocks of {LANE_ROWS} rows, not {raw.shape[0]}")
        if self.fast is not None:
            if not (codes.flags.c_contiguous and scales.flags.c_contiguous):
                raise ValueError("the repacked rows are written into contiguous arrays")
            self.fast(raw, codes.reshape(-1), scales.reshape(-1))
            return
        step = max(1, CHUNK // raw.shape[1] // block) * block  # rows at a time: the temporaries stay in the caches
        for start in range(0, raw.shape[0], step):
            rows = slice(start, start + step)
            self._repack(raw[rows], codes[rows], scales[rows])

    def _repack(self, raw: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> None:
        c, s, m = self.unpack(raw.reshape(raw.shape[0], -1, self.nbytes))
        if self.lanes:
            codes[...], scales[...] = to_lanes(LANES[self.code], self.g, c, s.astype(np.float16).view(np.uint16))
            return
        codes[...] = c
        if self.affine:
            gps = spans(self.code, self.g)[2]
            laid = scales.reshape(scales.shape[0], -1, 2, gps)
            for i, v in enumerate((s, m)):
                padded = np.zeros((v.shape[0], laid.shape[1] * gps), np.float32)
                padded[:, : v.shape[1]] = v
                laid[:, :, i] = padded.reshape(v.shape[0], -1, gps)
        elif self.kind == SCALE_F32:
            scales[...] = s
        else:
            scales[...] = s.astype(np.float16).view(np.uint16)

    def values(self, raw: np.ndarray, in_dim: int) -> np.ndarray:
        """float32 `[R, in_dim]` of the file's rows of blocks `raw [R, row bytes]` (a few rows: an
        embedding's lookups)."""
        if self.in_place:
            return self.dequantize(raw, raw, in_dim)
        codes = np.empty((raw.shape[0], self.code_bytes(in_dim)), np.uint8)
        scales = np.empty((raw.shape[0], self.scale_cols(in_dim)), self.scale_dtype)
        self.repack(raw, in_dim, codes, scales)
        return self.dequantize(codes, scales, in_dim)

    def dequantize(self, codes: np.ndarray, scales: np.ndarray, in_dim: int) -> np.ndarray:
        """float32 `[R, in_dim]` of repacked rows (in place: `codes` the file's rows, `scales` ignored), the
        values the file's blocks hold."""
        rows, fmt = codes.shape[0], BLOCK_ROWS.get(self.code, (self.code,))[0]  # the format of the codes
        mins = None
        if self.lanes:
            fmt = LANES[self.code]
            codes, scales = from_lanes(fmt, self.g, codes, scales)
        if self.in_place:
            self.check(codes, in_dim)
            codes, s, mins = self.unpack(codes.reshape(rows, -1, self.nbytes))
            scales = s if self.kind == SCALE_F32 else s.astype(np.float16).view(np.uint16)
        if fmt in NIBBLES:
            g = codes.reshape(rows, -1, BLOCK // 2)
            q = np.concatenate([g & 15, g >> 4], axis=-1).reshape(rows, -1).astype(np.int64)
            if fmt == IQ4NL:  # a nibble -> INT8's byte
                q = np.array(IQ4_LOOKUP, np.int64)[q]
        else:
            q = codes.astype(np.int64)
        q = q - OFFSETS[fmt]
        if mins is not None:  # read in place: the block's own scales and mins
            s, m = scales, mins
        elif self.affine:
            gps = spans(self.code, self.g)[2]
            laid = scales.reshape(rows, -1, 2, gps)
            s, m = (laid[:, :, i].reshape(rows, -1)[:, : in_dim // self.g] for i in (0, 1))
        else:
            s = scales if self.kind == SCALE_F32 else scales.view(np.float16).astype(np.float32)
            m = np.zeros_like(s)
        s64, m64 = (np.repeat(v.astype(np.float64), self.g, axis=1) for v in (s, m))
        return (q * s64 - m64).astype(np.float32)


REPACK = {
    "Q4_0": Repack("q4_0", 32, SCALE_FP16, BLOCK, 18, _q4_0),
    "Q8_0": Repack("q8_0", 32, SCALE_FP16, BLOCK, 34, _q8_0),
    "Q5_0": Repack("int8", 32, SCALE_FP16, BLOCK, 22, _q5_0),
    "IQ4_NL": Repack("iq4nl", 32, SCALE_FP16, BLOCK, 18, _q4_0),
    "Q4_1": Repack("uint4", 32, SCALE_F32, BLOCK, 20, _q4_1),
    "Q5_1": Repack("uint8", 32, SCALE_F32, BLOCK, 24, _q5_1),
    "Q4_K": Repack("q4_k", 32, SCALE_F32, SUPER, 144, _q4_k),
    "Q5_K": Repack("uint8", 32, SCALE_F32, SUPER, 176, _q5_k),
    "Q6_K": Repack("q6_k", 16, SCALE_F32, SUPER, 210, _q6_k),
    "IQ4_XS": Repack("iq4_xs", 32, SCALE_F32, SUPER, 136, _iq4_xs),
}
# Q4_0 and Q8_0 repacked into rows across lanes (`simd.py`): INT4 and INT8 with group 32 and fp16 scales, the same
# values and bytes as the file's blocks, at the speed of our own INT4 and INT8 (reading them in place is slower)
LANE_REPACK = {
    "Q4_0": Repack("int4_lanes", 32, SCALE_FP16, BLOCK, 18, _q4_0, q4_0_lanes),
    "Q8_0": Repack("int8_lanes", 32, SCALE_FP16, BLOCK, 34, _q8_0, q8_0_lanes),
}


def lane_repack(block_type: str, rows: int, isa: str | None) -> Repack:
    """How a matrix of `rows` rows in `block_type` runs on backend `isa` (None: the best) when it may be repacked:
    Q4_0 and Q8_0 of whole blocks of `LANE_ROWS` rows as rows across lanes (`LANE_REPACK`), the rest as `REPACK`."""
    if block_type in LANE_REPACK and across_lanes(isa, rows):
        return LANE_REPACK[block_type]
    return REPACK[block_type]
