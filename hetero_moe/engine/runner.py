"""The model's forward pass over the tokens of one or several sequences, each with its KV cache:
embeddings, then per decoder layer norm → attention op → residual → norm → MLP or MoE op → residual,
then norm and lm_head for the tokens whose logits are wanted.

Every supported architecture has this shape; the ops placed by the rules do the rest. The attention is
`self_attn`, or `linear_attn` in the linear-attention layers of Qwen3.5-MoE and Qwen3-Next, whose
buffers hold a state per sequence slot instead of KV rows. The residual
stream stays on each decoder layer's device; modules on other devices get their input moved there.
Each residual add goes with the norm after it; in a layer whose attention runs fused on the CPU (quantized,
float32: already rounded apart from the per-op path) both are one Numba call (`kernels/numba/norm.py`).
When every layer runs so, its MLP or MoE block on the quantized CPU kernels too, a step of decode tokens goes
through the layers on numpy arrays (`_numpy_layers`): the same calls and bits, without a torch tensor between
them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hetero_moe.engine.kv_cache import Batch
from hetero_moe.inject.injector import PlacedModel
from hetero_moe.kernels.numba import norm as norm_kernels
from hetero_moe.ops.attention import MLAAttention
from hetero_moe.ops.base import module_device
from hetero_moe.ops.linear_attention import is_recurrent, token_mixer
from hetero_moe.ops.mlp import QuantGatedMLP
from hetero_moe.ops.moe import MoEBlock
from hetero_moe.ops.rope import Rope
from hetero_moe.ops.staging import OverlapStats


class ModelRunner:
    def __init__(self, placed: PlacedModel) -> None:
        self.placed = placed
        self.config = placed.config
        self.dtype = placed.dtype
        core = placed.model.model
        self.embed = core.embed_tokens
        self.layers: list[nn.Module] = list(core.layers)
        self.mixers: list[nn.Module] = [token_mixer(x) for x in self.layers]  # each layer's attention op
        self.recurrent = any(is_recurrent(m) for m in self.mixers)  # a state per sequence in some layers
        self.norm = core.norm
        self.lm_head = placed.model.lm_head
        # The rotary module's inv_freq is a non-persistent buffer left on meta: rebuild it.
        rotary_device = placed.placements["model.rotary_emb"].device
        self.rotary = type(core.rotary_emb)(config=self.config).to(rotary_device)
        core.rotary_emb = self.rotary
        self.embed_device = module_device(self.embed)
        # per layer: (input norm, attention, post-attention norm, mlp) devices; the residual stays on the first
        self.devices = [
            tuple(module_device(m) for m in (x.input_layernorm, attn, x.post_attention_layernorm, x.mlp))
            for x, attn in zip(self.layers, self.mixers, strict=True)
        ]
        self.add_norms = [_add_norms(x, attn) for x, attn in zip(self.layers, self.mixers, strict=True)]
        self.head_device = module_device(self.lm_head)
        self.norm_device = module_device(self.norm)
        self.vocab_size = self.lm_head.out_features
        paged = [m for m in self.mixers if not is_recurrent(m)] or self.mixers
        self.cache_device = module_device(paged[0])  # where the KV cache pool lives
        self.routed_experts = [m.experts for m in placed.model.modules() if isinstance(m, MoEBlock)]
        layers = zip(self.layers, self.mixers, self.add_norms, strict=True)
        self.numpy_decode = self.embed_device.type == "cpu" and all(_numpy_layer(*x) for x in layers)

    def routed_bytes(self) -> int:
        """Weight bytes the routed experts have streamed so far: per call, those of the distinct experts."""
        return sum(m.bytes_streamed for m in self.routed_experts)

    def overlap_stats(self) -> OverlapStats | None:
        """Time in the CPU experts and waiting for them, where MoE blocks overlap them with a GPU."""
        staging = self.placed.services.overlap
        return staging.stats if staging is not None else None

    def new_buffers(self, rows: int, slots: int = 1) -> list:
        """Per decoder layer, KV cache buffers of `rows` token rows (one sequence's cache, or a pool), or in
        a linear-attention layer the state of `slots` sequences."""
        return [
            m.new_state(slots, self.dtype) if is_recurrent(m) else m.new_cache(rows, self.dtype) for m in self.mixers
        ]

    def state_bytes(self, slots: int) -> dict[torch.device, int]:
        """Bytes of the linear-attention layers' state for `slots` sequences, per device."""
        per_device: dict[torch.device, int] = {}
        for m in self.mixers:
            if is_recurrent(m):
                per_device[m.device] = per_device.get(m.device, 0) + m.state_bytes(slots, self.dtype)
        return per_device

    @torch.inference_mode()
    def forward(self, batch: Batch, buffers: list) -> torch.Tensor:
        """Run the tokens of one or several sequences at once, with their caches in `buffers` (per layer);
        float32 logits `[len(batch.sample_rows), V]` of the tokens whose next token is sampled."""
        h = self.embed(batch.ids.to(self.embed_device))  # [N, H]
        rope_device = self.rotary.inv_freq.device
        rope_out = self.rotary(h.to(rope_device)[None], batch.positions.to(rope_device)[None])
        if self.numpy_decode and all(s.count == 1 for s in batch.seqs):
            rope = self.placed.arch.rope(self.config, _to(rope_out, torch.device("cpu")))
            pairs = [m.decode_pairs(rope) for m in self.mixers]
            if all(p is not None for p in pairs):
                return self._head(torch.from_numpy(self._numpy_layers(h.numpy(), pairs, buffers, batch)), batch)
        ropes: dict[torch.device, Rope] = {}
        delta = None  # the last layer's MLP output, added to the residual stream with the next norm
        for i, layer in enumerate(self.layers):
            dev, attn_dev, post_dev, mlp_dev = self.devices[i]
            if attn_dev not in ropes:
                ropes[attn_dev] = self.placed.arch.rope(self.config, _to(rope_out, attn_dev))
            pre, post = self.add_norms[i]
            h, x = pre(h.to(dev), None if delta is None else delta.to(dev), dev)
            attn = self.mixers[i](x.to(attn_dev), ropes[attn_dev], buffers[i], batch.seqs)
            h, x = post(h, attn.to(dev), post_dev)
            delta = layer.mlp(x.to(mlp_dev))
        return self._head(h + delta.to(h.device), batch)

    def _numpy_layers(self, h: np.ndarray, pairs: list[tuple], buffers: list, batch: Batch) -> np.ndarray:
        """The decoder layers over decode tokens `h [N, H]` (float32) on numpy arrays (`numpy_decode`) -> the
        residual stream after the last layer."""
        delta = None
        for i, layer in enumerate(self.layers):
            pre, post = self.add_norms[i]
            h, x = pre.numpy(h, delta)
            attn = self.mixers[i].decode(x, pairs[i], buffers[i], batch.seqs)
            h, x = post.numpy(h, attn)
            delta = layer.mlp.run(x)
        return h + delta

    def _head(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        h = self.norm(h[batch.sample_rows].to(self.norm_device))
        return self.lm_head(h.to(self.head_device)).float()

    def close(self) -> None:
        """Stop what the ops share (the CPU experts' worker thread)."""
        self.placed.services.close()


class AddNorm:
    """`(h, delta) -> (h + delta, norm(h + delta))`: the residual add (none when `delta` is None) and the
    norm after it, the norm on `device` (the sum stays on h's). `fast`: in one Numba call, for a plain RMSNorm
    on float32 CPU tensors."""

    def __init__(self, norm: nn.Module, fast: bool) -> None:
        self.norm = norm
        self.fast = fast
        if fast:
            self.weight = norm.weight.detach().numpy()
            self.eps = norm.variance_epsilon

    def __call__(self, h: torch.Tensor, delta: torch.Tensor | None, device: torch.device):
        if self.fast:
            total, normed = self.numpy(h.numpy(), None if delta is None else delta.float().numpy())
            return torch.from_numpy(total), torch.from_numpy(normed)
        if delta is not None:
            h = h + delta
        return h, self.norm(h.to(device))

    def numpy(self, h: np.ndarray, delta: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The `fast` step on float32 numpy arrays."""
        if delta is None:
            return h, norm_kernels.rms_norm(h, self.weight, self.eps)
        return norm_kernels.add_rms_norm(h, delta, self.weight, self.eps)


def _add_norms(layer: nn.Module, attn: nn.Module) -> tuple[AddNorm, AddNorm]:
    """A decoder layer's input and post-attention norms as `AddNorm`s, in Numba where its attention is fused."""
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    fast = getattr(attn, "fused", False) and all(map(_plain, norms))
    return AddNorm(norms[0], fast), AddNorm(norms[1], fast)


def _numpy_layer(layer: nn.Module, attn: nn.Module, norms: tuple[AddNorm, AddNorm]) -> bool:
    """Whether a decoder layer's decode tokens can go through it on numpy arrays: Numba norms (so its latent
    attention is fused), and its MLP or MoE block on the quantized CPU kernels."""
    mlp = layer.mlp
    numpy_mlp = isinstance(mlp, QuantGatedMLP) or (isinstance(mlp, MoEBlock) and mlp.numpy_lane)
    return isinstance(attn, MLAAttention) and all(n.fast for n in norms) and numpy_mlp


def _plain(norm: nn.Module) -> bool:
    """Whether `norm` is an RMSNorm `AddNorm` can run in Numba: float32 weight on the CPU, an epsilon."""
    w = getattr(norm, "weight", None)
    return w is not None and w.device.type == "cpu" and w.dtype == torch.float32 and hasattr(norm, "variance_epsilon")


def _to(value, device: torch.device):
    if isinstance(value, tuple):
        return tuple(v.to(device) for v in value)
    return value.to(device)
