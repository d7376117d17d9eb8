"""MXFP4, the format of gpt-oss's released experts, in plain torch: dequantize (the float path and the
references) and quantize (synthetic checkpoints).

OCP microscaling FP4: blocks of 32 values along the input dimension, each an e2m1 code (1 sign, 2 exponent,
1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) times the block's e8m0 scale `2^(s - 127)`.
The release stores, per matrix `[O, I]`: `blocks [O, I / 32, 16] uint8`, two codes a byte (value `2j` of a
block in the low nibble of byte `j`, value `2j + 1` in the high one), and `scales [O, I / 32] uint8`.
Twice an e2m1 value is an integer in -12..12: the CPU kernels (`kernels/numba/mxfp4.py`) turn codes into
those integers with a byte lookup and multiply them by int8 activations.
"""

from __future__ import annotations

import torch

BLOCK = 32  # values per scale
BLOCK_BYTES = BLOCK // 2
SCALE_BIAS = 127  # e8m0: scale = 2^(s - 127)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_TWICE = tuple(int(2 * v) for v in E2M1_VALUES)  # code -> 2 * value, -12..12


def check_shapes(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    """`blocks [..., G, 16]` and `scales [..., G]`, both uint8, fit each other."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != BLOCK_BYTES or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not fit: expected "
            f"blocks [..., G, {BLOCK_BYTES}] and scales [..., G]"
        )


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`blocks [..., G, 16]`, `scales [..., G]` -> `[..., G * 32]` in `dtype`: each value `e2m1 * 2^(s - 127)`
    computed in float32 and rounded once to `dtype`, the bits transformers' `convert_moe_packed_tensors`
    gives (before its transpose)."""
    check_shapes(blocks, scales)
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1)  # [..., G, 16, 2]
    exponent = scales.to(torch.int32) - SCALE_BIAS
    out = torch.ldexp(values.flatten(-2), exponent.unsqueeze(-1))  # [..., G, 32] float32
    return out.flatten(-2).to(dtype)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`w [..., I]` (I a multiple of 32) -> `blocks [..., I / 32, 16]`, `scales [..., I / 32]` uint8: per block
    the smallest power of two that puts its largest magnitude within 6, each value rounded to the nearest
    e2m1 code (ties to the lower magnitude)."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs the last dimension a multiple of {BLOCK}, got {list(w.shape)}")
    wf = w.detach().float().reshape(*w.shape[:-1], -1, BLOCK)  # [..., G, 32]
    amax = wf.abs().amax(dim=-1)
    exponent = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax))
    exponent = exponent.clamp(-SCALE_BIAS, SCALE_BIAS).to(torch.int32)
    scaled = wf / torch.ldexp(torch.ones_like(amax), exponent).unsqueeze(-1)
    magnitudes = torch.tensor(E2M1_VALUES[:8], dtype=torch.float32, device=w.device)
    codes = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1).to(torch.uint8)  # 0..7
    codes |= (scaled < 0).to(torch.uint8) << 3
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., G, 16]
    return blocks.contiguous(), (exponent + SCALE_BIAS).to(torch.uint8).contiguous()
