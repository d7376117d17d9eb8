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

from functools import cached_property

import numba
import numpy as np
import torch
from torch import nn

from hetero_moe.engine.kv_cache import Batch
from hetero_moe.inject.injector import PlacedModel
from hetero_moe.kernels.numba import decoder as decoder_kernels
from hetero_moe.kernels.numba import norm as norm_kernels
from hetero_moe.ops.attention import MLAAttention, decode_rows
from hetero_moe.ops.base import module_device
from hetero_moe.ops.cpu_linear import CPULinear
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
        # the final norm and a CPU lm_head in Numba in the numpy decode lane (as AddNorm, CPULinear.run), or None
        plain_head = isinstance(self.lm_head, CPULinear) and self.lm_head.bias is None and _plain(self.norm)
        self.numpy_head = (AddNorm(self.norm, True), self.lm_head) if plain_head else None
        self.one_call = True  # the numpy decode lane's layers in one kernel call where it can (`OneCallLayers`)

    @cached_property
    def _one_call(self) -> OneCallLayers | None:
        """The layers' weights bound for one kernel call a step, at the first numpy decode step; None where the
        layers cannot take it."""
        return OneCallLayers.bind(self.layers, self.mixers, self.add_norms, self.numpy_head)

    def routed_bytes(self) -> int:
        """Weight bytes the routed experts have streamed so far: per call, those of the distinct experts."""
        one_call = self.__dict__.get("_one_call")  # bound at the first numpy decode step, if ever
        return sum(m.bytes_streamed for m in self.routed_experts) + (0 if one_call is None else one_call.streamed)

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
                return self._numpy_decode(h.numpy(), pairs, buffers, batch)
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

    def _numpy_decode(self, h: np.ndarray, pairs: list[tuple], buffers: list, batch: Batch) -> torch.Tensor:
        """`forward` of decode tokens `h [N, H]` (float32) on numpy arrays (`numpy_decode`), from the first layer
        to the logits: in one kernel call where `OneCallLayers` takes the step (unless `one_call` is off), else a
        few calls a layer, then the final norm and lm_head (in Numba where `numpy_head`: the same bits)."""
        one = self._one_call if self.one_call else None
        if one is not None and one.takes(h, pairs, batch):
            return torch.from_numpy(one.run(h, pairs[0], buffers, batch))
        h = self._numpy_layers(h, pairs, buffers, batch)
        if self.numpy_head is None:
            return self._head(torch.from_numpy(h), batch)
        norm, lm_head = self.numpy_head
        return torch.from_numpy(lm_head.run(norm.numpy(h[batch.sample_rows], None)[1]))

    def _numpy_layers(self, h: np.ndarray, pairs: list[tuple], buffers: list, batch: Batch) -> np.ndarray:
        """The decoder layers over decode tokens `h [N, H]` (float32), a few kernel calls a layer -> the residual
        stream after the last layer."""
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


class OneCallLayers:
    """A numpy decode step's decoder layers, final norm and lm_head in one kernel call (`decoder_kernels.step`): the
    same kernels in the same order as the per-layer calls, the same bits, without the Python between them (a millisecond
    a V2-Lite step, each line slow once the streamed weights have evicted the interpreter from the caches). Each kind of
    part's weights are bound once into a typed list; each linear's `Simd` tokens are passed once for a run of layers,
    so the layers of a call must run the same formats. Where they differ (a GGUF file that mixes block types per layer,
    as Q4_K_M does; rules that quantize some layers otherwise) the step makes one call per run of consecutive layers
    with the same formats, the residual stream passed from one to the next, and the last call takes the final norm
    and lm_head."""

    def __init__(self, blocks: list[MoEBlock], kinds: np.ndarray, runs: list[tuple[slice, tuple]]) -> None:
        self.kinds = kinds  # per layer, decoder_kernels.DENSE or MOE
        self.runs = runs  # (the run's layers, `run`'s arguments of `decoder_kernels.step` for them, bound once)
        self.expert_bytes = np.array([b.experts.format.nbytes() // b.experts.num_experts for b in blocks])
        self.streamed = 0  # routed expert bytes of the steps run here (as `CPUExperts.count_streamed` counts them)
        self.top_k = blocks[0].gate.top_k
        self.min_tokens = min(b.experts.torch_min_tokens for b in blocks)  # where a block's own path would leave
        self._caches: tuple[list, list] | None = None  # (the buffers, a typed list of their cache arrays a run)

    @classmethod
    def bind(
        cls, layers: list[nn.Module], mixers: list[nn.Module], add_norms: list, head: tuple | None
    ) -> OneCallLayers | None:
        if not all(getattr(m, "fused", False) for m in mixers):  # an attention's decode tokens take its own ops
            return None
        is_moe = [isinstance(x.mlp, MoEBlock) for x in layers]
        kinds = np.where(is_moe, decoder_kernels.MOE, decoder_kernels.DENSE)
        attention = [m._decode_args for m in mixers]
        mlps = [x.mlp._block_args if moe else x.mlp.kernel_args() for x, moe in zip(layers, is_moe, strict=True)]
        blocks = [x.mlp for x, moe in zip(layers, is_moe, strict=True) if moe]
        head_args = None if head is None else head[1].kernel_args()
        if head_args is None or not blocks or any(a is None for a in mlps):
            return None
        norms = [(pre.weight, pre.eps, post.weight, post.eps) for pre, post in add_norms]
        # a run without a layer of a kind takes the first such layer's types for it (never called)
        block = mlps[is_moe.index(True)]  # a dense MLP's stand-in: the routed experts' weights and tokens
        dense = mlps[is_moe.index(False)] if False in is_moe else (block[4], block[5], block[6])
        stand_in = {decoder_kernels.MOE: block, decoder_kernels.DENSE: dense}
        final = (head[0].weight, head[0].eps, *head_args)
        runs = []
        for layer_run in _runs(kinds, norms, attention, mlps):
            last = layer_run.stop == len(layers)
            args = _bind_run(kinds[layer_run], norms[layer_run], attention[layer_run], mlps[layer_run], stand_in,
                             final if last else (None,) * len(final))  # fmt: skip
            if args is None:
                return None
            runs.append((layer_run, args))
        return cls(blocks, kinds, runs)

    def takes(self, h: np.ndarray, pairs: list[tuple], batch: Batch) -> bool:
        """Whether the step goes in one call a run: one rotary table for all layers, the tokens in sequence order,
        and few enough for the routed experts' integer kernels."""
        t = h.shape[0]
        return (
            all(p is pairs[0] for p in pairs)
            and t * self.top_k < self.min_tokens
            and [s.begin for s in batch.seqs] == list(range(t))
        )

    def run(self, h: np.ndarray, pairs: tuple, buffers: list, batch: Batch) -> np.ndarray:
        """The step's decode tokens `h [N, H]` float32 -> the float32 logits of `batch.sample_rows`."""
        layout, cos, sin = pairs
        new_rows, rows, ends = decode_rows(batch.seqs)
        sample_rows = np.asarray(batch.sample_rows, np.int64)
        threads = numba.get_num_threads()
        used = np.zeros(len(self.kinds), np.int64)
        h = np.ascontiguousarray(h)
        for (layer_run, args), caches in zip(self.runs, self._cache_lists(buffers), strict=True):
            kinds, norms, attention, dense, moe, attention_simds, dense_simds, routed_simds, final = args
            h = decoder_kernels.step(
                h, cos, sin, layout, new_rows, rows, ends, threads, kinds, norms, caches, *attention_simds,
                attention, *dense_simds, dense, *routed_simds, moe, used[layer_run], sample_rows, *final,
            )  # fmt: skip
        self.streamed += int(used[self.kinds == decoder_kernels.MOE] @ self.expert_bytes)
        return h

    def _cache_lists(self, buffers: list) -> list:
        """Each run's cache arrays as a typed list, made again only when the engine's buffers change."""
        if self._caches is None or self._caches[0] is not buffers:
            lists = [_typed_list([b.arrays for b in buffers[layer_run]]) for layer_run, _ in self.runs]
            self._caches = (buffers, lists)
        return self._caches[1]


def _runs(kinds: np.ndarray, norms: list, attention: list, mlps: list) -> list[slice]:
    """The layers as runs of consecutive layers whose parts of each kind take the same Numba types (`Simd` tokens
    included): the most layers a `decoder_kernels.step` call can take."""
    runs, first, types = [], 0, {}
    for i, kind in enumerate(kinds):
        attn = (numba.typeof(norms[i]), numba.typeof(attention[i]))
        mlp = numba.typeof(mlps[i])
        if types and (types["attention"] != attn or types.get(kind, mlp) != mlp):
            runs.append(slice(first, i))
            first, types = i, {}
        types.setdefault("attention", attn)
        types.setdefault(kind, mlp)
    return [*runs, slice(first, len(kinds))]


def _bind_run(
    kinds: np.ndarray, norms: list, attention: list, mlps: list, stand_in: dict, final: tuple
) -> tuple | None:
    """`OneCallLayers.run`'s arguments of `decoder_kernels.step` for a run of layers (`_runs`); `final` the final
    norm and lm_head's, or Nones where the run is not the last. None where the run's parts cannot be bound."""
    dense = [a for a, kind in zip(mlps, kinds, strict=True) if kind == decoder_kernels.DENSE]
    block_args = [a for a, kind in zip(mlps, kinds, strict=True) if kind == decoder_kernels.MOE]
    # the Simd tokens apart: (stack, q, W_UK, W_UV, o_proj), (gate/up, down), (routed, shared gate/up, down)
    attention_simds, attention = _split(attention, (0, 2, 6, 8, 10))
    dense_simds, dense = _split(dense or [stand_in[decoder_kernels.DENSE]], (0, 1))
    routed_simds, moe = _split(block_args or [stand_in[decoder_kernels.MOE]], (4, 5, 7, 8))
    if None in (attention_simds, dense_simds, routed_simds):
        return None
    lists = [_typed_list(x) for x in (norms, attention, [a for (a,) in dense], moe)]
    if None in lists:
        return None
    norms, attention, dense_list, moe = lists
    if not any(kinds == decoder_kernels.DENSE):  # the stand-ins give the lists their types only
        dense_list.clear()
    if not any(kinds == decoder_kernels.MOE):
        moe.clear()
    return kinds, norms, attention, dense_list, moe, attention_simds, dense_simds, routed_simds, final


def _split(args: list[tuple], at: tuple[int, ...]) -> tuple[tuple | None, list[tuple]]:
    """Each layer's `args` less the `Simd` tokens at positions `at` -> (those tokens, the same in every layer, else
    None; the rest of each layer's); `()` and `[]` for no layers."""
    if not args:
        return (), []
    simds = tuple(args[0][i] for i in at)
    if any(tuple(a[i] for i in at) != simds for a in args):
        return None, []
    return simds, [tuple(x for i, x in enumerate(a) if i not in at) for a in args]


def _typed_list(items: list[tuple]):
    """`items` as a `numba.typed.List`, or None where their types differ."""
    kind = numba.typeof(items[0])
    if any(numba.typeof(x) != kind for x in items):
        return None
    out = numba.typed.List.empty_list(kind)
    for x in items:
        out.append(x)
    return out


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
