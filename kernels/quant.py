"""Weight quantization formats, in plain torch: quantize at load, dequantize for references.

INT4: symmetric, group-wise along the input dimension (`kernels/numba/int4.py` has the layout).
INT8: symmetric, group-wise along the input dimension, stored as `q + 128` (`kernels/numba/int8dot.py`).
FP8: e4m3 with one float32 scale per (b0 x b1) block, DeepSeek's `weight_scale_inv`.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT4_GROUPS = (32, 64, 128)  # group sizes along the input dimension the kernels support
INT4_SCALE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_int4_settings(group_size: object, scale_dtype: object) -> None:
    """Validate user-given INT4 settings (rules kwargs) with messages that name the accepted values."""
    if group_size not in INT4_GROUPS:
        raise ValueError(f"group_size must be 32, 64 or 128, got {group_size!r}")
    if scale_dtype not in INT4_SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be bf16 or fp16, got {scale_dtype!r}")


def padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def quantize_int4(w: torch.Tensor, group: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`w [O, I]` -> `packed [O, Ip/2] uint8`, `scales [O, Ip/g]` in `scale_dtype` (bf16 or fp16)."""
    out_dim, in_dim = w.shape
    ip = padded(in_dim, group)
    wf = torch.nn.functional.pad(w.float(), (0, ip - in_dim)).view(out_dim, ip // group, group)
    scales = (wf.abs().amax(dim=-1) / 7.0).to(scale_dtype)  # [O, G], rounded to what is stored
    sf = scales.float().unsqueeze(-1)
    q = torch.where(sf > 0, torch.round(wf / sf.clamp_min(torch.finfo(torch.float32).tiny)), 0.0)
    q = (q.clamp(-8, 7) + 8).to(torch.uint8)  # [O, G, g], 0..15
    half = group // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return packed.reshape(out_dim, ip // 2).contiguous(), scales.contiguous()


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, group: int, in_dim: int) -> torch.Tensor:
    """Exact inverse of the format: `scale * (q - 8)`, float32 `[O, in_dim]`."""
    out_dim = packed.shape[0]
    g = packed.view(out_dim, -1, group // 2)
    q = torch.cat((g & 0xF, g >> 4), dim=-1).float() - 8.0  # [O, G, g]
    return (q * scales.float().unsqueeze(-1)).reshape(out_dim, -1)[:, :in_dim]


def quantize_int8(w: torch.Tensor, group: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`w [O, I]` -> `weights [O, Ip] uint8` holding `q + 128` with `q` in -127..127, `scales [O, Ip/g]` in
    `scale_dtype` (bf16 or fp16): `s = amax / 127` rounded to the scale dtype, `q = round(w / s)`."""
    out_dim, in_dim = w.shape
    ip = padded(in_dim, group)
    wf = torch.nn.functional.pad(w.float(), (0, ip - in_dim)).view(out_dim, ip // group, group)
    scales = (wf.abs().amax(dim=-1) / 127.0).to(scale_dtype)  # [O, G], rounded to what is stored
    sf = scales.float().unsqueeze(-1)
    q = torch.where(sf > 0, torch.round(wf / sf.clamp_min(torch.finfo(torch.float32).tiny)), 0.0)
    weights = (q.clamp(-127, 127) + 128).to(torch.uint8)  # [O, G, g], 1..255
    return weights.reshape(out_dim, ip).contiguous(), scales.contiguous()


def dequantize_int8(weights: torch.Tensor, scales: torch.Tensor, group: int, in_dim: int) -> torch.Tensor:
    """Exact inverse of the format: `scale * (u - 128)`, float32 `[O, in_dim]`."""
    out_dim = weights.shape[0]
    q = weights.view(out_dim, -1, group).float() - 128.0  # [O, G, g]
    return (q * scales.float().unsqueeze(-1)).reshape(out_dim, -1)[:, :in_dim]


def fp8_scale_shape(shape: torch.Size | tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`w [O, I]` -> (`float8_e4m3fn [O, I]`, float32 scales `[ceil(O/b0), ceil(I/b1)]`)."""
    out_dim, in_dim = w.shape
    b0, b1 = block
    op, ip = padded(out_dim, b0), padded(in_dim, b1)
    wf = torch.nn.functional.pad(w.float(), (0, ip - in_dim, 0, op - out_dim))
    blocks = wf.view(op // b0, b0, ip // b1, b1)
    scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX  # [O/b0, I/b1]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(op, ip)[:out_dim, :in_dim].contiguous(), scale.contiguous()


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """`weight [O, I]` (fp8) times its block's scale -> float32 `[O, I]`; exact for ragged edge blocks."""
    out_dim, in_dim = weight.shape
    if tuple(scale_inv.shape) != fp8_scale_shape(weight.shape, block):
        raise ValueError(
            f"scale shape {tuple(scale_inv.shape)} does not fit weight {tuple(weight.shape)} with block {block}; "
            f"expected {fp8_scale_shape(weight.shape, block)}"
        )
    scale = scale_inv.float().repeat_interleave(block[0], dim=0)[:out_dim]
    scale = scale.repeat_interleave(block[1], dim=1)[:, :in_dim]
    return weight.float() * scale
