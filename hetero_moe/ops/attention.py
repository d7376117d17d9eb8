"""Attention ops with a KV cache: multi-head latent attention (DeepSeek-V2/V3, Kimi-K2; DeepSeek-V3.2
with its lightning indexer) and grouped-query attention (Qwen3-MoE, Mixtral, GLM-4.5, MiniMax-M2, gpt-oss
with its attention sinks and sliding-window layers).

Tokens of one or several sequences arrive flattened as `[N, H]`; each `SeqSlice` says which rows
of them belong to one sequence, the position of its first token, and which rows of the cache buffers
hold that sequence's tokens (a plain range for a sequence's own cache, page rows of a shared pool
otherwise). Projections run on all N tokens at once, attention per sequence over its own cache. The
math mirrors transformers' own modules step by step so float32 results match them token for token.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, ClassVar, Self

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hetero_moe.kernels.numba import latent as latent_kernels
from hetero_moe.ops.base import BuildContext, Op
from hetero_moe.ops.cpu_linear import CPULinear, HeadLinear, stacked
from hetero_moe.ops.rope import HalfRope, Rope

SPLIT_ROWS = 256  # cache rows per program of the latent decode kernel (8K tokens: 32 splits per head group)
Rows = slice | torch.Tensor  # cache rows: a range (a view, no copy) or int64 indices (gathered)


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's share of a batch: tokens `begin .. begin + count - 1` of the flattened input, at
    positions `start .. start + count - 1`; its cache rows for those new tokens, and for all of its
    `start + count` tokens; and its slot in the state buffers of linear-attention layers."""

    begin: int
    count: int
    start: int
    new_rows: Rows
    all_rows: Rows
    slot: int = 0

    @property
    def tokens(self) -> slice:
        return slice(self.begin, self.begin + self.count)

    @property
    def end(self) -> int:
        return self.start + self.count

    @cached_property
    def new_index(self) -> np.ndarray:
        """`new_rows` as int64 numpy indices, for the CPU latent kernels (once a step: every layer reads them)."""
        return _index([self.new_rows]).numpy()

    @cached_property
    def all_index(self) -> np.ndarray:
        """`all_rows` as int64 numpy indices, likewise."""
        return _index([self.all_rows]).numpy()


class PagedRows:
    """A cache whose tensors hold one row per token along `ROW_DIM`: rows can be copied between two caches
    of the same layer (a GPU pool and its host tier, say)."""

    ROW_DIM: ClassVar[int]

    def copy_rows(self, src: PagedRows, dst_rows: torch.Tensor, src_rows: torch.Tensor) -> None:
        """Rows `src_rows` of `src` into rows `dst_rows` of this cache, across devices."""
        for f in fields(self):
            dst, source = getattr(self, f.name), getattr(src, f.name)
            rows = source.index_select(self.ROW_DIM, src_rows.to(source.device)).to(dst.device)
            dst.index_copy_(self.ROW_DIM, dst_rows.to(dst.device), rows)


@dataclass
class MLACache(PagedRows):
    ROW_DIM = 0
    latent: torch.Tensor  # [capacity, kv_lora_rank], after kv_a_layernorm
    k_pe: torch.Tensor  # [capacity, qk_rope_head_dim], rotated

    @cached_property
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """numpy views of `latent` and `k_pe` (CPU tensors only), made once."""
        return self.latent.numpy(), self.k_pe.numpy()


def decode_rows(seqs: list[SeqSlice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`latent_kernels.decode`'s cache rows for one decode token of each of `seqs`: (the row each token writes,
    every sequence's rows one after another, where each sequence's rows end)."""
    if len(seqs) == 1:
        rows = seqs[0].all_index
        return seqs[0].new_index, rows, np.array([len(rows)])
    new_rows, rows = (np.concatenate([getattr(s, name) for s in seqs]) for name in ("new_index", "all_index"))
    return new_rows, rows, np.cumsum([len(s.all_index) for s in seqs])


@dataclass
class DSACache(MLACache):
    index_k: torch.Tensor  # [capacity, index_head_dim], the indexer's rotated key


@dataclass
class GQACache(PagedRows):
    ROW_DIM = 2
    k: torch.Tensor  # [1, kv_heads, capacity, head_dim], rotated
    v: torch.Tensor  # [1, kv_heads, capacity, head_dim]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of `q [1, h, T, d]` (positions start..start+T-1) over `k, v [1, kv_h, L, d]`,
    each kv head shared by `h // kv_h` query heads; with `window`, each query sees its last `window` positions
    (its own included); `sinks [h]` (gpt-oss) are one more logit per head in the softmax's denominator."""
    t, length = q.shape[2], k.shape[2]
    if t == 1 and q.device.type == "cpu":
        return _decode_cpu(q, k, v, scale, window, sinks)
    if sinks is not None:
        return _attend_sinks(q, k, v, start, scale, window, sinks)
    if window is None or length <= window:
        gqa = k.shape[1] != q.shape[1]
        if t == 1:
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
        if start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    q_pos = torch.arange(start, start + t, device=q.device)[:, None]
    k_pos = torch.arange(length, device=q.device)[None, :]
    mask = k_pos <= q_pos  # [T, L]
    if window is not None:
        mask &= q_pos - k_pos < window
    return F.scaled_dot_product_attention(q, _repeat(k, q), _repeat(v, q), attn_mask=mask, scale=scale)


def _decode_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None, sinks: torch.Tensor | None
) -> torch.Tensor:
    """One query per head on the CPU: each kv head's group of query heads in two matmuls, float32 (SDPA's
    grouped-query path is slow there)."""
    _, h, _, d = q.shape
    kv = k.shape[1]
    if window is not None:  # the last `window` positions, the query's own included
        k, v = k[:, :, -window:], v[:, :, -window:]
    scores = torch.matmul(q.float().view(kv, h // kv, d), k[0].float().transpose(1, 2)) * scale  # [kv, g, L]
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        probs = _softmax_with_sinks(scores, sinks.float().view(kv, h // kv, 1))
    out = torch.matmul(probs, v[0].float())  # [kv, g, dv]
    return out.view(1, h, 1, -1).to(q.dtype)


def _softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Softmax of `scores [..., L]` with one more logit per row, `sinks [..., 1]`, whose probability is dropped:
    transformers' gpt-oss eager attention, step by step (the max subtracted before the softmax too)."""
    logits = torch.cat((scores, sinks.expand(*scores.shape[:-1], 1).to(scores.dtype)), dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    return F.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]


def _attend_sinks(q, k, v, start: int, scale: float, window: int | None, sinks: torch.Tensor) -> torch.Tensor:
    """`attend` with attention sinks, in matmuls: `[1, h, T, d]` queries, keys before the window dropped."""
    t, length = q.shape[2], k.shape[2]
    first = 0 if window is None else max(0, start - window + 1)  # earliest position any query sees
    k, v = k[:, :, first:], v[:, :, first:]
    q_pos = torch.arange(start, start + t, device=q.device)[:, None]
    k_pos = torch.arange(first, length, device=q.device)[None, :]
    mask = k_pos <= q_pos  # [T, L']
    if window is not None:
        mask &= q_pos - k_pos < window
    scores = torch.matmul(q, _repeat(k, q).transpose(2, 3)) * scale  # [1, h, T, L']
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = _softmax_with_sinks(scores, sinks.view(1, -1, 1, 1))
    return torch.matmul(probs.to(v.dtype), _repeat(v, q))


def _repeat(kv: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`[1, kv_h, L, d]` to `[1, h, L, d]`, each kv head repeated for its group of query heads."""
    groups = q.shape[1] // kv.shape[1]
    if groups == 1:
        return kv
    _, h, length, d = kv.shape
    return kv[:, :, None].expand(1, h, groups, length, d).reshape(1, h * groups, length, d)


@dataclass(frozen=True)
class AttentionKwargs:
    # Latent attention only: fold kv_b_proj into the query and the output, so the cached latent is
    # never expanded per head (the way to decode long contexts); off by default because its float
    # rounding differs from transformers' expanded form.
    absorb: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.absorb, bool):
            raise ValueError(f"absorb must be true or false, got {self.absorb!r}")


class LightningIndexer(nn.Module):
    """DeepSeek-V3.2's lightning indexer (DeepSeek Sparse Attention), part of the latent attention op: its
    own small heads score every earlier token for each query (per head ReLU(q . k), summed with weights the
    token's hidden state gives each head), and attention then reads only the `topk` best. Its rotated key
    per token lives in the paged cache beside the latent. The math is transformers' DeepseekV32Indexer:
    the release's Hadamard rotation and FP8 scoring are precision tricks it leaves out too."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.wq_b, self.wk, self.k_norm, self.weights_proj = hf.wq_b, hf.wk, hf.k_norm, hf.weights_proj
        self.n_heads, self.head_dim, self.rope_dim = hf.n_heads, hf.head_dim, hf.qk_rope_head_dim
        self.topk, self.scale = hf.index_topk, hf.softmax_scale

    def project(self, x: torch.Tensor, q_resid: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, ...]:
        """`x [N, H]`, `q_resid [N, q_lora_rank]` -> queries `[N, h, d]`, keys `[N, d]` (the first rope dims
        rotated, halves paired, unlike the latent attention's interleaved pairs), head weights `[N, h]` fp32."""
        n = x.shape[0]
        half = HalfRope(rope.cos, rope.sin)
        q = half.apply(self.wq_b(q_resid).view(1, n, self.n_heads, self.head_dim).transpose(1, 2))  # [1, h, N, d]
        k = half.apply(self.k_norm(self.wk(x)).view(1, 1, n, self.head_dim))[0, 0]  # [N, d]
        weights = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * self.n_heads**-0.5
        return q[0].transpose(0, 1), k, weights

    def select(self, q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, start: int) -> torch.Tensor | None:
        """Queries `q [T, h, d]` at positions start.. over the cached `keys [L, d]` -> `[T, L]` bool, the
        earlier tokens each keeps (its `topk` best); None when every query keeps all of them."""
        t, length = q.shape[0], keys.shape[0]
        if length <= self.topk:
            return None
        scores = F.relu(torch.matmul(q.float(), keys.float().t()) * self.scale)  # [T, h, L]
        index = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)  # [T, L]
        q_pos = torch.arange(start, start + t, device=q.device)[:, None]
        causal = torch.arange(length, device=q.device)[None, :] <= q_pos  # [T, L]
        top = index.masked_fill(~causal, float("-inf")).topk(self.topk, dim=-1).indices
        return torch.zeros_like(causal).scatter_(1, top, True) & causal


class MLAAttention(Op):
    """DeepSeek multi-head latent attention. The cache holds only the normalised latent and the rotated
    rope key per token. Keys and values are re-expanded through `kv_b_proj`, exactly as transformers
    does; with `absorb`, decode (one token) never expands them: `kv_b_proj` is split per head into W_UK
    `[h, nope, r]` and W_UV `[h, v, r]`, the query's nope part becomes `q W_UK` in latent space, the
    attention is one multi-query attention over `[latent, k_pe]` with the latent as value (a Triton
    kernel on a GPU), and W_UV maps its output back per head. Prefill keeps the expanded form, which
    costs fewer operations when the queries are as many as the keys. DeepSeek-V3.2's lightning indexer
    picks the tokens each query attends to once a context is longer than its `index_topk`: prefill masks
    the rest, absorbed decode reads only the rows it kept."""

    def __init__(self, hf: nn.Module, ctx: BuildContext, kwargs: AttentionKwargs | None = None) -> None:
        super().__init__(ctx.device)
        self.absorb = bool(kwargs and kwargs.absorb)
        self.dtype = ctx.dtype
        self.num_heads = hf.num_heads
        self.q_lora_rank = hf.q_lora_rank
        self.kv_lora_rank = hf.kv_lora_rank
        self.nope_dim = hf.qk_nope_head_dim
        self.rope_dim = hf.qk_rope_head_dim
        self.v_dim = hf.v_head_dim
        self.scaling = hf.scaling
        if self.q_lora_rank is None:
            self.q_proj = hf.q_proj
        else:
            self.q_a_proj = hf.q_a_proj
            self.q_a_layernorm = hf.q_a_layernorm
            self.q_b_proj = hf.q_b_proj
        self.kv_a_proj_with_mqa = hf.kv_a_proj_with_mqa
        self.kv_a_layernorm = hf.kv_a_layernorm
        self.kv_b_proj = hf.kv_b_proj
        self.o_proj = hf.o_proj
        self.indexer = LightningIndexer(hf.indexer) if hasattr(hf, "indexer") else None  # DeepSeek-V3.2
        self.head_blocks: dict[str, tuple[str, np.ndarray]] = {}  # `use_head_blocks`
        # the Triton latent kernel on a GPU (or on the CPU under Triton's interpreter, in tests)
        self.kernel = (ctx.device.type == "cuda" or ctx.services.triton_on_cpu) and importlib.util.find_spec("triton")
        if self.kernel:
            self._latent_attend = self._latent_attend_triton
        else:
            self._latent_attend = self._latent_attend_cpu if ctx.device.type == "cpu" else self._latent_attend_sdpa

    @classmethod
    def from_hf(cls, hf: nn.Module, ctx: BuildContext, kwargs: Any) -> Self:
        return cls(hf, ctx, kwargs)

    def injected(self) -> None:
        """Absorbed decode on the CPU quantizes W_UK and W_UV from `kv_b_proj`'s float weight, not from its
        quantized copy (W_UK runs along another axis: that would quantize it twice)."""
        if self.absorb and isinstance(self.kv_b_proj, CPULinear):
            self.kv_b_proj.keep_source = True

    def use_head_blocks(self, name: str, block_type: str, raw: np.ndarray) -> None:
        """Before finalize: W_UK (`name` "uk") or W_UV ("uv") as a GGUF file holds it apart from the other
        (llama.cpp's `attn_k_b [h, r, nope]`, `attn_v_b [h, v, r]`): its block type and memory-mapped blocks
        `[h, O, row bytes]`. Absorbed decode on the CPU runs those blocks as they are, where it would quantize
        `kv_b_proj`'s weight again per head; the expanded path (prefill) keeps `kv_b_proj`."""
        if name not in ("uk", "uv"):
            raise KeyError(name)
        self.head_blocks[name] = (block_type, raw)

    def finalize(self) -> None:
        # the projections of x (the query's, or its low-rank one, and the latent's) in one call where they can be
        first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        self._stack = stacked([first, self.kv_a_proj_with_mqa])
        self._project = self._stack or (lambda x: [first(x), self.kv_a_proj_with_mqa(x)])
        self.fused = False
        if not self.absorb:
            return
        # views of kv_b_proj's own weight when it is unquantized (or quantized on the CPU: the float weight it was
        # loaded from); a dequantized copy otherwise
        source = self.kv_b_proj.source if isinstance(self.kv_b_proj, CPULinear) else None
        w = (self.kv_b_proj.weight if source is None else source.float()).view(
            self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank
        )
        if isinstance(self.kv_b_proj, CPULinear):  # quantized on the CPU: W_UK, W_UV in its format, int8 dots
            self.kv_b_proj.source = None  # let it go
            kw, isa = self.kv_b_proj.kwargs, self.kv_b_proj.isa
            # W_UK [h, r, nope] and W_UV [h, v, r]
            weights = {"uk": w[:, : self.nope_dim].transpose(1, 2), "uv": w[:, self.nope_dim :]}
            heads = {
                name: HeadLinear.from_blocks(self.head_blocks[name][1], wh.shape[2], self.head_blocks[name][0], isa)
                if name in self.head_blocks  # a GGUF file's own
                else HeadLinear.quantized(wh, kw, isa)
                for name, wh in weights.items()
            }
            self._uk_heads, self._uv_heads = heads["uk"], heads["uv"]
            self._uk = lambda q: self._uk_heads(q).to(q.dtype)
            self._uv = lambda o: self._uv_heads(o).to(o.dtype)
            self.fused = self._fusable()
            return
        w = w.to(self.dtype)
        self.w_uk, self.w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]  # [h, nope, r], [h, v, r]
        self._uk = lambda q: torch.einsum("bhn,hnr->bhr", q, self.w_uk)
        self._uv = lambda o: torch.einsum("bhr,hvr->bhv", o, self.w_uv)

    def cache_bytes(self, capacity: int, dtype: torch.dtype) -> int:
        index_dim = 0 if self.indexer is None else self.indexer.head_dim
        return capacity * (self.kv_lora_rank + self.rope_dim + index_dim) * dtype.itemsize

    def new_cache(self, capacity: int, dtype: torch.dtype, device: torch.device | None = None) -> MLACache:
        device = device or self.device
        latent = torch.empty(capacity, self.kv_lora_rank, dtype=dtype, device=device)
        k_pe = torch.empty(capacity, self.rope_dim, dtype=dtype, device=device)
        if self.indexer is None:
            return MLACache(latent, k_pe)
        return DSACache(latent, k_pe, torch.empty(capacity, self.indexer.head_dim, dtype=dtype, device=device))

    def _fusable(self) -> bool:
        """Whether decode tokens can take `_decode_fused`: float32 on the CPU, every projection quantized on
        it (stacked, W_UK, W_UV, o_proj, and q_b_proj with the low-rank query) and run by the integer kernels
        (not the float backend), norms with a weight and an epsilon, no indexer and no Triton kernel."""
        norms = [self.kv_a_layernorm] + ([] if self.q_lora_rank is None else [self.q_a_layernorm])
        linears = [self.o_proj] + ([] if self.q_lora_rank is None else [self.q_b_proj])
        return (
            self.device.type == "cpu"
            and self.dtype == torch.float32
            and not self.kernel
            and self.indexer is None
            and self._stack is not None
            and self._stack.kernel_args() is not None
            and all(isinstance(m, CPULinear) and m.bias is None for m in linears)
            and all(hasattr(m, "weight") and hasattr(m, "variance_epsilon") for m in norms)
        )

    def forward(self, x: torch.Tensor, rope: Rope, cache: MLACache, seqs: list[SeqSlice]) -> torch.Tensor:
        """`x [N, H]` -> `[N, H]`. Decode tokens (a sequence's one token of the step) take `_decode_fused`
        where the op allows it, whatever else the step holds, so a token's bits do not depend on its batch."""
        pairs = self.decode_pairs(rope)
        if pairs is None:
            return self._per_op(x, rope, cache, seqs)
        one = [s for s in seqs if s.count == 1]
        if not one:
            return self._per_op(x, rope, cache, seqs)
        if len(one) == len(seqs):
            return self._decode_fused(x, pairs, cache, seqs)
        many = [s for s in seqs if s.count > 1]  # a step of decode tokens and prompt chunks: each its own way
        out = x.new_empty(x.shape[0], self.o_proj.out_features)
        out[[s.begin for s in one]] = self._decode_fused(x, pairs, cache, one)
        out[torch.cat([torch.arange(s.begin, s.begin + s.count) for s in many])] = self._per_op(x, rope, cache, many)
        return out

    def decode_pairs(self, rope: Rope) -> tuple | None:
        """The rotary tables `decode` takes (`Rope.pairs`), or None where decode tokens take the per-op path."""
        pairs = getattr(rope, "pairs", None) if self.fused else None  # a layout the latent kernels rotate
        return None if pairs is None or pairs[1].shape[1] * 2 != self.rope_dim else pairs

    def _decode_fused(self, x: torch.Tensor, pairs: tuple, cache: MLACache, seqs: list[SeqSlice]) -> torch.Tensor:
        return torch.from_numpy(self.decode(x.detach().float().numpy(), pairs, cache, seqs))

    def decode(self, xs: np.ndarray, pairs: tuple, cache: MLACache, seqs: list[SeqSlice]) -> np.ndarray:
        """One token of each of `seqs` (rows `s.begin` of `xs [N, H]` float32), absorbed, on numpy arrays from
        the projections to o_proj in one call of `latent_kernels.decode` -> `[len(seqs), H]` float32. `pairs`:
        the rotary layout and per-pair tables of all N tokens (`decode_pairs`)."""
        layout, cos, sin = pairs
        tokens = [s.begin for s in seqs]
        if tokens != list(range(xs.shape[0])):
            xs, cos, sin = xs[tokens], cos[tokens], sin[tokens]
        new_rows, rows, ends = decode_rows(seqs)
        latent, k_pe = cache.arrays
        threads = numba.get_num_threads()
        return latent_kernels.decode(
            xs, cos, sin, layout, latent, k_pe, new_rows, rows, ends, threads, *self._decode_args
        )

    @cached_property
    def _decode_args(self) -> tuple:
        """`latent_kernels.decode`'s weights, bound at the first decode (the linears' arrays are final by then)."""
        q_simd, low_rank = None, None
        if self.q_lora_rank is not None:
            norm = self.q_a_layernorm
            q_simd, q_b = self.q_b_proj.kernel_args()
            low_rank = (self.q_lora_rank, _weight(norm), norm.variance_epsilon, q_b)
        kv = self.kv_a_layernorm
        stack, uk, uv, o_proj = (m.kernel_args() for m in (self._stack, self._uk_heads, self._uv_heads, self.o_proj))
        latent = (_weight(kv), kv.variance_epsilon)
        return *stack, q_simd, low_rank, *latent, *uk, *uv, *o_proj, self.num_heads, self.nope_dim, self.scaling

    def _per_op(self, x: torch.Tensor, rope: Rope, cache: MLACache, seqs: list[SeqSlice]) -> torch.Tensor:
        n = x.shape[0]
        q, kv = self._project(x)
        if self.q_lora_rank is None:
            q_resid = None
        else:
            q_resid = self.q_a_layernorm(q)  # [N, q_lora_rank], the indexer's input too
            q = self.q_b_proj(q_resid)
        q = q.view(1, n, self.num_heads, self.nope_dim + self.rope_dim).transpose(1, 2)  # [1, h, N, qk]
        q_nope, q_pe = torch.split(q, [self.nope_dim, self.rope_dim], dim=-1)

        kv_nope, k_pe = torch.split(kv, [self.kv_lora_rank, self.rope_dim], dim=-1)
        kv_nope = self.kv_a_layernorm(kv_nope)  # [N, r]
        q_pe = rope.apply(q_pe)
        k_pe = rope.apply(k_pe.view(1, 1, n, self.rope_dim))[0, 0]  # [N, rope]
        keeps = self._select(x, q_resid, rope, cache, seqs) if self.indexer is not None else [None] * len(seqs)
        if self.absorb and self.kernel and len(seqs) > 1 and n == len(seqs):  # a batch of decode tokens
            q_nope, q_pe = q_nope[0].transpose(0, 1), q_pe[0].transpose(0, 1)
            return self._decode_batch(q_nope, q_pe, kv_nope, k_pe, cache, seqs, keeps)
        outs = []
        for s, keep in zip(seqs, keeps, strict=True):
            cache.latent[s.new_rows] = kv_nope[s.tokens]
            cache.k_pe[s.new_rows] = k_pe[s.tokens]
            latent, pe = cache.latent[s.all_rows], cache.k_pe[s.all_rows]  # [L, r], [L, rope]
            qn, qp = q_nope[:, :, s.tokens], q_pe[:, :, s.tokens]
            if self.absorb and s.count == 1:
                if keep is not None:  # only the tokens the indexer kept: decode reads topk rows, not L
                    kept = keep[0].nonzero()[:, 0]
                    latent, pe = latent[kept], pe[kept]
                outs.append(self._absorbed(qn[0, :, 0], qp[0, :, 0], latent, pe))
            else:
                outs.append(self._expanded(qn, qp, latent, pe, s.start, keep))
        return self.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs))

    def _select(self, x, q_resid, rope: Rope, cache: DSACache, seqs: list[SeqSlice]) -> list[torch.Tensor | None]:
        """The indexer's keys into the cache, and per sequence the `[count, L]` mask of the earlier tokens
        each query attends to (None: all of them)."""
        if q_resid is None:
            raise ValueError("the lightning indexer reads the query's low-rank input: q_lora_rank must be set")
        q, k, weights = self.indexer.project(x, q_resid, rope)
        keeps = []
        for s in seqs:
            cache.index_k[s.new_rows] = k[s.tokens]
            keeps.append(self.indexer.select(q[s.tokens], cache.index_k[s.all_rows], weights[s.tokens], s.start))
        return keeps

    def _expanded(self, q_nope, q_pe, latent: torch.Tensor, pe: torch.Tensor, start: int, keep=None):
        """`q_nope [1, h, T, nope]`, `q_pe [1, h, T, rope]` over the cached `latent [L, r]`, `pe [L, rope]`
        re-expanded through kv_b_proj -> `[T, h * v]`; with `keep [T, L]`, only the tokens it marks."""
        t, end = q_nope.shape[2], latent.shape[0]
        kv = self.kv_b_proj(latent.view(1, 1, end, self.kv_lora_rank))
        kv = kv.view(1, end, -1, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = torch.split(kv, [self.nope_dim, self.v_dim], dim=-1)  # [1, h, L, *]
        k = kv.new_empty(*kv.shape[:-1], self.nope_dim + self.rope_dim)
        k[..., : self.nope_dim].copy_(k_nope)
        k[..., self.nope_dim :].copy_(pe.view(1, 1, end, self.rope_dim))
        q = torch.cat((q_nope, q_pe), dim=-1)
        if keep is None:
            out = attend(q, k, v, start, self.scaling)  # [1, h, T, v]
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=self.scaling)
        return out.transpose(1, 2).reshape(t, -1)

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, pe: torch.Tensor):
        """One decode token: `q_nope [h, nope]`, `q_pe [h, rope]` over `latent [L, r]`, `pe [L, rope]` ->
        `[1, h * v]`."""
        q_latent = self._uk(q_nope[None])[0]  # [h, r]
        out = self._latent_attend(q_latent, q_pe.contiguous(), latent, pe)  # [h, r]
        return self._uv(out[None]).reshape(1, -1)  # [1, h * v]

    def _decode_batch(self, q_nope, q_pe, kv_nope, k_pe, cache: MLACache, seqs: list[SeqSlice], keeps) -> torch.Tensor:
        """One decode token of each of B sequences, `q_nope [B, h, nope]`, `q_pe [B, h, rope]`: their cache
        rows (those the indexer kept, where it did) gathered into one buffer and one kernel launch over all
        of them -> `[B, hidden]`."""
        new = _index(s.new_rows for s in seqs).to(self.device)  # one row each, in order
        cache.latent[new], cache.k_pe[new] = kv_nope, k_pe
        parts = [_index([s.all_rows]) for s in seqs]
        parts = [p if keep is None else p[keep[0].cpu()] for p, keep in zip(parts, keeps, strict=True)]
        rows = torch.cat(parts).to(self.device)
        latent, pe = cache.latent[rows], cache.k_pe[rows]  # [sum L, r], [sum L, rope]
        q_latent = self._uk(q_nope)  # [B, h, r]
        out = self._latent_kernel(q_latent, q_pe.contiguous(), latent, pe, [len(p) for p in parts])
        return self.o_proj(self._uv(out).reshape(len(seqs), -1))  # [B, h * v]

    def _latent_attend_sdpa(self, q_latent: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, pe: torch.Tensor):
        end = latent.shape[0]
        q = torch.cat((q_latent, q_pe), dim=-1)[None, :, None]  # [1, h, 1, r + rope]
        k = torch.cat((latent, pe), dim=-1).view(1, 1, end, -1)  # one kv head
        out = attend(q, k, latent.view(1, 1, end, self.kv_lora_rank), end - 1, self.scaling)
        return out[0, :, 0]

    def _latent_attend_cpu(self, q_latent: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, pe: torch.Tensor):
        """One decode token on the CPU, in float32: the scores of the latent and the rotary parts in two
        matmuls (the cache is not copied into one key tensor first), softmax, the latent as the values. The
        scores are computed as `[L, h]`, the cache's rows against the heads: torch's CPU GEMM runs that one
        over twice as fast that way round, with the same bits."""
        latent = latent.float()
        scores = torch.addmm(pe.float() @ q_pe.float().T, latent, q_latent.float().T).T  # [h, L]
        probs = torch.softmax(scores.mul_(self.scaling), dim=-1)
        return (probs @ latent).to(q_latent.dtype)

    def _latent_attend_triton(self, q_latent: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, pe: torch.Tensor):
        return self._latent_kernel(q_latent[None], q_pe[None], latent, pe, [latent.shape[0]])[0]

    def _latent_kernel(self, q_latent, q_pe, latent, pe, lengths: list[int]) -> torch.Tensor:
        """The Triton latent kernel: query b of `q_latent [B, h, r]`, `q_pe [B, h, rope]` over the next
        `lengths[b]` rows of `latent`, `pe` (one sequence after another) -> `[B, h, r]`. Lengths come from
        the host, so nothing syncs; fixed rows per split, so a row sums the same in any batch."""
        from hetero_moe.kernels.triton.mla_decode import mla_decode

        starts = [0]
        for length in lengths[:-1]:
            starts.append(starts[-1] + length)
        row_start = torch.tensor(starts, dtype=torch.int32, device=self.device)
        row_len = torch.tensor(lengths, dtype=torch.int32, device=self.device)
        splits = -(-max(lengths) // SPLIT_ROWS)
        return mla_decode(q_latent, q_pe, latent, pe, row_start, row_len, self.scaling, splits, SPLIT_ROWS)


def _weight(norm: nn.Module) -> np.ndarray:
    """An RMSNorm's weight as float32 numpy."""
    return norm.weight.detach().float().numpy()


def _index(rows) -> torch.Tensor:
    """Cache rows (ranges or index tensors) as one int64 index tensor."""
    parts = [torch.arange(r.start, r.stop) if isinstance(r, slice) else r.cpu() for r in rows]
    return torch.cat(parts)


class GQAAttention(Op):
    """Grouped-query attention with rotary embeddings (partial in GLM-4.5, MiniMax-M2 and Qwen3.5) and, where
    the model has them, q/k RMSNorm and an output gate (Qwen3.5-MoE, Qwen3-Next: q_proj makes each head's
    query and gate, and the output is multiplied by the gate's sigmoid). gpt-oss: a learned logit per head (the
    sink) in every softmax's denominator, and a sliding window on every other layer (each module's own)."""

    def __init__(self, hf: nn.Module, ctx: BuildContext, kwargs: AttentionKwargs | None = None) -> None:
        super().__init__(ctx.device)
        if kwargs is not None and kwargs.absorb:
            raise ValueError("absorb applies to latent attention (DeepSeek) only")
        config = ctx.config
        self.head_dim = hf.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = hf.scaling
        # per layer where the module says (gpt-oss alternates sliding and full layers), else the model's
        self.window = hf.sliding_window if hasattr(hf, "sliding_window") else getattr(config, "sliding_window", None)
        self.sinks = hf.sinks if hasattr(hf, "sinks") else None  # [h] (gpt-oss), a parameter of this op
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = hf.q_proj, hf.k_proj, hf.v_proj, hf.o_proj
        self.output_gate = hf.q_proj.weight.shape[0] == 2 * self.num_heads * self.head_dim
        # QK norm: per head (Qwen3-MoE, GLM-4.5) or over all heads at once (MiniMax-M2), as wide as its weight
        self.q_norm = getattr(hf, "q_norm", None)
        self.k_norm = getattr(hf, "k_norm", None)
        if self.q_norm is not None:
            self.q_norm_width, self.k_norm_width = self.q_norm.weight.shape[-1], self.k_norm.weight.shape[-1]

    @classmethod
    def from_hf(cls, hf: nn.Module, ctx: BuildContext, kwargs: Any) -> Self:
        return cls(hf, ctx, kwargs)

    def cache_bytes(self, capacity: int, dtype: torch.dtype) -> int:
        return 2 * self.num_kv_heads * capacity * self.head_dim * dtype.itemsize

    def new_cache(self, capacity: int, dtype: torch.dtype, device: torch.device | None = None) -> GQACache:
        shape = (1, self.num_kv_heads, capacity, self.head_dim)
        device = device or self.device
        return GQACache(
            k=torch.empty(shape, dtype=dtype, device=device),
            v=torch.empty(shape, dtype=dtype, device=device),
        )

    def forward(self, x: torch.Tensor, rope: Rope, cache: GQACache, seqs: list[SeqSlice]) -> torch.Tensor:
        n = x.shape[0]
        q, k = self.q_proj(x), self.k_proj(x)
        if self.output_gate:  # per head: its query, then its gate
            q, gate = q.view(n, -1, 2 * self.head_dim).chunk(2, dim=-1)
            q, gate = q.reshape(n, -1), gate.reshape(n, -1)
        if self.q_norm is not None:
            q, k = self.q_norm(q.view(n, -1, self.q_norm_width)), self.k_norm(k.view(n, -1, self.k_norm_width))
        q, k = q.view(1, n, -1, self.head_dim), k.view(1, n, -1, self.head_dim)
        q, k = rope.apply(q.transpose(1, 2)), rope.apply(k.transpose(1, 2))  # [1, h, N, d]
        v = self.v_proj(x).view(1, n, -1, self.head_dim).transpose(1, 2)
        outs = []
        for s in seqs:
            cache.k[:, :, s.new_rows] = k[:, :, s.tokens]
            cache.v[:, :, s.new_rows] = v[:, :, s.tokens]
            keys, values = cache.k[:, :, s.all_rows], cache.v[:, :, s.all_rows]  # [1, kv_h, L, d]
            out = attend(q[:, :, s.tokens], keys, values, s.start, self.scaling, self.window, self.sinks)
            outs.append(out.transpose(1, 2).reshape(s.count, -1))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.o_proj(out * torch.sigmoid(gate) if self.output_gate else out)
