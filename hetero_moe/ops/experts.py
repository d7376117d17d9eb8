"""Routed experts in plain torch, in our own layout: the reference every faster experts op is
checked against, and the op for any device when speed does not matter.

Checkpoints keep experts one by one (`E.gate_proj.weight [I, H]`, `E.up_proj.weight [I, H]`,
`E.down_proj.weight [H, I]`); this op stacks them as `w13 [E, 2I, H]` (gate rows, then up rows)
and `w2 [E, H, I]`. gpt-oss's release keeps them stacked in MXFP4 with biases (`GptOssStyle`): this op
dequantizes them to its dtype, gate and up rows taken apart, and applies gpt-oss's clamped SwiGLU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hetero_moe.kernels.mxfp4 import BLOCK, BLOCK_BYTES, dequantize_mxfp4
from hetero_moe.ops.base import BuildContext, Op

_PROJ = {"gate_proj": 0, "up_proj": 1, "down_proj": 2}


@dataclass(frozen=True)
class GptOssStyle:
    """gpt-oss's routed experts, as its release stores them: per layer `gate_up_proj_blocks [E, 2I, H / 32, 16]`
    and `down_proj_blocks [E, H, I / 32, 16]` with their e8m0 `*_scales` (MXFP4, `kernels/mxfp4.py`), and
    biases `gate_up_proj_bias [E, 2I]`, `down_proj_bias [E, H]`; gate and up rows interleaved (row 2r gate r,
    2r + 1 up r). The activation: `(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`,
    `g = min(gate, limit)`."""

    alpha: float
    limit: float

    def activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """transformers' `GptOssExperts._apply_gate`, step by step."""
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    @staticmethod
    def checkpoint_keys(num_experts: int, inter: int, hidden: int) -> dict[str, torch.Size]:
        """The blocks and biases (the loader pairs each `*_blocks` with its `*_scales`)."""
        for dim in (inter, hidden):
            if dim % BLOCK:
                raise ValueError(f"MXFP4 experts need hidden and intermediate sizes that are multiples of {BLOCK}")
        e = num_experts
        return {
            "gate_up_proj_blocks": torch.Size((e, 2 * inter, hidden // BLOCK, BLOCK_BYTES)),
            "gate_up_proj_bias": torch.Size((e, 2 * inter)),
            "down_proj_blocks": torch.Size((e, hidden, inter // BLOCK, BLOCK_BYTES)),
            "down_proj_bias": torch.Size((e, hidden)),
        }


# transformers experts classes whose releases store them as `GptOssStyle` describes; their modules hold
# the activation's constants.
_STYLES: dict[str, Callable[[nn.Module], GptOssStyle]] = {
    "GptOssExperts": lambda hf: GptOssStyle(alpha=float(hf.alpha), limit=float(hf.limit)),
}


MXFP4_EXPERTS = frozenset(_STYLES)  # experts classes that run on the CPU kernels in quant mxfp4 only


def expert_style(hf: nn.Module) -> GptOssStyle | None:
    """The style of a transformers experts module; None for the per-expert SiLU experts."""
    make = _STYLES.get(type(hf).__name__)
    return make(hf) if make is not None else None


def expert_dims(hf: nn.Module) -> tuple[int, int, int]:
    """(experts, intermediate size, hidden size) of a transformers experts module, whose `gate_up_proj` is
    `[E, 2I, H]`, or `[E, H, 2I]` where transformers keeps it transposed (gpt-oss)."""
    if getattr(hf, "is_transposed", False):
        e, h, two_i = hf.gate_up_proj.shape
    else:
        e, two_i, h = hf.gate_up_proj.shape
    return e, two_i // 2, h


def split_gate_up(t: torch.Tensor) -> torch.Tensor:
    """Interleaved gate/up rows along dim 1 (`[E, 2I, ...]`) -> gate rows, then up rows."""
    return torch.cat((t[:, 0::2], t[:, 1::2]), dim=1)


def expert_checkpoint_keys(num_experts: int, inter: int, hidden: int) -> dict[str, torch.Size]:
    """The per-expert checkpoint keys of one layer's routed experts and their shapes."""
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    return {f"{e}.{proj}.weight": torch.Size(s) for e in range(num_experts) for proj, s in shapes.items()}


def parse_expert_key(key: str) -> tuple[int, int]:
    """`"E.gate_proj.weight"` -> (expert E, projection 0 gate / 1 up / 2 down)."""
    expert, proj, _ = key.split(".")
    return int(expert), _PROJ[proj]


class TorchExperts(Op):
    def __init__(self, hf: nn.Module, ctx: BuildContext) -> None:
        super().__init__(ctx.device)
        e, i, h = expert_dims(hf)
        self.num_experts, self.inter, self.hidden = e, i, h
        self.style = expert_style(hf)
        self.activation = self.style.activation if self.style is not None else lambda gate, up: hf.act_fn(gate) * up
        meta = {"dtype": ctx.dtype, "device": "meta"}
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h, **meta), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, h, i, **meta), requires_grad=False)
        self.b13 = self.b2 = None  # biases (gpt-oss): [E, 2I] gate then up, [E, H]
        if self.style is not None:
            self.b13 = nn.Parameter(torch.empty(e, 2 * i, **meta), requires_grad=False)
            self.b2 = nn.Parameter(torch.empty(e, h, **meta), requires_grad=False)
        self.bytes_streamed = 0  # weight bytes of the distinct experts of every call so far

    def checkpoint_keys(self) -> dict[str, torch.Size]:
        if self.style is not None:
            return self.style.checkpoint_keys(self.num_experts, self.inter, self.hidden)
        return expert_checkpoint_keys(self.num_experts, self.inter, self.hidden)

    def _materialize(self) -> None:
        for name in ("w13", "w2", "b13", "b2"):
            p = getattr(self, name)
            if p is not None and p.is_meta:
                setattr(self, name, nn.Parameter(torch.empty_like(p, device=self.device), requires_grad=False))

    def load_weight(self, key: str, tensor: torch.Tensor) -> None:
        self._materialize()
        if self.style is not None:  # the biases; the matrices come as MXFP4 (`load_mxfp4`)
            if key == "gate_up_proj_bias":
                self.b13.copy_(split_gate_up(tensor))
            elif key == "down_proj_bias":
                self.b2.copy_(tensor)
            else:
                raise KeyError(key)
            return
        (e, part), i = parse_expert_key(key), self.inter
        target = self.w2[e] if part == 2 else self.w13[e, part * i : (part + 1) * i]
        target.copy_(tensor)

    def load_mxfp4(self, key: str, blocks: torch.Tensor, scales: torch.Tensor) -> None:
        """`gate_up_proj_blocks` or `down_proj_blocks` with their scales, dequantized to this op's dtype."""
        if self.style is None:
            raise ValueError(f"{key}: these experts take float weights, not MXFP4 blocks")
        if key not in ("gate_up_proj_blocks", "down_proj_blocks"):
            raise KeyError(key)
        self._materialize()
        for e in range(self.num_experts):  # one expert at a time: a whole layer in float32 is GBs
            w = dequantize_mxfp4(blocks[e], scales[e], self.w13.dtype)  # [O, in]
            if key == "gate_up_proj_blocks":
                self.w13[e].copy_(torch.cat((w[0::2], w[1::2])))
            else:
                self.w2[e].copy_(w)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`x [T, H]`, `index [T, k]`, `weights [T, k]` -> `sum_j weights[t, j] * expert_{index[t, j]}(x[t])`."""
        t, k = index.shape
        flat = index.reshape(-1)  # [T*k], pair p is token p // k
        out = x.new_empty(t * k, self.hidden)
        chosen = torch.unique(flat).tolist()
        self.bytes_streamed += len(chosen) * (self.w13[0].nbytes + self.w2[0].nbytes)
        for e in chosen:
            pairs = (flat == e).nonzero().squeeze(-1)
            gate_up = F.linear(x[pairs // k], self.w13[e])
            if self.b13 is not None:
                gate_up = gate_up + self.b13[e]
            gate, up = gate_up.chunk(2, dim=-1)
            y = F.linear(self.activation(gate, up), self.w2[e])
            out[pairs] = y if self.b2 is None else y + self.b2[e]
        weighted = out * weights.reshape(-1, 1)  # promotes to float32 with float32 router weights
        return weighted.view(t, k, self.hidden).sum(dim=1).to(x.dtype)
