"""INT4 quantization at load time: `kernels/quant.py:quantize_int4`, bit for bit, in parallel.

Input `w [O, I]` is read as raw bits, so a bf16 checkpoint is never copied to float32: `uint32`
(float32, `SOURCE_F32`), `uint16` bf16 (`SOURCE_BF16`, widened as `bits << 16`) or `uint16` fp16
(`SOURCE_F16`, widened through a 65536-entry table). Output is the layout of `kernels/numba/int4.py`:
`packed [O, Ip / 2] uint8` and `scales [O, Ip / g] uint16` (bf16 or fp16 bits), I zero-padded to Ip.

Per group of g: `amax` is an integer max over the bits with the sign cleared (the same order as
|w| for every non-NaN value, and it vectorizes where a float max reduction does not without
fastmath); `s = amax / 7` in float32, rounded to the scale dtype to nearest, ties to even, in integer
arithmetic on its float32 bits (subnormals and fp16 overflow to inf included); then
`q = rint(w / max(s, tiny))` clamped to [-8, 7], plus 8, or 8 where `s == 0`. Finite `w` is the
contract: for NaN torch's own bits are unspecified (its NaN-to-uint8 cast). The kernels run
without fastmath: it allows `w * (1 / s)`, which differs from torch's IEEE `w / s` in the last bit
and so in the rounding of a tie. Byte j of group k holds element `k*g + j` in its low nibble and
`k*g + g/2 + j` in its high nibble.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from hetero_moe.kernels.numba.int4 import SCALE_BF16, SCALE_FP16, fp16_table
from numba import njit, prange

SOURCE_F32 = 0
SOURCE_BF16 = 1
SOURCE_F16 = 2

SOURCES = {torch.float32: SOURCE_F32, torch.bfloat16: SOURCE_BF16, torch.float16: SOURCE_F16}
SCALE_KINDS = {torch.bfloat16: SCALE_BF16, torch.float16: SCALE_FP16}

TINY = np.float32(np.finfo(np.float32).tiny)  # torch's clamp_min on the divisor


@njit(inline="always", cache=True)
def bf16_bits(f: int) -> int:
    """float32 bits `f` (non-negative) -> bf16 bits, to nearest, ties to even (c10's rule); NaN -> a NaN."""
    if f > 0x7F800000:
        return 0x7FC0
    return (f + 0x7FFF + ((f >> 16) & 1)) >> 16


@njit(inline="always", cache=True)
def fp16_bits(f: int) -> int:
    """float32 bits `f` (non-negative) -> fp16 bits, to nearest, ties to even; overflow -> inf."""
    exponent = f >> 23
    if exponent == 0xFF:
        return 0x7E00 if f & 0x7FFFFF else 0x7C00
    if exponent >= 113:  # fp16 normal range (or above: the carry of the rounding reaches inf)
        h = (f - (112 << 23) + 0xFFF + ((f >> 13) & 1)) >> 13
        return min(h, 0x7C00)
    shift = 126 - exponent  # fp16 subnormal: units of 2^-24 (the smallest normal 0x400 if it rounds up)
    if shift > 24:
        return 0
    mantissa = (f & 0x7FFFFF) | (0x800000 if exponent > 0 else 0)
    h = mantissa >> shift
    rest = mantissa - (h << shift)
    tie = 1 << (shift - 1)
    if rest > tie or (rest == tie and h & 1):
        h += 1
    return h


@njit(inline="always", cache=True)
def widen_group(wrow, start: int, source: int, fp16, bits, values) -> None:
    """Elements `start..start + g` of the bit row `wrow` as float32 into `values [g]` (the view of
    the uint32 scratch `bits`), zero past the end of the row (the padding)."""
    n = min(bits.shape[0], wrow.shape[0] - start)
    if source == SOURCE_BF16:
        for j in range(n):
            bits[j] = np.uint32(wrow[start + j]) << np.uint32(16)
    elif source == SOURCE_F16:
        for j in range(n):
            values[j] = fp16[wrow[start + j]]
    else:
        for j in range(n):
            bits[j] = wrow[start + j]
    for j in range(n, bits.shape[0]):
        bits[j] = 0


@njit(inline="always", cache=True)
def quantize_group(bits, values, kind: int, fp16, one_bits, one, out) -> int:
    """One widened group `values [g]` -> `out [g / 2]` packed bytes; returns the scale's bits.
    `one_bits` / `one` are a 1-element uint32 scratch and its float32 view (a scalar bit cast)."""
    amax = np.uint32(0)
    for j in range(bits.shape[0]):
        amax = max(amax, np.uint32(bits[j] & np.uint32(0x7FFFFFFF)))  # cast back: 32-bit lanes, not 64
    one_bits[0] = amax
    one[0] = one[0] / np.float32(7.0)
    f = np.int64(one_bits[0])
    if kind == SCALE_BF16:
        stored = bf16_bits(f)
        one_bits[0] = np.uint32(stored) << np.uint32(16)
        scale = one[0]
    else:
        stored = fp16_bits(f)
        scale = fp16[stored]
    half = out.shape[0]
    if scale > 0:
        divisor = max(scale, TINY)
        for j in range(half):
            lo = min(max(np.rint(values[j] / divisor), np.float32(-8.0)), np.float32(7.0))
            hi = min(max(np.rint(values[half + j] / divisor), np.float32(-8.0)), np.float32(7.0))
            out[j] = np.uint8(lo + np.float32(8.0) + np.float32(16.0) * (hi + np.float32(8.0)))
    else:
        for j in range(half):
            out[j] = 0x88
    return stored


@njit(parallel=True, nogil=True, cache=True)
def quantize_rows(w, group: int, source: int, kind: int, fp16, packed, scales) -> None:
    """`w [O, I]` bits (uint32 float32, or uint16 bf16 / fp16 as `source` says) -> `packed [O, Ip / 2]`
    uint8 and `scales [O, Ip / g]` uint16 (bf16 or fp16 bits as `kind` says); `fp16` is the fp16
    decoding table, used for fp16 input or scales. One row per task."""
    half = group // 2
    for r in prange(w.shape[0]):
        bits = np.empty(group, np.uint32)
        values = bits.view(np.float32)
        one_bits = np.empty(1, np.uint32)
        one = one_bits.view(np.float32)
        for k in range(scales.shape[1]):
            widen_group(w[r], k * group, source, fp16, bits, values)
            stored = quantize_group(bits, values, kind, fp16, one_bits, one, packed[r, k * half : (k + 1) * half])
            scales[r, k] = stored


@functools.cache
def decoding_table() -> np.ndarray:
    return fp16_table()


def quantize_int4_fast(w: torch.Tensor, group: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`w [O, I]` (CPU, any float dtype) -> `packed [O, Ip / 2] uint8`, `scales [O, Ip / g]` in
    `scale_dtype` (bf16 or fp16): the bits of `kernels.quant.quantize_int4` for finite `w`.
    float32, bf16 and fp16 are read in place; other dtypes are first rounded to float32 by torch."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if w.device.type != "cpu":
        raise ValueError(f"expected a CPU tensor, got one on {w.device}")
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {w.dtype}")
    if group <= 0 or group % 2:
        raise ValueError(f"group must be a positive even number, got {group}")
    if scale_dtype not in SCALE_KINDS:
        raise ValueError(f"scale dtype must be torch.bfloat16 or torch.float16, got {scale_dtype}")
    if w.dtype not in SOURCES:
        w = w.float()
    w = w.detach().contiguous()
    source = SOURCES[w.dtype]
    bits = w.numpy().view(np.uint32) if source == SOURCE_F32 else w.view(torch.uint16).numpy()
    out_dim, in_dim = w.shape
    groups = -(-in_dim // group)
    packed = torch.empty(out_dim, groups * group // 2, dtype=torch.uint8)
    scales = torch.empty(out_dim, groups, dtype=scale_dtype)
    kind = SCALE_KINDS[scale_dtype]
    quantize_rows(bits, group, source, kind, decoding_table(), packed.numpy(), scales.view(torch.uint16).numpy())
    return packed, scales
