"""Quantized linears for the GPU, run by the Triton kernels in `kernels/triton/`.

`quant: fp8` is DeepSeek's scheme (e4m3 weights with one float32 scale per block, activations
quantized per token per block of channels), for Hopper-class cards; an FP8 checkpoint's weights are
kept as they are. `quant: int4` is group-wise INT4 with bf16 or fp16 scales and activations in the
compute dtype, for cards with little memory. Either is converted at load from whatever the checkpoint
holds. The format is a type chosen at construction, and so is the kernel it launches.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Self

import torch
from torch import nn

from hetero_moe.kernels.numba.quantize import quantize_int4_fast
from hetero_moe.kernels.quant import (
    INT4_SCALE_DTYPES,
    check_int4_settings,
    dequantize_fp8_blocks,
    dequantize_int4,
    fp8_scale_shape,
    padded,
    quantize_fp8_blocks,
)
from hetero_moe.ops.base import BuildContext, Op


@dataclass(frozen=True)
class LinearKwargs:
    quant: str = "fp8"  # fp8 | int4
    group_size: int = 128  # int4: 32, 64 or 128 along the input dimension
    scale_dtype: str = "bf16"  # int4 scales: bf16 or fp16
    block: int = 128  # fp8 from a non-FP8 checkpoint: square block size, a power of two >= 16

    def __post_init__(self) -> None:
        if self.quant not in FORMATS:
            raise ValueError(f"quant must be one of {', '.join(FORMATS)}, got {self.quant!r}")
        check_int4_settings(self.group_size, self.scale_dtype)
        if not _kernel_block(self.block):
            raise ValueError(f"block must be a power of two from 16 to 256, got {self.block!r}")


def _kernel_block(b: Any) -> bool:
    return isinstance(b, int) and 16 <= b <= 256 and b & (b - 1) == 0


class FP8Weight:
    """e4m3 `weight [N, K]` and float32 `scale [ceil(N / bn), ceil(K / bk)]`."""

    def __init__(self, out_dim: int, in_dim: int, kw: LinearKwargs) -> None:
        self.shape = (out_dim, in_dim)
        self.block = (kw.block, kw.block)
        self.weight = torch.empty(self.shape, dtype=torch.float8_e4m3fn, device="meta")
        self.scale = torch.empty(fp8_scale_shape(self.shape, self.block), dtype=torch.float32, device="meta")

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.weight, self.scale

    def store(self, w: torch.Tensor, device: torch.device) -> None:
        q, s = quantize_fp8_blocks(w, self.block)
        self.weight, self.scale = q.to(device), s.to(device)

    def store_fp8(self, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], device: torch.device) -> None:
        if not all(_kernel_block(b) for b in block):  # the kernel tiles by the block: requantize
            self.store(dequantize_fp8_blocks(w, scale, block), device)
            return
        self.block = block
        self.weight, self.scale = w.to(device).contiguous(), scale.float().to(device).contiguous()

    def dequantize(self) -> torch.Tensor:
        return dequantize_fp8_blocks(self.weight, self.scale, self.block)

    def kernel(self):
        from hetero_moe.kernels.triton.fp8_linear import fp8_linear

        return lambda x: fp8_linear(x, self.weight, self.scale, self.block)


class Int4Weight:
    """`packed [N, Kp / 2]` uint8 and `scales [N, Kp / G]` (layout in `kernels/numba/int4.py`)."""

    def __init__(self, out_dim: int, in_dim: int, kw: LinearKwargs) -> None:
        self.shape = (out_dim, in_dim)
        self.group, self.sdtype = kw.group_size, INT4_SCALE_DTYPES[kw.scale_dtype]
        kp = padded(in_dim, self.group)
        self.packed = torch.empty(out_dim, kp // 2, dtype=torch.uint8, device="meta")
        self.scales = torch.empty(out_dim, kp // self.group, dtype=self.sdtype, device="meta")

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.packed, self.scales

    def store(self, w: torch.Tensor, device: torch.device) -> None:
        packed, scales = quantize_int4_fast(w, self.group, self.sdtype)
        self.packed, self.scales = packed.to(device), scales.to(device)

    def store_fp8(self, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], device: torch.device) -> None:
        self.store(dequantize_fp8_blocks(w, scale, block), device)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.packed, self.scales, self.group, self.shape[1])

    def kernel(self):
        from hetero_moe.kernels.triton.int4_linear import int4_linear

        return lambda x: int4_linear(x, self.packed, self.scales, self.group)


FORMATS = {"fp8": FP8Weight, "int4": Int4Weight}


class QuantLinear(Op):
    """`y = x W^T (+ b)` with W quantized; the bias, if any, stays in the compute dtype."""

    def __init__(self, hf: nn.Linear, ctx: BuildContext, kwargs: LinearKwargs) -> None:
        super().__init__(ctx.device)
        if ctx.device.type != "cuda" and not ctx.services.triton_on_cpu:
            raise ValueError(
                f"op linear runs Triton kernels on a GPU, but the rule places it on {ctx.device}; "
                "keep the module unquantized there (no op)"
            )
        if importlib.util.find_spec("triton") is None:
            raise ValueError("op linear needs Triton, which is not installed (pip install triton)")
        self.out_features, self.in_features = hf.out_features, hf.in_features
        self.kwargs = kwargs
        self.format = FORMATS[kwargs.quant](hf.out_features, hf.in_features, kwargs)
        self.bias = (
            None if hf.bias is None else nn.Parameter(torch.empty_like(hf.bias, dtype=ctx.dtype), requires_grad=False)
        )
        self._run = None  # the kernel, bound once the weights are in (finalize)

    @classmethod
    def from_hf(cls, hf: nn.Module, ctx: BuildContext, kwargs: Any) -> Self:
        return cls(hf, ctx, kwargs)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, quant={self.kwargs.quant}"

    @property
    def weight(self) -> torch.Tensor:
        """The weight as the format stores it, dequantized to float32 (for what needs it whole, e.g. MLA's
        absorbed projections); not used by `forward`."""
        return self.format.dequantize()

    def checkpoint_keys(self) -> dict[str, torch.Size]:
        keys = {"weight": torch.Size((self.out_features, self.in_features))}
        if self.bias is not None:
            keys["bias"] = self.bias.shape
        return keys

    def nbytes(self) -> int:
        tensors = [*self.format.tensors(), *([self.bias] if self.bias is not None else [])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def load_weight(self, key: str, tensor: torch.Tensor) -> None:
        if key == "weight":
            self.format.store(tensor, self.device)
        else:
            super().load_weight(key, tensor)

    def load_fp8(self, key: str, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
        self.format.store_fp8(weight, scale_inv, block, self.device)

    def finalize(self) -> None:
        self._run = self.format.kernel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._run(x)
        return y if self.bias is None else y + self.bias
