"""Gated DeltaNet, the linear attention of Qwen3.5-MoE and Qwen3-Next (three of their four layers).

Unlike attention it keeps no row per token: each sequence has a fixed-size state, the last K-1 inputs of
its short causal convolution and the recurrent matrix of its delta rule per value head. The engine
holds these in slots (`RecurrentState`, one slot per running sequence, `engine/state.py`) beside the
paged KV cache of the full-attention layers; each `SeqSlice` names its sequence's slot. A sequence that
starts at position 0 starts from zeros, whatever its slot held before: a slot needs no clearing when
it is handed to the next request, and a preempted request recomputes its state from its tokens.

Prompt chunks run the chunked form, one sequence at a time; decode tokens (one per sequence) run one
recurrent step over all of them at once. The math is transformers' `Qwen3_5MoeGatedDeltaNet`
(`kernels/gated_delta.py`), so float32 results match it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hetero_moe.kernels.gated_delta import causal_conv, chunk_gated_delta, recurrent_gated_delta
from hetero_moe.ops.attention import SeqSlice
from hetero_moe.ops.base import BuildContext, Op
from hetero_moe.ops.rope import Rope


@dataclass
class RecurrentState:
    """One linear-attention layer's state for `slots` sequences."""

    conv: torch.Tensor  # [slots, conv_dim, K-1]: the last inputs of the causal convolution, activation dtype
    ssm: torch.Tensor  # [slots, v_heads, k_dim, v_dim]: the delta rule's state, float32


class GatedDeltaNet(Op):
    """`forward(x [N, H], rope, state, seqs) -> [N, H]`, the attention ops' calling convention; rope is
    unused (no positions: the recurrence orders the tokens)."""

    recurrent: ClassVar[bool] = True  # state per sequence in slots, not per token in the paged pool

    def __init__(self, hf: nn.Module, ctx: BuildContext) -> None:
        super().__init__(ctx.device)
        if hf.activation not in ("silu", "swish"):
            raise ValueError(f"the gated delta net's convolution takes silu, got {hf.activation!r}")
        self.k_heads, self.v_heads = hf.num_k_heads, hf.num_v_heads
        self.k_dim, self.v_dim = hf.head_k_dim, hf.head_v_dim
        if self.v_heads % self.k_heads:
            raise ValueError(f"value heads ({self.v_heads}) must be a multiple of key heads ({self.k_heads})")
        self.conv_dim, self.kernel = hf.conv_dim, hf.conv_kernel_size
        self.conv1d = hf.conv1d  # depthwise, weight [conv_dim, 1, K], no bias
        self.dt_bias, self.A_log = hf.dt_bias, hf.A_log  # [v_heads] each
        self.norm, self.out_proj = hf.norm, hf.out_proj  # gated RMSNorm per value head, then [H, v_heads * v_dim]
        if hasattr(hf, "in_proj_qkvz"):  # Qwen3-Next: q, k, v, z and b, a interleaved per key head
            self.in_proj_qkvz, self.in_proj_ba = hf.in_proj_qkvz, hf.in_proj_ba
            self._project = self._project_grouped
        else:  # Qwen3.5: one projection each
            self.in_proj_qkv, self.in_proj_z = hf.in_proj_qkv, hf.in_proj_z
            self.in_proj_b, self.in_proj_a = hf.in_proj_b, hf.in_proj_a
            self._project = self._project_split

    def cache_bytes(self, capacity: int, dtype: torch.dtype) -> int:
        return 0  # nothing per token

    def state_bytes(self, slots: int, dtype: torch.dtype) -> int:
        conv = self.conv_dim * (self.kernel - 1) * dtype.itemsize
        return slots * (conv + self.v_heads * self.k_dim * self.v_dim * 4)

    def new_state(self, slots: int, dtype: torch.dtype, device: torch.device | None = None) -> RecurrentState:
        device = device or self.device
        return RecurrentState(
            conv=torch.zeros(slots, self.conv_dim, self.kernel - 1, dtype=dtype, device=device),
            ssm=torch.zeros(slots, self.v_heads, self.k_dim, self.v_dim, dtype=torch.float32, device=device),
        )

    def forward(self, x: torch.Tensor, rope: Rope, state: RecurrentState, seqs: list[SeqSlice]) -> torch.Tensor:
        n = x.shape[0]
        qkv, z, b, a = self._project(x)  # [N, conv_dim], [N, v_heads, v_dim], [N, v_heads] x2
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # [N, v_heads], log decay
        weight = self.conv1d.weight[:, 0]  # [conv_dim, K]
        out = qkv.new_empty(n, self.v_heads, self.v_dim)
        decode = [s for s in seqs if s.count == 1 and s.start > 0]
        if decode:  # one token of each: one recurrent step over all of them
            rows = torch.tensor([s.begin for s in decode], device=x.device)
            slots = torch.tensor([s.slot for s in decode], device=state.conv.device)
            mixed, state.conv[slots] = causal_conv(qkv[rows].unsqueeze(-1), state.conv[slots], weight)
            q, k, v = self._split(mixed.transpose(1, 2))  # [B, 1, heads, dim]
            o, state.ssm[slots] = recurrent_gated_delta(q, k, v, g[rows, None], beta[rows, None], state.ssm[slots])
            out[rows] = o[:, 0]
        for s in seqs:
            if s.count == 1 and s.start > 0:
                continue
            # a prompt chunk: from zeros at the sequence's start, else from where its last chunk ended
            fresh = s.start == 0
            one = slice(s.slot, s.slot + 1)
            conv = torch.zeros_like(state.conv[one]) if fresh else state.conv[one]
            mixed, state.conv[one] = causal_conv(qkv[s.tokens].t()[None], conv, weight)
            q, k, v = self._split(mixed.transpose(1, 2))  # [1, T, heads, dim]
            initial = None if fresh else state.ssm[one]
            o, state.ssm[one] = chunk_gated_delta(q, k, v, g[s.tokens][None], beta[s.tokens][None], initial)
            out[s.tokens] = o[0]
        core = self.norm(out.reshape(-1, self.v_dim), z.reshape(-1, self.v_dim))
        return self.out_proj(core.reshape(n, -1))

    def _split(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`[B, T, conv_dim]` -> q, k `[B, T, k_heads, k_dim]`, v `[B, T, v_heads, v_dim]`."""
        key = self.k_heads * self.k_dim
        q, k, v = torch.split(mixed, [key, key, self.v_heads * self.v_dim], dim=-1)
        b, t = mixed.shape[:2]
        return q.reshape(b, t, -1, self.k_dim), k.reshape(b, t, -1, self.k_dim), v.reshape(b, t, -1, self.v_dim)

    def _project_split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = x.shape[0]
        z = self.in_proj_z(x).view(n, self.v_heads, self.v_dim)
        return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)

    def _project_grouped(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Qwen3-Next: per key head, its q, k, then the v and z of its group of value heads; b and a alike."""
        n, group = x.shape[0], self.v_heads // self.k_heads
        qkvz = self.in_proj_qkvz(x).view(n, self.k_heads, 2 * self.k_dim + 2 * group * self.v_dim)
        q, k, v, z = torch.split(qkvz, [self.k_dim, self.k_dim, group * self.v_dim, group * self.v_dim], dim=2)
        b, a = torch.split(self.in_proj_ba(x).view(n, self.k_heads, 2 * group), [group, group], dim=2)
        qkv = torch.cat((q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1)), dim=-1)
        return qkv, z.reshape(n, self.v_heads, self.v_dim), b.reshape(n, self.v_heads), a.reshape(n, self.v_heads)


def token_mixer(layer: nn.Module) -> nn.Module:
    """A decoder layer's attention: `self_attn`, or `linear_attn` in the linear-attention layers."""
    mixer = getattr(layer, "self_attn", None)
    return mixer if mixer is not None else layer.linear_attn


def is_recurrent(mixer: nn.Module) -> bool:
    """Whether a decoder layer's token mixer keeps a state per sequence (slots) instead of KV rows."""
    return getattr(mixer, "recurrent", False)
