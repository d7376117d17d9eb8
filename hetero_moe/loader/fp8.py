"""DeepSeek's FP8 checkpoint format: `float8_e4m3fn` weights with one float32 `weight_scale_inv` per
block (128x128 in the release), edge blocks ragged."""

from __future__ import annotations

import math

import torch


def scale_shape(shape: torch.Size, block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """`weight [O, I]` (fp8) times its block's scale -> float32 `[O, I]`; exact for ragged edge blocks."""
    out_dim, in_dim = weight.shape
    if scale_inv.shape != scale_shape(weight.shape, block):
        raise ValueError(
            f"scale shape {tuple(scale_inv.shape)} does not fit weight {tuple(weight.shape)} with block {block}; "
            f"expected {scale_shape(weight.shape, block)}"
        )
    scale = scale_inv.float().repeat_interleave(block[0], dim=0)[:out_dim]
    scale = scale.repeat_interleave(block[1], dim=1)[:, :in_dim]
    return weight.float() * scale
