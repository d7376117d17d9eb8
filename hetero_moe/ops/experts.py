"""Routed experts in plain torch, in our own layout: the reference every faster experts op is
checked against, and the op for any device when speed does not matter.

Checkpoints keep experts one by one (`E.gate_proj.weight [I, H]`, `E.up_proj.weight [I, H]`,
`E.down_proj.weight [H, I]`); this op stacks them as `w13 [E, 2I, H]` (gate rows, then up rows)
and `w2 [E, H, I]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hetero_moe.ops.base import BuildContext, Op

_PROJ = {"gate_proj": 0, "up_proj": 1, "down_proj": 2}


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
        e, two_i, h = hf.gate_up_proj.shape
        self.num_experts, self.inter, self.hidden = e, two_i // 2, h
        self.act_fn = hf.act_fn
        meta = {"dtype": ctx.dtype, "device": "meta"}
        self.w13 = nn.Parameter(torch.empty(e, two_i, h, **meta), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, h, self.inter, **meta), requires_grad=False)
        self.bytes_streamed = 0  # weight bytes of the distinct experts of every call so far

    def checkpoint_keys(self) -> dict[str, torch.Size]:
        return expert_checkpoint_keys(self.num_experts, self.inter, self.hidden)

    def load_weight(self, key: str, tensor: torch.Tensor) -> None:
        if self.w13.is_meta:
            self.w13 = nn.Parameter(torch.empty_like(self.w13, device=self.device), requires_grad=False)
            self.w2 = nn.Parameter(torch.empty_like(self.w2, device=self.device), requires_grad=False)
        (e, part), i = parse_expert_key(key), self.inter
        target = self.w2[e] if part == 2 else self.w13[e, part * i : (part + 1) * i]
        target.copy_(tensor)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`x [T, H]`, `index [T, k]`, `weights [T, k]` -> `sum_j weights[t, j] * expert_{index[t, j]}(x[t])`."""
        t, k = index.shape
        flat = index.reshape(-1)  # [T*k], pair p is token p // k
        out = x.new_empty(t * k, self.hidden)
        chosen = torch.unique(flat).tolist()
        self.bytes_streamed += len(chosen) * (self.w13[0].nbytes + self.w2[0].nbytes)
        for e in chosen:
            pairs = (flat == e).nonzero().squeeze(-1)
            gate, up = F.linear(x[pairs // k], self.w13[e]).chunk(2, dim=-1)
            out[pairs] = F.linear(self.act_fn(gate) * up, self.w2[e])
        weighted = out * weights.reshape(-1, 1)  # promotes to float32 with float32 router weights
        return weighted.view(t, k, self.hidden).sum(dim=1).to(x.dtype)
