"""llama.cpp's Q4_0 and Q8_0 blocks, repacked losslessly into the layout of the int8-activation kernels.

A block holds 32 consecutive inputs of one row: its fp16 scale `d` (2 bytes), then the codes.

- Q4_0 (18 bytes): 16 bytes of nibbles, byte `j` holding input `j` in its low nibble and input `j + 16` in
  its high one; `w = d * (q - 8)`. That is byte for byte the INT4 layout of `numba/int8dot.py` with group
  32 (offset 8, the first half of a group in the low nibbles): only the scales move out of the rows.
- Q8_0 (34 bytes): 32 signed bytes `q`; `w = d * q`. The INT8 layout stores `u = q + 128` (offset 128),
  the same byte with its top bit flipped; q = -128 becomes 0, which the kernels multiply exactly too.

Both give `codes [R, nb * 16 | nb * 32] uint8` and `scales [R, nb] uint16` (fp16 bits), written into
arrays the caller allocates (rows of the destination must be contiguous).
"""

from __future__ import annotations

import numpy as np

BLOCK = 32  # inputs per block
Q4_0_BYTES = 18
Q8_0_BYTES = 34


def _blocks(raw: np.ndarray, nbytes: int) -> np.ndarray:
    """`raw [R, nb * nbytes]` uint8 -> `[R, nb, nbytes]`."""
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % nbytes:
        raise ValueError(f"expected uint8 rows of whole {nbytes}-byte blocks, got {raw.dtype} {raw.shape}")
    return raw.reshape(raw.shape[0], raw.shape[1] // nbytes, nbytes)


def _check_out(codes: np.ndarray, scales: np.ndarray, rows: int, nb: int, per_block: int) -> None:
    if codes.shape != (rows, nb * per_block) or scales.shape != (rows, nb):
        raise ValueError(f"outputs {codes.shape}, {scales.shape} do not fit {rows} rows of {nb} blocks")
    if codes.dtype != np.uint8 or scales.dtype != np.uint16 or not codes.flags.c_contiguous:
        raise ValueError("codes must be C-contiguous uint8 and scales uint16")


def _scales(b: np.ndarray, scales: np.ndarray) -> None:
    """The little-endian fp16 bits in bytes 0 and 1 of each block."""
    np.left_shift(b[:, :, 1], 8, out=scales, dtype=np.uint16)
    scales |= b[:, :, 0]


def repack_q4_0(raw: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> None:
    """Q4_0 rows `raw [R, nb * 18]` -> `codes [R, nb * 16]` (INT4, group 32) and `scales [R, nb]`."""
    b = _blocks(raw, Q4_0_BYTES)
    rows, nb = b.shape[:2]
    _check_out(codes, scales, rows, nb, 16)
    codes.reshape(rows, nb, 16)[...] = b[:, :, 2:]
    _scales(b, scales)


def repack_q8_0(raw: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> None:
    """Q8_0 rows `raw [R, nb * 34]` -> `codes [R, nb * 32]` (INT8, `q + 128`, group 32) and `scales [R, nb]`."""
    b = _blocks(raw, Q8_0_BYTES)
    rows, nb = b.shape[:2]
    _check_out(codes, scales, rows, nb, 32)
    np.bitwise_xor(b[:, :, 2:], np.uint8(0x80), out=codes.reshape(rows, nb, 32))
    _scales(b, scales)


REPACK = {"Q4_0": (Q4_0_BYTES, 16, repack_q4_0), "Q8_0": (Q8_0_BYTES, 32, repack_q8_0)}
