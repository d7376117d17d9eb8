"""The model's forward pass over the tokens of one or several sequences, each with its KV cache:
embeddings, then per decoder layer norm → attention op → residual → norm → MLP or MoE op → residual,
then norm and lm_head for the tokens whose logits are wanted.

Every supported architecture has this shape; the ops placed by the rules do the rest. The residual
stream stays on each decoder layer's device; modules on other devices get their input moved there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hetero_moe.inject.injector import PlacedModel
from hetero_moe.ops.attention import SeqSlice
from hetero_moe.ops.base import module_device
from hetero_moe.ops.moe import HostStaging, MoEBlock
from hetero_moe.ops.rope import Rope


@dataclass
class SequenceCache:
    """The KV cache of one sequence: one entry per decoder layer, `length` tokens filled."""

    layers: list
    capacity: int
    length: int = 0


class ModelRunner:
    def __init__(self, placed: PlacedModel) -> None:
        self.placed = placed
        self.config = placed.config
        self.dtype = placed.dtype
        core = placed.model.model
        self.embed = core.embed_tokens
        self.layers: list[nn.Module] = list(core.layers)
        self.norm = core.norm
        self.lm_head = placed.model.lm_head
        # The rotary module's inv_freq is a non-persistent buffer left on meta: rebuild it.
        rotary_device = placed.placements["model.rotary_emb"].device
        self.rotary = type(core.rotary_emb)(config=self.config).to(rotary_device)
        core.rotary_emb = self.rotary
        self.embed_device = module_device(self.embed)
        # per layer: (input norm, attention, post-attention norm, mlp) devices; the residual stays on the first
        self.devices = [
            tuple(module_device(m) for m in (x.input_layernorm, x.self_attn, x.post_attention_layernorm, x.mlp))
            for x in self.layers
        ]
        self.head_device = module_device(self.lm_head)
        self.norm_device = module_device(self.norm)
        self.vocab_size = self.lm_head.out_features
        blocks = [m for m in placed.model.modules() if isinstance(m, MoEBlock)]
        self.routed_experts = [b.experts for b in blocks]
        # MoE blocks on a GPU with their routed experts on the CPU overlap the two, through one staging area
        overlapped = [b for b in blocks if b.overlaps()]
        self.staging = HostStaging(overlapped[0].device) if overlapped else None
        for block in overlapped:
            block.bind(self.staging)

    def routed_bytes(self) -> int:
        """Weight bytes the routed experts have streamed so far: per call, those of the distinct experts."""
        return sum(m.bytes_streamed for m in self.routed_experts)

    def new_cache(self, capacity: int) -> SequenceCache:
        return SequenceCache(self.new_buffers(capacity), capacity)

    def new_buffers(self, rows: int) -> list:
        """Per decoder layer, KV cache buffers of `rows` token rows (one sequence's cache, or a pool)."""
        return [layer.self_attn.new_cache(rows, self.dtype) for layer in self.layers]

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: SequenceCache) -> torch.Tensor:
        """Run `ids [T]` at positions `cache.length...`; returns float32 logits `[V]` of the last one."""
        start, t = cache.length, ids.shape[0]
        if start + t > cache.capacity:
            raise ValueError(f"{start + t} tokens exceed the cache capacity of {cache.capacity}")
        seq = SeqSlice(0, t, start, slice(start, start + t), slice(0, start + t))
        logits = self.forward_batch(ids, torch.arange(start, start + t), cache.layers, [seq], [t - 1])
        cache.length = start + t
        return logits[0]

    @torch.inference_mode()
    def forward_batch(
        self, ids: torch.Tensor, positions: torch.Tensor, buffers: list, seqs: list[SeqSlice], rows: list[int]
    ) -> torch.Tensor:
        """Run the tokens of several sequences at once: `ids [N]` at `positions [N]`, the sequences' shares
        and cache rows in `seqs`, their caches in `buffers` (per layer). Returns float32 logits `[len(rows),
        V]` of the tokens at `rows`."""
        h = self.embed(ids.to(self.embed_device))  # [N, H]
        rope_device = self.rotary.inv_freq.device
        rope_out = self.rotary(h.to(rope_device)[None], positions.to(rope_device)[None])
        ropes: dict[torch.device, Rope] = {}
        for i, layer in enumerate(self.layers):
            dev, attn_dev, post_dev, mlp_dev = self.devices[i]
            if attn_dev not in ropes:
                ropes[attn_dev] = self.placed.arch.rope(self.config, _to(rope_out, attn_dev))
            h = h.to(dev)
            x = layer.input_layernorm(h)
            h = h + layer.self_attn(x.to(attn_dev), ropes[attn_dev], buffers[i], seqs).to(dev)
            x = layer.post_attention_layernorm(h.to(post_dev))
            h = h + layer.mlp(x.to(mlp_dev)).to(dev)
        h = h[rows]
        h = self.norm(h.to(self.norm_device))
        return self.lm_head(h.to(self.head_device)).float()


def _to(value, device: torch.device):
    if isinstance(value, tuple):
        return tuple(v.to(device) for v in value)
    return value.to(device)
