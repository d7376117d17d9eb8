"""The model's forward pass over one sequence with a KV cache: embeddings, then per decoder layer
norm → attention op → residual → norm → MLP or MoE op → residual, then norm and lm_head.

Every supported architecture has this shape; the ops placed by the rules do the rest. The residual
stream stays on each decoder layer's device; modules on other devices get their input moved there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hetero_moe.inject.injector import PlacedModel
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
        # MoE blocks on a GPU with their routed experts on the CPU overlap the two, through one staging area
        overlapped = [m for m in placed.model.modules() if isinstance(m, MoEBlock) and m.overlaps()]
        self.staging = HostStaging(overlapped[0].device) if overlapped else None
        for block in overlapped:
            block.bind(self.staging)

    def new_cache(self, capacity: int) -> SequenceCache:
        return SequenceCache([layer.self_attn.new_cache(capacity, self.dtype) for layer in self.layers], capacity)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: SequenceCache) -> torch.Tensor:
        """Run `ids [T]` at positions `cache.length...`; returns float32 logits `[V]` of the last one."""
        start, t = cache.length, ids.shape[0]
        if start + t > cache.capacity:
            raise ValueError(f"{start + t} tokens exceed the cache capacity of {cache.capacity}")
        h = self.embed(ids.to(self.embed_device))  # [T, H]
        positions = torch.arange(start, start + t, device=self.rotary.inv_freq.device)
        rope_out = self.rotary(h.to(self.rotary.inv_freq.device)[None], positions[None])
        ropes: dict[torch.device, Rope] = {}
        for i, layer in enumerate(self.layers):
            dev, attn_dev, post_dev, mlp_dev = self.devices[i]
            if attn_dev not in ropes:
                ropes[attn_dev] = self.placed.arch.rope(self.config, _to(rope_out, attn_dev))
            h = h.to(dev)
            x = layer.input_layernorm(h)
            h = h + layer.self_attn(x.to(attn_dev), ropes[attn_dev], cache.layers[i], start).to(dev)
            x = layer.post_attention_layernorm(h.to(post_dev))
            h = h + layer.mlp(x.to(mlp_dev)).to(dev)
        cache.length = start + t
        h = self.norm(h[-1:].to(self.norm_device))
        return self.lm_head(h.to(self.head_device))[0].float()


def _to(value, device: torch.device):
    if isinstance(value, tuple):
        return tuple(v.to(device) for v in value)
    return value.to(device)
