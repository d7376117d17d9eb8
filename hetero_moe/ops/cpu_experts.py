"""Routed experts on the CPU, quantized, run by the Numba kernels in `kernels/numba/`.

The format (`quant: int4 | int8 | fp8 | bf16 | mxfp4`) is a type chosen once at construction; it owns the weight
arrays, converts checkpoint tensors into them at load and launches its kernels (INT4 and INT8: integer
dot products with int8 activations, on the instruction set chosen at load). Experts that come from a
GGUF file in llama.cpp's block types run in those (`BlockFormat`, set by `use_blocks` before loading). Per call the
(token, expert) pairs are grouped by expert so each selected expert's weights are streamed from
memory once; experts that receive many tokens (prefill) are dequantized and multiplied by torch
instead, above a crossover measured at load. gpt-oss's experts (MXFP4 with biases and a clamped SwiGLU)
run in `mxfp4`, the release's own bytes, and only in it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hetero_moe.kernels.ggml_blocks import REPACK, lane_repack
from hetero_moe.kernels.mxfp4 import BLOCK, check_shapes, dequantize_mxfp4
from hetero_moe.kernels.numba import bf16 as bf16_kernels
from hetero_moe.kernels.numba import fp8 as fp8_kernels
from hetero_moe.kernels.numba import mxfp4 as mxfp4_kernels
from hetero_moe.kernels.numba.common import combine, group_by_expert, map_experts
from hetero_moe.kernels.numba.int4 import SCALE_BF16, SCALE_FP16
from hetero_moe.kernels.numba.int8dot import (
    Kernels,
    across_lanes,
    from_lanes,
    quantize_int8_fast,
    read_only,
    scratch,
    select_backend,
    to_lanes,
)
from hetero_moe.kernels.numba.quantize import quantize_int4_fast
from hetero_moe.kernels.numba.simd import INT4, INT8, choose_isa
from hetero_moe.kernels.quant import (
    INT4_SCALE_DTYPES,
    check_int4_settings,
    dequantize_fp8_blocks,
    dequantize_int4,
    dequantize_int8,
    fp8_scale_shape,
    padded,
    quantize_fp8_blocks,
)
from hetero_moe.ops.base import BuildContext, ConvertedEntry, Op
from hetero_moe.ops.experts import (
    GptOssStyle,
    expert_checkpoint_keys,
    expert_dims,
    expert_style,
    parse_expert_key,
    split_gate_up,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CPUExpertsKwargs:
    quant: str = "int4"  # int4 | int8 | fp8 | bf16 | mxfp4 (gpt-oss's release format, its experts only)
    group_size: int = 64  # int4, int8: 32, 64 or 128 along the input dimension
    scale_dtype: str = "bf16"  # int4, int8 scales: bf16 or fp16
    fp8_block: int = 128  # fp8 from a non-FP8 checkpoint: square block size
    torch_min_tokens: int = 0  # tokens per expert from which torch's matmul is used; 0 = measure at load
    pinned: tuple[int, ...] = ()  # experts kept (dequantized, in the compute dtype) on `pinned_device`
    pinned_device: str = "cuda:0"

    def __post_init__(self) -> None:
        pinned = self.pinned
        if not isinstance(pinned, list | tuple) or any(not isinstance(e, int) or e < 0 for e in pinned):
            raise ValueError(f"pinned must be a list of expert numbers, got {pinned!r}")
        if len(set(pinned)) != len(pinned):
            raise ValueError(f"pinned lists an expert twice: {sorted(pinned)}")
        object.__setattr__(self, "pinned", tuple(sorted(pinned)))
        try:
            torch.device(self.pinned_device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"pinned_device {self.pinned_device!r} is not a device: {e}") from None
        if self.quant not in FORMATS:
            raise ValueError(f"quant must be one of {', '.join(FORMATS)}, got {self.quant!r}")
        check_int4_settings(self.group_size, self.scale_dtype)
        if not isinstance(self.fp8_block, int) or self.fp8_block < 1:
            raise ValueError(f"fp8_block must be a positive integer, got {self.fp8_block!r}")
        if not isinstance(self.torch_min_tokens, int) or self.torch_min_tokens < 0:
            raise ValueError(f"torch_min_tokens must be an integer >= 0, got {self.torch_min_tokens!r}")


@dataclass(frozen=True)
class Pairs:
    """The (token, expert) pairs of one call, grouped by expert."""

    token: np.ndarray  # [P] int64, token of each pair
    slot: np.ndarray  # [P] int64, its position in the token's top-k
    seg: np.ndarray  # [U + 1] int64: pairs seg[u]..seg[u+1] go to expert expert[u]
    expert: np.ndarray  # [U] int64


class GroupFormat:
    """Group-wise symmetric INT4 or INT8 with bf16 or fp16 scales, in the layout of the int8-activation
    kernels (`kernels/numba/int8dot.py`): per matrix `codes [E, O, B] uint8` (B = Ip / 2 for INT4, Ip for
    INT8) and `scales [E, O, Ip / g] uint16`; gate and up rows stacked in `w13`. For the integer kernels of
    backend `isa`, each array whose matrices have whole blocks of `LANE_ROWS` rows holds its codes and scales as
    rows across lanes (`simd.py`, `int8dot.to_lanes`); `row_lanes` says which of `w13` and `w2` do."""

    def __init__(self, e: int, inter: int, hidden: int, kw: CPUExpertsKwargs, isa: str | None) -> None:
        self.quant, self.g = kw.quant, kw.group_size
        self.sdtype = INT4_SCALE_DTYPES[kw.scale_dtype]
        self.kind = SCALE_BF16 if kw.scale_dtype == "bf16" else SCALE_FP16
        self.e, self.inter, self.hidden = e, inter, hidden
        self.hp, self.ip = padded(hidden, self.g), padded(inter, self.g)
        self.per_byte = 2 if kw.quant == "int4" else 1  # elements per code byte
        self.fmt = INT4 if kw.quant == "int4" else INT8
        self.row_lanes = (across_lanes(isa, inter), across_lanes(isa, hidden))  # of w13, of w2
        self.kernels: tuple[Kernels, Kernels] | None = None  # bound at finalize

    def nbytes(self) -> int:
        per_expert = 2 * self.inter * (self.hp // self.per_byte + 2 * self.hp // self.g)
        per_expert += self.hidden * (self.ip // self.per_byte + 2 * self.ip // self.g)
        return self.e * per_expert

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            "w13": (self.e, 2 * self.inter, self.hp // self.per_byte),
            "s13": (self.e, 2 * self.inter, self.hp // self.g),
            "w2": (self.e, self.hidden, self.ip // self.per_byte),
            "s2": (self.e, self.hidden, self.ip // self.g),
        }

    def allocate(self) -> None:
        shapes = self.shapes()
        self.w13, self.w2 = (np.empty(shapes[k], np.uint8) for k in ("w13", "w2"))
        self.s13, self.s2 = (np.empty(shapes[k], np.uint16) for k in ("s13", "s2"))

    def store(self, expert: int, proj: int, w: torch.Tensor) -> None:
        quantize = quantize_int4_fast if self.quant == "int4" else quantize_int8_fast
        codes, scales = quantize(w, self.g, self.sdtype)
        codes, bits = codes.numpy(), scales.view(torch.int16).numpy().view(np.uint16)
        if self.row_lanes[proj // 2]:
            codes, bits = to_lanes(self.fmt, self.g, codes, bits)
        if proj == 2:
            self.w2[expert], self.s2[expert] = codes, bits
        else:
            rows = slice(proj * self.inter, (proj + 1) * self.inter)
            self.w13[expert, rows], self.s13[expert, rows] = codes, bits

    def store_fp8(self, expert: int, proj: int, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> None:
        self.store(expert, proj, dequantize_fp8_blocks(w, scale, block))

    def dequantize(self, expert: int, proj: int) -> torch.Tensor:
        if proj == 2:
            codes, bits, in_dim = self.w2[expert], self.s2[expert], self.inter
        else:
            rows = slice(proj * self.inter, (proj + 1) * self.inter)
            codes, bits, in_dim = self.w13[expert, rows], self.s13[expert, rows], self.hidden
        if self.row_lanes[proj // 2]:
            codes, bits = from_lanes(self.fmt, self.g, codes, bits)
        dequantize = dequantize_int4 if self.quant == "int4" else dequantize_int8
        # copies: the cached arrays are read-only memory maps
        scales = torch.from_numpy(bits.view(np.int16).copy()).view(self.sdtype)
        return dequantize(torch.from_numpy(codes.copy()), scales, self.g, in_dim)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"w13": self.w13, "s13": self.s13, "w2": self.w2, "s2": self.s2}

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> bool:
        expected = self.shapes()
        if set(arrays) != set(expected) or any(arrays[k].shape != s for k, s in expected.items()):
            return False
        self.w13, self.s13, self.w2, self.s2 = (np.asarray(arrays[k]) for k in ("w13", "s13", "w2", "s2"))
        return True

    def bind(self, isa: str | None) -> None:
        backend = select_backend(isa)
        self.kernels = tuple(backend.kernels(self.quant + "_lanes" * on, self.g, self.kind) for on in self.row_lanes)
        self.w13, self.s13, self.w2, self.s2 = (read_only(a) for a in (self.w13, self.s13, self.w2, self.s2))

    def run(self, x: np.ndarray, pairs: Pairs, rows: int) -> np.ndarray:
        k13, k2 = self.kernels
        h = scratch("h", len(pairs.token), self.inter)
        k13.gate_up(k13.activations(x), pairs.token, pairs.seg, pairs.expert, self.w13, self.s13, rows, h)
        y = scratch("y", len(pairs.token), self.hidden)
        k2.down(k2.activations(h), pairs.seg, pairs.expert, self.w2, self.s2, rows, y)
        return y

    def run_block(self, x: np.ndarray, idx: np.ndarray, weights: np.ndarray, rows: int, out: np.ndarray) -> int | None:
        """The whole block, from the grouping by expert to the weighted sum into `out`, in one kernel call
        (`Kernels.experts`): the number of experts used, or None on the float backend, which has no such call."""
        k13, k2 = self.kernels
        if k13.experts is None:
            return None
        return k13.experts(k2, x, idx, weights, self.w13, self.s13, self.inter, self.w2, self.s2, rows, out)

    def block_args(self, rows: int) -> tuple | None:
        """`run_block`'s weights and kernels bound for jitted callers (`int8dot.apply_experts`); None where
        `run_block` returns None."""
        k13, k2 = self.kernels
        if k13.experts_args is None:
            return None
        return k13.experts_args(k2, self.w13, self.s13, self.inter, self.w2, self.s2, rows)


class BlockFormat:
    """Experts from a GGUF file in llama.cpp's block types, run by the int8-activation kernels of the format
    each type maps onto (`kernels/ggml_blocks.py`): Q4_0, Q8_0, Q4_K, Q6_K and IQ4_XS read in place from the
    file's memory map, the others repacked once at load, losslessly; Q4_0 and Q8_0 also repacked, into rows across
    lanes, where the loader says so (`use_lanes`). Gate and up (one type) and down (possibly
    another: Q4_K_M files hold Q4_K and Q6_K) each have their own kernels. No value is requantized."""

    def __init__(self, e: int, inter: int, hidden: int, types: tuple[str, str]) -> None:
        self.e, self.inter, self.hidden = e, inter, hidden
        self.types = types
        self.repacks = (REPACK[types[0]], REPACK[types[1]])
        self.kernels: tuple[Kernels, Kernels] | None = None  # bound at finalize
        self.rows: dict[int, np.ndarray] = {}  # projection -> the file's rows `[E, O, row bytes]`, in place
        self.paging: dict[int, tuple[int, int, int]] = {}  # projection -> (file descriptor, offset, expert bytes)

    @property
    def block_type(self) -> str:
        up, down = self.types
        return up if up == down else f"{up}+{down}"

    def in_place(self, proj: int) -> bool:
        return self.repacks[proj == 2].in_place

    def use_lanes(self, isa: str | None) -> None:
        """Before allocating: Q4_0 and Q8_0 matrices of whole blocks of `LANE_ROWS` rows are repacked into rows
        across lanes (`lane_repack`: the same values and bytes, the speed of our own INT4 and INT8) instead of
        read in place."""
        rows = (self.inter, self.hidden)  # of gate and up, of down
        self.repacks = tuple(lane_repack(t, r, isa) for t, r in zip(self.types, rows, strict=True))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The repacked arrays (none for projections read in place)."""
        r13, r2 = self.repacks
        out = {}
        if not r13.in_place:
            out["w13"] = (self.e, 2 * self.inter, r13.code_bytes(self.hidden))
            out["s13"] = (self.e, 2 * self.inter, r13.scale_cols(self.hidden))
        if not r2.in_place:
            out["w2"] = (self.e, self.hidden, r2.code_bytes(self.inter))
            out["s2"] = (self.e, self.hidden, r2.scale_cols(self.inter))
        return out

    def _bytes(self, proj: int) -> int:
        """Bytes of gate and up (`proj` 0) or down (2)."""
        if proj == 2:
            return self.e * self.hidden * self.repacks[1].row_bytes(self.inter)
        return self.e * 2 * self.inter * self.repacks[0].row_bytes(self.hidden)

    def nbytes(self) -> int:
        return self._bytes(0) + self._bytes(2)

    def mapped_bytes(self, cached: bool) -> int:
        """Bytes mapped from files: the rows read in place, and the repacked ones when mapped from the cache."""
        return sum(self._bytes(p) for p in (0, 2) if self.in_place(p) or cached)

    def allocate(self) -> None:
        for name, shape in self.shapes().items():
            dtype = np.uint8 if name[0] == "w" else self.repacks[name == "s2"].scale_dtype
            setattr(self, name, np.empty(shape, dtype))

    def store(self, expert: int, proj: int, w: torch.Tensor) -> None:
        raise ValueError(f"experts in {self.block_type} blocks take the file's blocks, not float weights")

    def store_fp8(self, expert: int, proj: int, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> None:
        self.store(expert, proj, w)

    def store_blocks(self, proj: int, raw: np.ndarray) -> None:
        """One projection of every expert: `raw [E, O, row bytes]` (the file's blocks, memory-mapped): kept
        as they are, or repacked."""
        repack = self.repacks[proj == 2]
        out_dim, in_dim = (self.hidden, self.inter) if proj == 2 else (self.inter, self.hidden)
        if raw.shape != (self.e, out_dim, repack.code_bytes(in_dim) if repack.in_place else raw.shape[2]):
            raise ValueError(
                f"{self.types[proj == 2]} blocks {raw.shape} do not fit {self.e} experts [{out_dim}, {in_dim}]"
            )
        if repack.in_place:
            repack.check(raw[0], in_dim)
            self.rows[proj] = raw
            return
        for e in range(self.e):
            if proj == 2:
                repack.repack(raw[e], in_dim, self.w2[e], self.s2[e])
            else:
                rows = slice(proj * self.inter, (proj + 1) * self.inter)
                repack.repack(raw[e], in_dim, self.w13[e, rows], self.s13[e, rows])

    def page_from(self, proj: int, path: Path, offset: int, expert_bytes: int) -> None:
        """Projection `proj`, read in place, pages from `path` (it does not fit in memory): from now on each
        call first asks the kernel to read its experts' rows ahead (`will_need`)."""
        self.paging[proj] = (os.open(path, os.O_RDONLY), offset, expert_bytes)

    def will_need(self, experts: np.ndarray) -> None:
        """Start reading the rows of `experts` from disk, all at once (a page fault reads a little at a time)."""
        for fd, offset, nbytes in self.paging.values():
            for e in experts.tolist():
                os.posix_fadvise(fd, offset + e * nbytes, nbytes, os.POSIX_FADV_WILLNEED)

    def dequantize(self, expert: int, proj: int) -> torch.Tensor:
        repack, in_dim = (self.repacks[1], self.inter) if proj == 2 else (self.repacks[0], self.hidden)
        if repack.in_place:
            rows = self.rows[proj][expert]
            return torch.from_numpy(repack.dequantize(rows, rows, in_dim))
        if proj == 2:
            codes, scales = self.w2[expert], self.s2[expert]
        else:
            rows = slice(proj * self.inter, (proj + 1) * self.inter)
            codes, scales = self.w13[expert, rows], self.s13[expert, rows]
        return torch.from_numpy(repack.dequantize(codes, scales, in_dim))

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.shapes()}

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> bool:
        expected = self.shapes()
        if set(arrays) != set(expected) or any(arrays[k].shape != s for k, s in expected.items()):
            return False
        for name in expected:
            setattr(self, name, np.asarray(arrays[name]))
        return True

    def bind(self, isa: str | None) -> None:
        backend = select_backend(isa)
        self.kernels = tuple(backend.kernels(r.fmt, r.g, r.kind, r.activations) for r in self.repacks)
        for name in self.shapes():  # the repacked arrays; rows read in place are read-only already
            setattr(self, name, read_only(getattr(self, name)))

    def _weights(self) -> tuple:
        """`(w13, s13, w2, s2)` as the kernels take them: rows read in place are their own scales."""
        if self.in_place(0):
            w13 = s13 = (self.rows[0], self.rows[1])
        else:
            w13, s13 = self.w13, self.s13
        w2, s2 = (self.rows[2], self.rows[2]) if self.in_place(2) else (self.w2, self.s2)
        return w13, s13, w2, s2

    def run(self, x: np.ndarray, pairs: Pairs, rows: int) -> np.ndarray:
        k13, k2 = self.kernels
        w13, s13, w2, s2 = self._weights()
        h = scratch("h", len(pairs.token), self.inter)
        k13.gate_up(k13.activations(x), pairs.token, pairs.seg, pairs.expert, w13, s13, rows, h)
        y = scratch("y", len(pairs.token), self.hidden)
        k2.down(k2.activations(h), pairs.seg, pairs.expert, w2, s2, rows, y)
        return y

    def run_block(self, x: np.ndarray, idx: np.ndarray, weights: np.ndarray, rows: int, out: np.ndarray) -> int | None:
        """`GroupFormat.run_block`; None also while rows page from disk (each call first reads its experts ahead)."""
        k13, k2 = self.kernels
        if k13.experts is None or self.paging:
            return None
        w13, s13, w2, s2 = self._weights()
        return k13.experts(k2, x, idx, weights, w13, s13, self.inter, w2, s2, rows, out)

    def block_args(self, rows: int) -> tuple | None:
        """`GroupFormat.block_args`."""
        k13, k2 = self.kernels
        if k13.experts_args is None or self.paging:
            return None
        w13, s13, w2, s2 = self._weights()
        return k13.experts_args(k2, w13, s13, self.inter, w2, s2, rows)


class FP8Format:
    """e4m3 weights with float32 block scales, kept as the DeepSeek checkpoint has them."""

    def __init__(self, e: int, inter: int, hidden: int, kw: CPUExpertsKwargs) -> None:
        self.e, self.inter, self.hidden = e, inter, hidden
        self.block: tuple[int, int] | None = None  # fixed by the first tensor stored
        self.default_block = (kw.fp8_block, kw.fp8_block)

    def nbytes(self) -> int:
        b0, b1 = self.block or self.default_block
        scales = 2 * np.prod(fp8_scale_shape((self.inter, self.hidden), (b0, b1)))
        scales += np.prod(fp8_scale_shape((self.hidden, self.inter), (b0, b1)))
        return int(self.e * (3 * self.inter * self.hidden + 4 * scales))

    def allocate(self) -> None:
        self.w13 = np.empty((self.e, 2, self.inter, self.hidden), np.uint8)
        self.w2 = np.empty((self.e, self.hidden, self.inter), np.uint8)
        self.s13 = self.s2 = None

    def store(self, expert: int, proj: int, w: torch.Tensor) -> None:
        q, scale = quantize_fp8_blocks(w, self.block or self.default_block)
        self.store_fp8(expert, proj, q, scale, self.block or self.default_block)

    def store_fp8(self, expert: int, proj: int, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> None:
        if self.block is None:
            self.block = block
            self.s13 = np.empty((self.e, 2, *fp8_scale_shape((self.inter, self.hidden), block)), np.float32)
            self.s2 = np.empty((self.e, *fp8_scale_shape((self.hidden, self.inter), block)), np.float32)
        if block != self.block:  # mixed blocks in one checkpoint: requantize to the first
            w, scale = quantize_fp8_blocks(dequantize_fp8_blocks(w, scale, block), self.block)
        bits = w.view(torch.uint8).numpy()
        if proj == 2:
            self.w2[expert], self.s2[expert] = bits, scale.float().numpy()
        else:
            self.w13[expert, proj], self.s13[expert, proj] = bits, scale.float().numpy()

    def dequantize(self, expert: int, proj: int) -> torch.Tensor:
        bits, scale = (
            (self.w2[expert], self.s2[expert]) if proj == 2 else (self.w13[expert, proj], self.s13[expert, proj])
        )
        w = torch.from_numpy(np.ascontiguousarray(bits)).view(torch.float8_e4m3fn)
        return dequantize_fp8_blocks(w, torch.from_numpy(np.ascontiguousarray(scale)), self.block)

    def bind(self, isa: str | None) -> None:
        """Float kernels: one version for every CPU."""

    def run(self, x: np.ndarray, pairs: Pairs, rows: int) -> np.ndarray:
        b0, b1 = self.block
        h = scratch("h", len(pairs.token), self.inter)
        fp8_kernels.gate_up(x, pairs.token, pairs.seg, pairs.expert, self.w13, self.s13, b0, b1, rows, h)
        y = scratch("y", len(pairs.token), self.hidden)
        fp8_kernels.down(h, pairs.seg, pairs.expert, self.w2, self.s2, b0, b1, rows, y)
        return y


class BF16Format:
    """bf16 weights, widened to float32 in the kernel."""

    def __init__(self, e: int, inter: int, hidden: int, kw: CPUExpertsKwargs) -> None:
        self.e, self.inter, self.hidden = e, inter, hidden

    def nbytes(self) -> int:
        return self.e * 3 * self.inter * self.hidden * 2

    def allocate(self) -> None:
        self.w13 = np.empty((self.e, 2 * self.inter, self.hidden), np.uint16)
        self.w2 = np.empty((self.e, self.hidden, self.inter), np.uint16)

    def store(self, expert: int, proj: int, w: torch.Tensor) -> None:
        bits = w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        if proj == 2:
            self.w2[expert] = bits
        else:
            self.w13[expert, proj * self.inter : (proj + 1) * self.inter] = bits

    def store_fp8(self, expert: int, proj: int, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> None:
        self.store(expert, proj, dequantize_fp8_blocks(w, scale, block))

    def dequantize(self, expert: int, proj: int) -> torch.Tensor:
        bits = self.w2[expert] if proj == 2 else self.w13[expert, proj * self.inter : (proj + 1) * self.inter]
        return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16).float()

    def bind(self, isa: str | None) -> None:
        """Float kernels: one version for every CPU."""

    def run(self, x: np.ndarray, pairs: Pairs, rows: int) -> np.ndarray:
        h = scratch("h", len(pairs.token), self.inter)
        bf16_kernels.gate_up(x, pairs.token, pairs.seg, pairs.expert, self.w13, rows, h)
        y = scratch("y", len(pairs.token), self.hidden)
        bf16_kernels.down(h, pairs.seg, pairs.expert, self.w2, rows, y)
        return y


class Mxfp4Format:
    """gpt-oss's MXFP4 experts kept as its release stores them (`kernels/numba/mxfp4.py`): the checkpoint's
    code bytes `w13 [E, 2I, H / 2]`, `w2 [E, H, I / 2]` and e8m0 scales `s13 [E, 2I, H / 32]`, `s2 [E, H, I / 32]`
    (gate and up rows interleaved), float32 biases `b13 [E, 2I]`, `b2 [E, H]`; integer dot products with int8
    activations, then the biases and the clamped SwiGLU."""

    def __init__(self, e: int, inter: int, hidden: int, kw: CPUExpertsKwargs, style: GptOssStyle) -> None:
        if inter % BLOCK or hidden % BLOCK:
            raise ValueError(f"MXFP4 experts need hidden and intermediate sizes that are multiples of {BLOCK}")
        self.e, self.inter, self.hidden = e, inter, hidden
        self.alpha, self.limit = np.float32(style.alpha), np.float32(style.limit)
        self.kernels: mxfp4_kernels.Kernels | None = None  # bound at finalize

    def nbytes(self) -> int:
        codes = 3 * self.inter * self.hidden
        return self.e * (codes // 2 + codes // BLOCK + 4 * (2 * self.inter + self.hidden))

    def allocate(self) -> None:
        e, i, h = self.e, self.inter, self.hidden
        self.w13, self.w2 = np.empty((e, 2 * i, h // 2), np.uint8), np.empty((e, h, i // 2), np.uint8)
        self.s13, self.s2 = np.empty((e, 2 * i, h // BLOCK), np.uint8), np.empty((e, h, i // BLOCK), np.uint8)
        self.b13, self.b2 = np.empty((e, 2 * i), np.float32), np.empty((e, h), np.float32)

    def store(self, expert: int, proj: int, w: torch.Tensor) -> None:
        raise ValueError("mxfp4 experts take the checkpoint's MXFP4 blocks, not float weights")

    def store_fp8(self, expert: int, proj: int, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> None:
        raise ValueError("mxfp4 experts take the checkpoint's MXFP4 blocks, not FP8 weights")

    def store_mxfp4(self, key: str, blocks: torch.Tensor, scales: torch.Tensor) -> None:
        """`gate_up_proj_blocks [E, 2I, H / 32, 16]` or `down_proj_blocks [E, H, I / 32, 16]`, and scales."""
        check_shapes(blocks, scales)
        codes, bits = (self.w13, self.s13) if key == "gate_up_proj_blocks" else (self.w2, self.s2)
        codes[:] = blocks.reshape(codes.shape).numpy()
        bits[:] = scales.numpy()

    def store_bias(self, key: str, bias: torch.Tensor) -> None:
        (self.b13 if key == "gate_up_proj_bias" else self.b2)[:] = bias.float().numpy()

    def dequantize(self, expert: int, proj: int) -> torch.Tensor:
        """float32 `[O, in]`: gate (0), up (1) or down (2) of one expert."""
        if proj == 2:
            codes, bits = self.w2[expert], self.s2[expert]
        else:
            codes, bits = self.w13[expert, proj::2], self.s13[expert, proj::2]
        blocks = torch.from_numpy(np.ascontiguousarray(codes)).view(codes.shape[0], -1, BLOCK // 2)
        return dequantize_mxfp4(blocks, torch.from_numpy(np.ascontiguousarray(bits)))

    def biases(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`[2I]` gate then up, `[H]`, float32."""
        b13 = split_gate_up(torch.from_numpy(self.b13[expert : expert + 1]))[0]
        return b13, torch.from_numpy(self.b2[expert])

    def bind(self, isa: str | None) -> None:
        self.kernels = mxfp4_kernels.kernels(choose_isa(isa))

    def run(self, x: np.ndarray, pairs: Pairs, rows: int) -> np.ndarray:
        k = self.kernels
        h = scratch("h", len(pairs.token), self.inter)
        k.gate_up(
            k.activations(x), pairs.token, pairs.seg, pairs.expert, self.w13, self.s13, self.b13, self.alpha,
            self.limit, rows, h,
        )  # fmt: skip
        y = scratch("y", len(pairs.token), self.hidden)
        k.down(k.activations(h), pairs.seg, pairs.expert, self.w2, self.s2, self.b2, rows, y)
        return y


FORMATS = {"int4": GroupFormat, "int8": GroupFormat, "fp8": FP8Format, "bf16": BF16Format, "mxfp4": Mxfp4Format}
# Measured crossovers per (kwargs, shape, threads) in this process: a memo of measurements, filled at load.
_CROSSOVERS: dict[tuple, int] = {}
CROSSOVER_MARGIN = 1.5  # how much faster torch's matmul must be to take over from the kernels
# rows of one expert per parallel task: with rows across lanes, 64 against 32 took 0.97-0.98x the time of a
# one-token call (V2-Lite and Qwen3-30B-A3B shapes, other experts each call: from DRAM) and 0.96-0.98x at 64 tokens
# a expert; Q4_0 rows 1.0x (Zen 4, 2 threads, alternating in one process)
ROWS_PER_TASK = 64


def group_pairs(index: np.ndarray, num_experts: int) -> Pairs:
    """`index [T, k]` -> pairs sorted by expert."""
    return Pairs(*group_by_expert(index, num_experts))


class CPUExperts(Op):
    def __init__(self, hf: nn.Module, ctx: BuildContext, kwargs: CPUExpertsKwargs) -> None:
        super().__init__(ctx.device)
        if ctx.device.type != "cpu":
            raise ValueError(f"cpu_experts runs on the CPU; the rule places it on {ctx.device}")
        e, self.inter, h = expert_dims(hf)
        self.num_experts, self.hidden = e, h
        self.kwargs = kwargs
        self.style = expert_style(hf)
        if self.style is not None:
            if kwargs.quant != "mxfp4":
                raise ValueError(
                    f"{type(hf).__name__} (MXFP4 with biases and a clamped SwiGLU) runs on the CPU kernels in "
                    f"quant mxfp4, its release's own format, not {kwargs.quant}; or use op experts (float)"
                )
            if kwargs.pinned:
                raise ValueError(f"pinned experts are not supported for {type(hf).__name__}")
            self.format = Mxfp4Format(e, self.inter, h, kwargs, self.style)
        elif kwargs.quant == "mxfp4":
            raise ValueError(
                f"quant mxfp4 runs gpt-oss's MXFP4 experts as its release stores them; {type(hf).__name__} "
                f"experts take int4, int8, fp8 or bf16"
            )
        elif FORMATS[kwargs.quant] is GroupFormat:
            self.format = GroupFormat(e, self.inter, h, kwargs, ctx.services.cpu_isa)
        else:
            self.format = FORMATS[kwargs.quant](e, self.inter, h, kwargs)
        self.threads = ctx.cpu_threads
        self.isa = ctx.services.cpu_isa
        self.torch_min_tokens = kwargs.torch_min_tokens
        self.allocated = False
        self.converted = ctx.services.converted  # where converted weights are cached, if anywhere
        self.cache: ConvertedEntry | None = None  # this op's entry there
        self.restored = False  # the converted weights came from the cache at this load
        self.mapped = False  # the weights the kernels read are memory-mapped from the cache
        self.bytes_streamed = 0  # weight bytes of the distinct experts of every call so far
        self.pinned = kwargs.pinned
        if self.pinned and self.pinned[-1] >= e:
            raise ValueError(f"pinned expert {self.pinned[-1]} does not exist; this layer has {e} experts")
        self.pinned_device = torch.device(kwargs.pinned_device)
        self.dtype = ctx.dtype
        self.unpinned = np.arange(e, dtype=np.int64)  # expert -> itself, or -1 where pinned (not run here)
        self.unpinned[list(self.pinned)] = -1

    @classmethod
    def from_hf(cls, hf: nn.Module, ctx: BuildContext, kwargs: Any) -> Self:
        return cls(hf, ctx, kwargs)

    def extra_repr(self) -> str:
        quant = self.block_type or self.kwargs.quant
        return f"experts={self.num_experts}, hidden={self.hidden}, inter={self.inter}, quant={quant}"

    def checkpoint_keys(self) -> dict[str, torch.Size]:
        if self.style is not None:
            return self.style.checkpoint_keys(self.num_experts, self.inter, self.hidden)
        return expert_checkpoint_keys(self.num_experts, self.inter, self.hidden)

    def nbytes(self) -> int:
        return self.format.nbytes()

    def mapped_bytes(self) -> int:
        if isinstance(self.format, BlockFormat):
            return self.format.mapped_bytes(self.mapped)
        return self.nbytes() if self.mapped else 0

    def device_bytes(self) -> dict[str, int]:
        out = {str(self.device): self.nbytes()}
        if self.pinned:
            pinned = len(self.pinned) * 3 * self.inter * self.hidden * self.dtype.itemsize
            out[str(self.pinned_device)] = out.get(str(self.pinned_device), 0) + pinned
        return out

    def _allocate(self) -> None:
        if not self.allocated:
            self.format.allocate()
            self.allocated = True

    def _target(self, key: str) -> tuple[int, int]:
        self._allocate()
        return parse_expert_key(key)

    def load_weight(self, key: str, tensor: torch.Tensor) -> None:
        if self.style is not None:  # the biases; the matrices come as MXFP4 (`load_mxfp4`)
            self._allocate()
            self.format.store_bias(key, tensor)
            return
        self.format.store(*self._target(key), tensor)

    def load_mxfp4(self, key: str, blocks: torch.Tensor, scales: torch.Tensor) -> None:
        if self.style is None:
            raise ValueError(f"{key}: these experts take float weights, not MXFP4 blocks")
        self._allocate()
        self.format.store_mxfp4(key, blocks, scales)

    @property
    def block_type(self) -> str | None:
        """The GGUF block type the experts run in, when they came as blocks (`use_blocks`)."""
        return self.format.block_type if isinstance(self.format, BlockFormat) else None

    def use_blocks(self, types: tuple[str, str], tensor: str) -> None:
        """Before loading: the experts come as GGUF blocks, gate and up of `types[0]`, down of `types[1]` (from
        `tensor`, named in errors), and run in them, whatever the rules' `quant`. Types the kernels cannot run
        are an error: turning them into another format would requantize the user's weights."""
        for block_type in types:
            if block_type not in REPACK:
                raise ValueError(
                    f"{tensor}: routed experts in {block_type} cannot run on the CPU kernels (they run "
                    f"{', '.join(REPACK)} blocks, and F32/F16/BF16 experts quantized as the rules say); use a GGUF "
                    f"whose experts are of those types, or place the experts on a GPU (dequantized there)"
                )
        if self.allocated:
            raise ValueError("use_blocks must come before any weight is loaded")
        self.format = BlockFormat(self.num_experts, self.inter, self.hidden, types)

    def use_lanes(self) -> None:
        """Before loading: experts in Q4_0 or Q8_0 blocks are repacked into rows across lanes (`BlockFormat.use_lanes`)
        rather than read in place."""
        if self.allocated:
            raise ValueError("use_lanes must come before any weight is loaded")
        self.format.use_lanes(self.isa)

    def load_blocks(self, proj: int, raw: np.ndarray) -> None:
        """Projection `proj` (0 gate, 1 up, 2 down) of every expert, as the GGUF's blocks `[E, O, row bytes]`."""
        if not self.allocated:
            self.format.allocate()
            self.allocated = True
        self.format.store_blocks(proj, raw)

    def load_fp8(self, key: str, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
        self.format.store_fp8(*self._target(key), weight, scale_inv, block)

    def restore(self, name: str, sources: list) -> bool:
        """INT4 and INT8 weights are quantized (or GGUF blocks repacked) at load: cache them, keyed by the
        sources and the settings."""
        if not isinstance(self.format, GroupFormat | BlockFormat) or self.converted is None:
            return False
        if isinstance(self.format, BlockFormat) and not self.format.shapes():  # all read in place
            return False
        settings = {**asdict(self.kwargs), "shape": [self.num_experts, self.inter, self.hidden]}
        if isinstance(self.format, GroupFormat):
            settings["row_lanes"] = list(self.format.row_lanes)
        if self.block_type is not None:
            settings["block_type"] = self.block_type
            settings["repacks"] = [r.fmt for r in self.format.repacks]
        self.cache = self.converted.entry(name, sources, settings)
        arrays = self.cache.load()
        if arrays is None or not self.format.set_arrays(arrays):
            return False
        self.allocated = self.restored = self.mapped = True
        return True

    def finalize(self) -> None:
        """Save converted weights to the cache and run from it, memory-mapped, as every later load does (the
        converted copy in memory is let go; where the cache cannot be written, from that copy); copy the pinned
        experts, dequantized, to their device; compile (or load the cached compilation of) the kernels; measure the
        torch crossover."""
        if self.cache is not None and not self.restored and self.cache.save(self.format.arrays()):
            arrays = self.cache.load()
            self.mapped = arrays is not None and self.format.set_arrays(arrays)
        if self.pinned:
            dev, dt = self.pinned_device, self.dtype
            w13 = [torch.cat([self.format.dequantize(e, 0), self.format.dequantize(e, 1)]) for e in self.pinned]
            self.pinned_w13 = torch.stack(w13).to(dev, dt)  # [P, 2I, H]
            self.pinned_w2 = torch.stack([self.format.dequantize(e, 2) for e in self.pinned]).to(dev, dt)  # [P, H, I]
            slot = torch.full((self.num_experts,), -1, dtype=torch.int64)
            slot[list(self.pinned)] = torch.arange(len(self.pinned))
            self.pinned_slot = slot.to(dev)
        numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        self.format.bind(self.isa)
        if self.torch_min_tokens == 0:
            key = (self.kwargs, self.block_type, self.num_experts, self.inter, self.hidden, self.threads)
            if key not in _CROSSOVERS:  # every MoE layer of a model has the same shape: measure once
                _CROSSOVERS[key] = self._measure_crossover()
            self.torch_min_tokens = _CROSSOVERS[key]
        here = np.flatnonzero(self.unpinned >= 0)
        if len(here):  # one call through grouping, the kernels and the combine (not torch's: one token)
            self.forward(torch.zeros(1, self.hidden), torch.full((1, 1), int(here[0])), torch.ones(1, 1))

    def _measure_crossover(self) -> int:
        """Smallest tokens-per-expert count, of 64 and 256, at which dequantize + torch matmul beats our kernel
        clearly (by `CROSSOVER_MARGIN`: on a busy machine a near tie would flip from one load to the next).
        Only long prefills reach it: below, a token's rounding never depends on the batch it is in."""
        for n in (64, 256):
            x = torch.randn(n, self.hidden) * 0.1
            pairs = group_pairs(np.zeros((n, 1), np.int64), self.num_experts)
            ours = _best_time(lambda x=x, pairs=pairs: self.format.run(x.numpy(), pairs, ROWS_PER_TASK))
            theirs = _best_time(lambda x=x: self._torch_expert(0, x))
            if theirs * CROSSOVER_MARGIN < ours:
                log.info("cpu_experts: torch matmul from %d tokens per expert", n)
                return n
        return 1 << 30

    def _torch_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate = F.linear(x, self.format.dequantize(e, 0).to(x.dtype))
        up = F.linear(x, self.format.dequantize(e, 1).to(x.dtype))
        if self.style is None:
            return F.linear(F.silu(gate) * up, self.format.dequantize(e, 2).to(x.dtype))
        b13, b2 = self.format.biases(e)
        gate, up = gate + b13[: self.inter].to(x.dtype), up + b13[self.inter :].to(x.dtype)
        return F.linear(self.style.activation(gate, up), self.format.dequantize(e, 2).to(x.dtype)) + b2.to(x.dtype)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`x [T, H]`, `index [T, k]`, `weights [T, k]` -> `sum_j weights[t, j] * expert_{index[t, j]}(x[t])`
        over the experts that are not pinned (`pinned_forward` adds those)."""
        xf = x.detach().float().contiguous().numpy()
        idx, ok = map_experts(index.numpy(), self.unpinned)
        if not ok:
            raise ValueError(f"expert index out of range: the layer has {self.num_experts} experts")
        out = torch.from_numpy(self.run(xf, idx, np.ascontiguousarray(weights.float().numpy())))
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def run(self, xf: np.ndarray, idx: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """`forward` on numpy arrays: `xf [T, H]` float32 contiguous, `idx [T, k]` int64 experts in range (-1: none,
        pinned), `weights [T, k]` float32 -> `[T, H]` float32."""
        if idx.size < self.torch_min_tokens and isinstance(self.format, GroupFormat | BlockFormat):
            out = np.empty_like(xf)  # no expert can reach torch's matmul: the block in one kernel call
            used = self.format.run_block(xf, idx, weights, ROWS_PER_TASK, out)
            if used is not None:
                self.count_streamed(used)
                return out
        pairs = group_pairs(idx, self.num_experts)
        self.bytes_streamed += len(pairs.expert) * self.format.nbytes() // self.num_experts
        if len(pairs.token) == 0:  # every selected expert is pinned
            return np.zeros_like(xf)
        if isinstance(self.format, BlockFormat) and self.format.paging:
            self.format.will_need(pairs.expert)
        # experts with torch_min_tokens tokens or more take torch's matmul (only long prefills have them)
        big = np.diff(pairs.seg) >= self.torch_min_tokens if len(pairs.token) >= self.torch_min_tokens else None
        if big is None or not big.any():
            y = self.format.run(xf, pairs, ROWS_PER_TASK)
        else:
            y = np.empty((len(pairs.token), self.hidden), np.float32)  # format.run returns its scratch "y"
            if not big.all():
                y[_positions(pairs, ~big)] = self.format.run(xf, _subset(pairs, ~big), ROWS_PER_TASK)
            for u in np.flatnonzero(big):
                rows = slice(pairs.seg[u], pairs.seg[u + 1])
                tokens = torch.from_numpy(xf[pairs.token[rows]])
                y[rows] = self._torch_expert(int(pairs.expert[u]), tokens).numpy()
        out = np.empty_like(xf)
        combine(y, pairs.token, pairs.slot, weights, out)
        return out

    def block_args(self) -> tuple | None:
        """The weights and kernels `run` takes for fewer than `torch_min_tokens` pairs, bound for jitted callers
        (`int8dot.apply_experts`): the same bits as `run`. None where `run` has no such kernel call."""
        if self.pinned or not isinstance(self.format, GroupFormat | BlockFormat):
            return None
        return self.format.block_args(ROWS_PER_TASK)

    def count_streamed(self, used: int) -> None:
        """Add `used` experts' bytes to `bytes_streamed`, for a call made with `block_args`."""
        self.bytes_streamed += used * self.format.nbytes() // self.num_experts

    def pinned_forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The pinned experts' share of `forward`, on `pinned_device` (all three tensors there)."""
        slot = self.pinned_slot[index]  # [T, k]: position in the pinned stack, or -1
        out = torch.zeros(x.shape[0], self.hidden, dtype=torch.float32, device=x.device)
        for p in torch.unique(slot[slot >= 0]).tolist():
            tokens, j = (slot == p).nonzero(as_tuple=True)
            gate, up = F.linear(x[tokens], self.pinned_w13[p]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.pinned_w2[p])
            out.index_add_(0, tokens, y.float() * weights[tokens, j, None].float())
        return out.to(x.dtype)


def _positions(pairs: Pairs, mask: np.ndarray) -> np.ndarray:
    return np.concatenate([np.arange(pairs.seg[u], pairs.seg[u + 1]) for u in np.flatnonzero(mask)])


def _subset(pairs: Pairs, mask: np.ndarray) -> Pairs:
    """The pairs of the experts in `mask`, regrouped."""
    pos = _positions(pairs, mask)
    counts = np.diff(pairs.seg)[mask]
    seg = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=seg[1:])
    return Pairs(pairs.token[pos], pairs.slot[pos], seg, pairs.expert[mask])


def _best_time(fn, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
