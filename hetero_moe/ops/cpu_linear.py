"""Quantized dense layers on the CPU: attention projections, dense MLPs, shared experts and lm_head in
INT4 or INT8 (group-wise, bf16 or fp16 scales), or a GGUF file's own block types (`BlockMatrix`), run by
the int8-activation kernels of `kernels/numba/int8dot.py` (integer dot products; the instruction set
chosen once at load).

`cpu_linear` replaces an `nn.Linear`; `mlp` with `quant` runs a whole gated MLP through the routed-expert
kernels as one expert every token goes to (gate and up in one pass over the weights, SiLU fused)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Self

import numpy as np
import torch
from torch import nn

from hetero_moe.kernels.ggml_blocks import lane_repack
from hetero_moe.kernels.numba.int4 import SCALE_BF16, SCALE_FP16
from hetero_moe.kernels.numba.int8dot import (
    Kernels,
    across_lanes,
    from_lanes,
    quantize_int8_fast,
    read_only,
    select_backend,
    to_lanes,
)
from hetero_moe.kernels.numba.quantize import quantize_int4_fast
from hetero_moe.kernels.numba.simd import INT4, INT8, LANES
from hetero_moe.kernels.quant import (
    INT4_SCALE_DTYPES,
    check_int4_settings,
    dequantize_fp8_blocks,
    dequantize_int4,
    dequantize_int8,
    padded,
)
from hetero_moe.ops.base import BuildContext, Op

ROWS_PER_TASK = 16  # output rows per parallel task of a dense layer
# per-head matrices have short rows (128 or 512 inputs): more rows a task, or the tasks' setup dominates. A whole
# latent head (512 rows of W_UK) a task: 0.972x and 0.993x the decode step against 64 rows, 0.987x for 128 (V2-Lite
# shape, 2 threads, in one process)
HEAD_ROWS_PER_TASK = 512


@dataclass(frozen=True)
class CPUQuantKwargs:
    quant: str = "int4"  # int4 | int8
    group_size: int = 64  # 32, 64 or 128 along the input dimension
    scale_dtype: str = "bf16"  # bf16 or fp16

    def __post_init__(self) -> None:
        if self.quant not in ("int4", "int8"):
            raise ValueError(f"quant must be int4 or int8, got {self.quant!r}")
        check_int4_settings(self.group_size, self.scale_dtype)


class QuantMatrix:
    """One weight `[O, I]` in the kernels' layout: `codes [O, B] uint8` (B = Ip / 2 for INT4, Ip for INT8)
    and `scales [O, Ip / g] uint16` (bf16 or fp16 bits), read-only once stored (`read_only`). For the integer
    kernels (the backend `isa` names, or the best) a matrix of whole blocks of `LANE_ROWS` rows is stored as
    rows across lanes (`int8dot.to_lanes`), as the routed experts are."""

    in_place = False  # codes and scales are separate arrays

    def __init__(self, out_dim: int, in_dim: int, kw: CPUQuantKwargs, isa: str | None = None) -> None:
        self.out_dim, self.in_dim, self.kw = out_dim, in_dim, kw
        self.fmt = INT4 if kw.quant == "int4" else INT8
        self.lanes = across_lanes(isa, out_dim)
        self.g, self.sdtype = kw.group_size, INT4_SCALE_DTYPES[kw.scale_dtype]
        self.kind = SCALE_BF16 if kw.scale_dtype == "bf16" else SCALE_FP16
        ip = padded(in_dim, self.g)
        self.shape = (out_dim, ip // 2 if kw.quant == "int4" else ip)
        self.codes = np.empty(0, np.uint8)
        self.scales = np.empty(0, np.uint16)

    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] + 2 * self.out_dim * padded(self.in_dim, self.g) // self.g

    def store(self, w: torch.Tensor) -> None:
        quantize = quantize_int4_fast if self.kw.quant == "int4" else quantize_int8_fast
        codes, scales = quantize(w, self.g, self.sdtype)
        codes, bits = codes.numpy(), scales.view(torch.int16).numpy().view(np.uint16)
        if self.lanes:
            codes, bits = to_lanes(self.fmt, self.g, codes, bits)
        self.codes, self.scales = read_only(codes), read_only(bits)

    def dequantize(self) -> torch.Tensor:
        """float32 `[O, I]`."""
        dequantize = dequantize_int4 if self.kw.quant == "int4" else dequantize_int8
        codes, bits = self.codes, self.scales
        if self.lanes:
            codes, bits = from_lanes(self.fmt, self.g, codes, bits)
        # copies: the kernels' weights are read-only
        scales = torch.from_numpy(bits.view(np.int16).copy()).view(self.sdtype)
        return dequantize(torch.from_numpy(codes.copy()), scales, self.g, self.in_dim)

    @property
    def format(self) -> tuple[str, int, int, str]:
        """(int8dot format, group, scale kind, activations): matrices of one format run in one kernel call."""
        return (self.kw.quant + "_lanes" * self.lanes, self.g, self.kind, "group")

    def as_rows(self) -> None:
        """Rows across lanes back to rows one after another (to be stacked with a matrix of other rows)."""
        if self.lanes:
            codes, bits = from_lanes(self.fmt, self.g, self.codes, self.scales)
            self.codes, self.scales, self.lanes = read_only(codes), read_only(bits), False

    def mapped_bytes(self) -> int:
        return 0

    def kernels(self, isa: str | None) -> Kernels:
        return select_backend(isa).kernels(*self.format)


class BlockMatrix:
    """One weight `[O, I]` of a GGUF file in its own block type (`kernels/ggml_blocks.py`): Q4_0 and Q8_0 of
    whole blocks of `LANE_ROWS` rows repacked into rows across lanes for the integer kernels of `isa` (the same
    values, faster kernels); Q4_K, Q6_K, IQ4_XS and the other Q4_0 and Q8_0 rows read in place from the memory
    map (`codes` and `scales` are both the file's rows); the other types repacked once, losslessly. Nothing is
    requantized."""

    def __init__(self, out_dim: int, in_dim: int, block_type: str, isa: str | None) -> None:
        self.out_dim, self.in_dim, self.block_type = out_dim, in_dim, block_type
        self.repack = lane_repack(block_type, out_dim, isa)
        self.codes = np.empty(0, np.uint8)
        self.scales = np.empty(0, self.repack.scale_dtype)

    @property
    def format(self) -> tuple[str, int, int, str]:
        r = self.repack
        return (r.fmt, r.g, r.kind, r.activations)

    @property
    def in_place(self) -> bool:
        """Rows read in place from the file's map: `codes` and `scales` are both the rows."""
        return self.repack.in_place

    def nbytes(self) -> int:
        return self.out_dim * self.repack.row_bytes(self.in_dim)

    def mapped_bytes(self) -> int:
        return self.nbytes() if self.repack.in_place else 0

    def store(self, w: torch.Tensor) -> None:
        raise ValueError(f"a weight in {self.block_type} blocks takes the file's blocks, not float values")

    def store_blocks(self, raw: np.ndarray) -> None:
        """The file's rows `[O, row bytes]`, memory-mapped."""
        r = self.repack
        if raw.shape[0] != self.out_dim:
            raise ValueError(f"{self.block_type} rows {raw.shape} do not fit a weight [{self.out_dim}, {self.in_dim}]")
        if r.in_place:
            r.check(raw, self.in_dim)
            self.codes = self.scales = read_only(raw)
            return
        codes = np.empty((self.out_dim, r.code_bytes(self.in_dim)), np.uint8)
        scales = np.empty((self.out_dim, r.scale_cols(self.in_dim)), r.scale_dtype)
        r.repack(raw, self.in_dim, codes, scales)
        self.codes, self.scales = read_only(codes), read_only(scales)

    def dequantize(self) -> torch.Tensor:
        return torch.from_numpy(self.repack.dequantize(self.codes, self.scales, self.in_dim))

    def as_rows(self) -> None:
        """Rows across lanes back to rows one after another (`QuantMatrix.as_rows`): INT4 or INT8 g32."""
        if self.repack.lanes:
            codes, bits = from_lanes(LANES[self.repack.code], self.repack.g, self.codes, self.scales)
            self.codes, self.scales = read_only(codes), read_only(bits)
            self.repack = replace(self.repack, fmt=self.repack.fmt.removesuffix("_lanes"), fast=None)

    def kernels(self, isa: str | None) -> Kernels:
        return select_backend(isa).kernels(*self.format)


class CPULinear(Op):
    """`y = x W^T (+ b)` with W quantized; the bias stays in the compute dtype."""

    def __init__(self, hf: nn.Linear, ctx: BuildContext, kwargs: CPUQuantKwargs) -> None:
        super().__init__(ctx.device)
        if ctx.device.type != "cpu":
            raise ValueError(f"cpu_linear runs on the CPU; the rule places it on {ctx.device} (use op linear)")
        self.out_features, self.in_features = hf.out_features, hf.in_features
        self.kwargs = kwargs
        self.isa = ctx.services.cpu_isa
        self.matrix = QuantMatrix(hf.out_features, hf.in_features, kwargs, self.isa)
        self.dtype = ctx.dtype
        self.bias = (
            None if hf.bias is None else nn.Parameter(torch.empty_like(hf.bias, dtype=ctx.dtype), requires_grad=False)
        )
        self._kernels: Kernels | None = None  # bound once the weights are in (finalize)
        self.keep_source = False  # keep the float weight it is loaded from, as `source` (for a parent op)
        self.source: torch.Tensor | None = None

    @classmethod
    def from_hf(cls, hf: nn.Module, ctx: BuildContext, kwargs: Any) -> Self:
        return cls(hf, ctx, kwargs)

    def extra_repr(self) -> str:
        quant = self.matrix.block_type if isinstance(self.matrix, BlockMatrix) else self.kwargs.quant
        return f"in={self.in_features}, out={self.out_features}, quant={quant}"

    def use_blocks(self, rel: str, block_type: str) -> None:
        """Before loading: the weight comes as GGUF blocks of `block_type` and runs in them, whatever the
        rules' `quant` (requantizing would lose the file's precision)."""
        if rel != "weight":
            raise KeyError(rel)
        self.matrix = BlockMatrix(self.out_features, self.in_features, block_type, self.isa)

    def takes_blocks(self, rel: str) -> bool:
        return rel == "weight" and isinstance(self.matrix, BlockMatrix)

    def load_blocks(self, rel: str, raw: np.ndarray) -> None:
        self.matrix.store_blocks(raw)

    def mapped_bytes(self) -> int:
        return self.matrix.mapped_bytes()

    @property
    def weight(self) -> torch.Tensor:
        """The stored weight dequantized to float32 (for what needs it whole, e.g. MLA's absorbed
        projections); not used by `forward`."""
        return self.matrix.dequantize()

    def checkpoint_keys(self) -> dict[str, torch.Size]:
        keys = {"weight": torch.Size((self.out_features, self.in_features))}
        if self.bias is not None:
            keys["bias"] = self.bias.shape
        return keys

    def nbytes(self) -> int:
        return self.matrix.nbytes() + (0 if self.bias is None else self.bias.numel() * self.dtype.itemsize)

    def load_weight(self, key: str, tensor: torch.Tensor) -> None:
        if key == "weight":
            self.matrix.store(tensor)
            if self.keep_source:  # a copy: a view would hold the checkpoint file's whole mapping, every page
                self.source = tensor.clone()  # read from it resident, until the parent op lets it go
        else:
            super().load_weight(key, tensor)

    def load_fp8(self, key: str, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
        self.load_weight(key, dequantize_fp8_blocks(weight, scale_inv, block))

    def finalize(self) -> None:
        self._kernels = self.matrix.kernels(self.isa)
        self.forward(torch.zeros(1, self.in_features, dtype=self.dtype))  # compile or load the cached kernels

    def as_rows(self) -> None:
        """The weight's rows one after another (`QuantMatrix.as_rows`), and the kernels for them."""
        self.matrix.as_rows()
        self._kernels = self.matrix.kernels(self.isa)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., I] -> [..., O]
        y = torch.from_numpy(self.run(x.reshape(-1, self.in_features).float().contiguous().numpy()))
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def run(self, flat: np.ndarray) -> np.ndarray:
        """`flat [T, I]` float32 -> `[T, O]` float32, without the bias."""
        k = self._kernels
        return k.linear_x(flat, self.matrix.codes, self.matrix.scales, ROWS_PER_TASK)

    def kernel_args(self) -> tuple | None:
        """`run`'s weights and kernels bound for jitted callers (`int8dot.apply_linear`); None on the float backend."""
        k = self._kernels
        return None if k.linear_args is None else k.linear_args(self.matrix.codes, self.matrix.scales, ROWS_PER_TASK)


class StackedLinear:
    """Linears of one input run as one: `x -> [m(x) for m in linears]` with their rows stacked, so the input
    is quantized once and the kernel called once; each linear's weights become a view of the stack (no second
    copy). Made by `stacked`. Where some hold rows across lanes and some not (a matrix whose rows are not whole
    blocks of 16), all take rows one after another."""

    def __init__(self, linears: Sequence[CPULinear]) -> None:
        if len({m.matrix.format for m in linears}) > 1:
            for m in linears:
                m.as_rows()
        first = linears[0]
        codes = read_only(np.concatenate([m.matrix.codes for m in linears]))  # GGUF rows read in place: copied
        scales = codes if first.matrix.in_place else read_only(np.concatenate([m.matrix.scales for m in linears]))
        self.sizes, start = [], 0
        for m in linears:
            rows = slice(start, start + m.out_features)
            m.matrix.codes, m.matrix.scales = codes[rows], scales[rows]
            self.sizes.append(m.out_features)
            start += m.out_features
        self.codes, self.scales, self.kernels, self.in_features = codes, scales, first._kernels, first.in_features

    def run(self, flat: np.ndarray) -> np.ndarray:
        """`flat [T, I]` float32 -> the outputs side by side, `[T, sum O]` float32."""
        k = self.kernels
        return k.linear_x(flat, self.codes, self.scales, ROWS_PER_TASK)

    def kernel_args(self) -> tuple | None:
        """As `CPULinear.kernel_args`."""
        k = self.kernels
        return None if k.linear_args is None else k.linear_args(self.codes, self.scales, ROWS_PER_TASK)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = torch.from_numpy(self.run(x.reshape(-1, self.in_features).float().contiguous().numpy())).to(x.dtype)
        return [part.view(*x.shape[:-1], part.shape[-1]) for part in torch.split(y, self.sizes, dim=-1)]


def stacked(linears: Sequence[nn.Module]) -> StackedLinear | None:
    """The linears as one `StackedLinear`; None unless all are `cpu_linear`s without bias of one format and
    input size."""
    first = linears[0]

    def kind(m: nn.Module) -> tuple:
        fmt, g, scale, activations = m.matrix.format
        return (fmt.removesuffix("_lanes"), g, scale, activations, m.isa, m.in_features, m.dtype)

    same = all(isinstance(m, CPULinear) and m.bias is None and kind(m) == kind(first) for m in linears)
    return StackedLinear(linears) if same else None


class HeadLinear:
    """Per-head matrices `[h, O, I]`, applied to one input row per (token, head) in a single call of the routed
    experts' down kernel, each head standing for an expert: `y[t, j] = x[t, j] w[j]^T`. Absorbed latent
    attention's W_UK and W_UV on the CPU: quantized as a `cpu_linear` of `kw` stores one (`quantized`), or a GGUF
    file's own per-head blocks (`from_blocks`)."""

    def __init__(self, matrices: Sequence[QuantMatrix | BlockMatrix], isa: str | None) -> None:
        first = matrices[0]
        self.heads, self.out_dim, self.in_dim = len(matrices), first.out_dim, first.in_dim
        self.codes = read_only(np.stack([m.codes for m in matrices]))  # [h, O, B]
        self.scales = self.codes if first.in_place else read_only(np.stack([m.scales for m in matrices]))
        for j, m in enumerate(matrices):  # views of the stacks: no second copy
            m.codes, m.scales = self.codes[j], self.scales[j]
        self.matrices = matrices
        self.kernels = first.kernels(isa)
        self.experts = np.arange(self.heads, dtype=np.int64)

    @classmethod
    def quantized(cls, w: torch.Tensor, kw: CPUQuantKwargs, isa: str | None) -> HeadLinear:
        """`w [h, O, I]` quantized as `kw` says."""
        matrices = [QuantMatrix(w.shape[1], w.shape[2], kw, isa) for _ in range(w.shape[0])]
        for m, wj in zip(matrices, w, strict=True):
            m.store(wj.contiguous())
        return cls(matrices, isa)

    @classmethod
    def from_blocks(cls, raw: np.ndarray, in_dim: int, block_type: str, isa: str | None) -> HeadLinear:
        """A GGUF tensor's per-head blocks `raw [h, O, row bytes]` (llama.cpp's `attn_k_b`, `attn_v_b`), run as
        `BlockMatrix` runs them: nothing requantized."""
        matrices = [BlockMatrix(raw.shape[1], in_dim, block_type, isa) for _ in range(raw.shape[0])]
        for m, rows in zip(matrices, raw, strict=True):
            m.store_blocks(rows)
        return cls(matrices, isa)

    def dequantize(self) -> torch.Tensor:
        """float32 `[h, O, I]`."""
        return torch.stack([m.dequantize() for m in self.matrices])

    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, h, I] -> [T, h, O] float32
        t = x.shape[0]
        rows = x.transpose(0, 1).reshape(self.heads * t, self.in_dim).float().contiguous().numpy()  # head-major
        return torch.from_numpy(self.rows(rows)).view(self.heads, t, self.out_dim).transpose(0, 1)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """`rows [h * T, I]` float32, head-major (row `j * T + t` is token t's input to head j) -> `[h * T, O]`."""
        seg = np.arange(self.heads + 1, dtype=np.int64) * (rows.shape[0] // self.heads)
        y = np.empty((rows.shape[0], self.out_dim), np.float32)
        k = self.kernels
        k.down_x(rows, seg, self.experts, self.codes, self.scales, HEAD_ROWS_PER_TASK, y)
        return y

    def kernel_args(self) -> tuple | None:
        """`rows`' weights and kernels bound for jitted callers (`int8dot.apply_linear`); None on the float backend."""
        k = self.kernels
        if k.linear_args is None:
            return None
        return k.linear_args(self.codes, self.scales, HEAD_ROWS_PER_TASK, self.experts)
