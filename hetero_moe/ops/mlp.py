"""Gated MLP (SiLU(gate) * up, then down): dense layers and shared experts.

Unquantized, it keeps transformers' linears (which rules may still replace one by one). With `quant`
(on the CPU) it owns its weights in INT4 or INT8 (or a GGUF file's own block types) and runs through the
routed-expert kernels as one expert that every token goes to: gate and up in one pass over their rows,
SiLU fused, then down."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import torch
from torch import nn

from hetero_moe.kernels.numba.int8dot import Kernels, read_only
from hetero_moe.kernels.quant import dequantize_fp8_blocks
from hetero_moe.ops.base import BuildContext, Op
from hetero_moe.ops.cpu_linear import BlockMatrix, CPUQuantKwargs, QuantMatrix

# rows of gate/up or down per parallel task: one expert's rows in few tasks; 128 against 32 took 0.90x the time of
# a one-token call of V2-Lite's shared experts (2,816 x 2,048, INT4 rows across lanes) and the same at 64 tokens
# (Zen 4, 2 threads, alternating in one process); 256 no better
ROWS_PER_TASK = 128


@dataclass(frozen=True)
class MLPKwargs:
    quant: str | None = None  # None: the checkpoint's dtype; int4 | int8: quantized, on the CPU
    group_size: int = 64
    scale_dtype: str = "bf16"

    def __post_init__(self) -> None:
        if self.quant is not None:
            CPUQuantKwargs(self.quant, self.group_size, self.scale_dtype)  # validates them

    @property
    def cpu(self) -> CPUQuantKwargs:
        return CPUQuantKwargs(self.quant, self.group_size, self.scale_dtype)


class GatedMLP(Op):
    def __init__(self, hf: nn.Module, ctx: BuildContext) -> None:
        super().__init__(ctx.device)
        self.gate_proj, self.up_proj, self.down_proj = hf.gate_proj, hf.up_proj, hf.down_proj
        self.act_fn = hf.act_fn

    @classmethod
    def from_hf(cls, hf: nn.Module, ctx: BuildContext, kwargs: Any) -> Op:
        if kwargs is None or kwargs.quant is None:
            return cls(hf, ctx)
        return QuantGatedMLP(hf, ctx, kwargs.cpu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class QuantGatedMLP(Op):
    """The gated MLP quantized on the CPU; `silu` is the activation (every supported architecture's)."""

    _PROJ = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, hf: nn.Module, ctx: BuildContext, kwargs: CPUQuantKwargs) -> None:
        super().__init__(ctx.device)
        if ctx.device.type != "cpu":
            raise ValueError(f"mlp with quant runs on the CPU; the rule places it on {ctx.device}")
        if any(getattr(hf, p).bias is not None for p in self._PROJ):
            raise ValueError("mlp with quant takes linears without bias")
        self.hidden, self.inter = hf.gate_proj.in_features, hf.gate_proj.out_features
        self.kwargs, self.dtype, self.isa = kwargs, ctx.dtype, ctx.services.cpu_isa
        self.parts = {
            "gate_proj": QuantMatrix(self.inter, self.hidden, kwargs, self.isa),
            "up_proj": QuantMatrix(self.inter, self.hidden, kwargs, self.isa),
            "down_proj": QuantMatrix(self.hidden, self.inter, kwargs, self.isa),
        }
        self._kernels: Kernels | None = None

    @classmethod
    def from_hf(cls, hf: nn.Module, ctx: BuildContext, kwargs: Any) -> Self:
        return cls(hf, ctx, kwargs)

    def extra_repr(self) -> str:
        types = {m.block_type for m in self.parts.values() if isinstance(m, BlockMatrix)}
        return f"hidden={self.hidden}, inter={self.inter}, quant={'/'.join(sorted(types)) or self.kwargs.quant}"

    def use_blocks(self, rel: str, block_type: str) -> None:
        """Before loading: projection `rel` comes as GGUF blocks and runs in them (gate and up must end up
        in one format: they run in one kernel call)."""
        m = self.parts[rel.removesuffix(".weight")]
        self.parts[rel.removesuffix(".weight")] = BlockMatrix(m.out_dim, m.in_dim, block_type, self.isa)

    def takes_blocks(self, rel: str) -> bool:
        return isinstance(self.parts[rel.removesuffix(".weight")], BlockMatrix)

    def load_blocks(self, rel: str, raw: np.ndarray) -> None:
        self.parts[rel.removesuffix(".weight")].store_blocks(raw)

    def mapped_bytes(self) -> int:
        return sum(m.mapped_bytes() for m in self.parts.values())

    def checkpoint_keys(self) -> dict[str, torch.Size]:
        return {f"{name}.weight": torch.Size((m.out_dim, m.in_dim)) for name, m in self.parts.items()}

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self.parts.values())

    def load_weight(self, key: str, tensor: torch.Tensor) -> None:
        self.parts[key.removesuffix(".weight")].store(tensor)

    def load_fp8(self, key: str, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
        self.load_weight(key, dequantize_fp8_blocks(weight, scale_inv, block))

    def finalize(self) -> None:
        gate, up, down = (self.parts[p] for p in self._PROJ)
        if gate.format != up.format:
            raise ValueError(f"gate_proj and up_proj must share a format to run together: {gate.format}, {up.format}")
        self._kernels = (gate.kernels(self.isa), down.kernels(self.isa))  # the weights read-only from here
        if gate.in_place:  # GGUF rows read in place: the pair, as the routed experts take them
            self.w13 = self.s13 = (gate.codes[None], up.codes[None])  # one expert: [1, I, B] each
        else:  # gate rows then up rows in one array, as the routed experts hold theirs: one compiled kernel
            self.w13 = read_only(np.concatenate([gate.codes, up.codes])[None])  # [1, 2I, B]
            self.s13 = read_only(np.concatenate([gate.scales, up.scales])[None])
            gate.codes, up.codes = self.w13[0, : self.inter], self.w13[0, self.inter :]  # views: no second copy
            gate.scales, up.scales = self.s13[0, : self.inter], self.s13[0, self.inter :]
        self.w2, self.s2 = down.codes[None], down.scales[None]  # [1, H, B']
        self.forward(torch.zeros(1, self.hidden, dtype=self.dtype))  # compile or load the cached kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H]
        y = self.run(x.reshape(-1, self.hidden).float().contiguous().numpy())
        return torch.from_numpy(y).to(x.dtype).view(x.shape)

    def kernel_args(self) -> tuple | None:
        """`run`'s weights and kernels bound for jitted callers (`int8dot.apply_experts`, one expert every token
        goes to with weight 1): the same bits as `run`. None on the float backend."""
        k13, k2 = self._kernels
        if k13.experts_args is None:
            return None
        return k13.experts_args(k2, self.w13, self.s13, self.inter, self.w2, self.s2, ROWS_PER_TASK)

    def run(self, flat: np.ndarray) -> np.ndarray:
        """`flat [T, H]` float32, contiguous -> `[T, H]` float32."""
        t = flat.shape[0]
        k13, k2 = self._kernels
        if k13.experts is not None:  # one expert every token goes to with weight 1, in one kernel call: the same bits
            y = np.empty((t, self.hidden), np.float32)
            one = np.zeros((t, 1), np.int64), np.ones((t, 1), np.float32)
            k13.experts(k2, flat, *one, self.w13, self.s13, self.inter, self.w2, self.s2, ROWS_PER_TASK, y)
            return y
        tokens = np.arange(t, dtype=np.int64)
        seg, expert = np.array([0, t], np.int64), np.zeros(1, np.int64)
        h = np.empty((t, self.inter), np.float32)
        k13.gate_up(k13.activations(flat), tokens, seg, expert, self.w13, self.s13, ROWS_PER_TASK, h)
        y = np.empty((t, self.hidden), np.float32)
        k2.down(k2.activations(h), seg, expert, self.w2, self.s2, ROWS_PER_TASK, y)
        return y
