"""Gated MLP (SiLU(gate) * up, then down): dense layers and shared experts."""

from __future__ import annotations

import torch
from torch import nn

from hetero_moe.ops.base import BuildContext, Op


class GatedMLP(Op):
    def __init__(self, hf: nn.Module, ctx: BuildContext) -> None:
        super().__init__(ctx.device)
        self.gate_proj, self.up_proj, self.down_proj = hf.gate_proj, hf.up_proj, hf.down_proj
        self.act_fn = hf.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
