"""Real-size synthetic checkpoints for benchmarks, streamed to disk shard by shard.

``synth.write_checkpoint`` builds the whole model in float32 first: right for tiny test models, far
too big for DeepSeek-V3 (671 B parameters; 11.3 G expert parameters in every MoE layer). Here the model
is built on the meta device only; ``synth.disk_layout`` turns its shapes into the release layout (the
same keys, shapes, dtypes and FP8 selection as ``write_checkpoint``), and each safetensors file is
written header first, then tensor by tensor straight out of a random pool, so memory stays at the
pool's size (under 1 GB) whatever the model, and the speed is the disk's.

Values (honest enough for benchmarks, not a trained model):

- One seeded pool of at most 2^25 N(0, 1) values is drawn once. Every random tensor is a slice of it,
  scaled, starting at an offset hashed from the seed and the tensor's name, wrapping around. Tensors
  share (shifted) values; routing and sampling still look random. The pool's length is prime, so a
  tensor longer than the pool (an embedding, lm_head) still has no two equal rows (a length of 2^25
  repeated V2-Lite's lm_head every 16384 rows: exactly tied logits).
- Matrices: std 1/sqrt(in_features), so each linear keeps its input's scale and a bf16 forward stays
  finite at any depth. Embeddings: std 1. RMSNorm weights: 1. Biases: std 0.02. Persistent buffers
  (the router's ``e_score_correction_bias``): 0, float32 as in the DeepSeek-V3 release.
- FP8 weights: e4m3 codes from the pool at std 100, clamped to +-448 (a block's largest code is then
  about 430, close to the 448 a real block quantizer gives, and a NaN code 0x7F/0xFF never occurs),
  with every ``weight_scale_inv`` block equal to std/100, so dequantized values match the bf16 case.
- MXFP4 experts (gpt-oss): code bytes from the pool's bytes (every e2m1 code, about 2.9 std), every
  e8m0 scale the power of two nearest std/2.9.
- Routing skew (``routing_skew`` s > 0; s = 0 writes exactly the values above). Random routers spread
  tokens near uniformly over the experts; real ones prefer some, which pinning the busiest experts on a
  GPU exploits. Each MoE layer ranks its routed experts in an order hashed from the seed and the layer
  index (``expert_ranks``; rank 0 the most popular), and one router tensor per layer carries the skew;
  nothing else changes.
  - A router with a correction bias (DeepSeek-V3): ``e_score_correction_bias`` of the expert of rank r
    is -0.1 s ln(1 + r) (float32, as ever). The bias only moves selection, against sigmoid scores that
    spread with a std of about 0.2. With V3's 256 experts, top 8, in 8 groups: s = 0.5 sends about 60 %
    of the routings to the top quarter of the experts, s = 1 about 90 % (the most popular expert picked
    by half the tokens), s = 2 all of them (the top few experts by about 80 % of the tokens).
  - A softmax router (DeepSeek-V2, Qwen3-MoE, Mixtral) has no bias, and no direction of the hidden
    states has a sign known in advance to add one through (a shifted embedding fades with depth and
    biases the output too). Its weight row of the expert of rank r is scaled by (1 + r) ** -s instead
    (rank 0 keeps the unskewed bytes): logits keep their sign per token but shrink down the ranking,
    so top-k favours the top ranks and the tail is rarely picked. For hidden states symmetric about 0
    no bias-free router picks an expert for more than half the tokens (x and -x swap its top k and
    bottom k), so the top experts saturate near half the tokens each. For random hidden states s = 1
    sends about 80 % of the routings to the top quarter with 64 experts, top 6 (DeepSeek-V2-Lite),
    about 90 % with 128, top 8 (Qwen3-30B-A3B); s = 2 about 45 % with 8, top 2 (Mixtral; 25 % unskewed).
  The synthetic model's own hidden states share a direction (mean cosine 0.2 to 0.5 with it, growing
  with depth), which gives every expert a random fixed logit offset even at s = 0: measured counts
  follow the ranking only roughly (rank correlation about 0.8 with 32 experts at s = 1 or 2), and at
  s = 0 the busiest experts already take more than their share. ``hetero-moe profile`` measures them.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import json
import logging
import math
import os
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from hetero_moe.arch import ARCHITECTURES, build_meta_model
from hetero_moe.synth import tiny as synth

logger = logging.getLogger(__name__)

FP8_BLOCK = (128, 128)  # the DeepSeek-V3 release's weight_block_size
DTYPE = torch.bfloat16  # of every tensor that is neither FP8 nor a float32 buffer

_POOL_MAX = 1 << 25  # pool elements (128 MiB of float32; each (dtype, std) copy is cached), rounded to a prime
_POOL_MIN = 1 << 16
_EMBED_STD = 1.0
_BIAS_STD = 0.02
_FP8_STD = 100.0  # of the e4m3 codes, in quantized units
_E2M1_STD = 2.9  # of e2m1 values from uniform random nibbles (the root mean square of 0, 0.5, .. 6)
_CONSTANT_CHUNK = 1 << 20  # elements of a constant tensor written per call
_SKEW_BIAS = 0.1  # routing_skew's correction bias per unit of s * ln(1 + rank)

# A router tensor, by transformers key: the weight [E, H] and DeepSeek-V3's correction bias [E] (gpt-oss: router).
_ROUTER_KEY = re.compile(r"^model\.layers\.\d+\.mlp\.(?:gate|router)\.(weight|e_score_correction_bias)$")
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")

# The synthetic tokenizer's special tokens, by config field.
_SPECIAL_IDS = {"bos_token_id": synth.BOS_TOKEN, "eos_token_id": synth.EOS_TOKEN, "pad_token_id": synth.PAD_TOKEN}

_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.uint8: "U8",
}


class Fill(enum.Enum):
    """How a planned tensor's bytes are made."""

    RANDOM = "random"  # pool values times ``value`` (the std), in the tensor's dtype
    FP8 = "fp8"  # e4m3 codes from the pool; the scales are a separate CONSTANT tensor
    BYTES = "bytes"  # the pool's own bytes (MXFP4 codes); the scales are a separate CONSTANT tensor
    CONSTANT = "constant"  # every element ``value``
    # routing_skew (see the module docstring); r is an expert's rank in its layer (``expert_ranks``)
    SKEWED_ROWS = "skewed_rows"  # RANDOM, then the row of the expert of rank r times (1 + r) ** -skew
    SKEWED_BIAS = "skewed_bias"  # the element of the expert of rank r is -value * skew * ln(1 + r)


_SKEWED = (Fill.SKEWED_ROWS, Fill.SKEWED_BIAS)


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of a planned checkpoint: its on-disk key, dtype and shape, and how it is filled."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    fill: Fill
    value: float  # the std for RANDOM and SKEWED_ROWS, the element for CONSTANT, a scale for SKEWED_BIAS
    skew: float = 0.0  # routing_skew, for the SKEWED fills only

    def __post_init__(self) -> None:
        if (self.fill in _SKEWED) != (self.skew > 0):
            raise ValueError(f"{self.name}: fill {self.fill.value} with skew {self.skew}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def benchmark_config(config: transformers.PreTrainedConfig, layers: int | None = None) -> transformers.PreTrainedConfig:
    """The config a synthetic checkpoint of ``config`` declares: a copy with ``layers`` decoder layers
    (real dimensions kept) and the synthetic tokenizer's special token ids (bos 0, eos 1, pad 2).

    Layer-dependent fields follow ``layers``: ``mlp_only_layers`` (Qwen3-MoE) keeps the indices that
    still exist, and ``first_k_dense_replace`` (DeepSeek) becomes the original share of dense layers,
    rounded, but at least one dense and one MoE layer when ``layers >= 2`` (DeepSeek-V3, 3 of 61 dense:
    1 dense for 2 to 30 layers, 2 from 31, 3 at 61) and a lone MoE layer when ``layers == 1``. The
    ``quantization_config`` is dropped: whether the checkpoint is FP8 is the writer's choice.
    """
    synth.expert_naming(config)  # a supported architecture
    if layers is not None and layers < 1:
        raise ValueError(f"layers must be at least 1, got {layers}")
    data: dict[str, Any] = copy.deepcopy(config.to_dict())
    data.pop("quantization_config", None)
    if layers is not None:
        original = config.num_hidden_layers
        data["num_hidden_layers"] = layers
        if data.get("first_k_dense_replace"):
            data["first_k_dense_replace"] = _dense_layers(data["first_k_dense_replace"], original, layers)
        if data.get("mlp_only_layers"):
            data["mlp_only_layers"] = [i for i in data["mlp_only_layers"] if i < layers]
        if isinstance(data.get("layer_types"), list):
            if len(data["layer_types"]) >= layers:
                data["layer_types"] = data["layer_types"][:layers]
            else:
                del data["layer_types"]  # the config class derives it again
    ids = {name: synth.SPECIAL_TOKENS.index(token) for name, token in _SPECIAL_IDS.items()}
    data.update(ids)
    return type(config).from_dict(data)


def _dense_layers(dense: int, original: int, layers: int) -> int:
    if layers == 1:
        return 0
    return min(dense, layers - 1, max(1, round(dense * layers / original)))


def plan_checkpoint(
    config: transformers.PreTrainedConfig,
    *,
    fp8: bool,
    layers: int | None = None,
    legacy_mixtral_names: bool = True,
    routing_skew: float = 0.0,
) -> list[PlannedTensor]:
    """Every tensor ``write_large_checkpoint`` writes for these arguments, in write-plan order; builds the
    model on the meta device only, so it is cheap at any size (sum ``nbytes`` for the disk needed)."""
    config = benchmark_config(config, layers)
    return [t for group in _plan_groups(config, fp8, legacy_mixtral_names, routing_skew) for t in group]


def _plan_groups(
    config: transformers.PreTrainedConfig, fp8: bool, legacy_mixtral_names: bool, routing_skew: float
) -> list[tuple[PlannedTensor, ...]]:
    """Tensors grouped so that an FP8 weight and its scale go to the same file."""
    if not (math.isfinite(routing_skew) and routing_skew >= 0):
        raise ValueError(f"routing_skew must be a finite number >= 0, got {routing_skew}")
    naming = synth.expert_naming(config, legacy_mixtral_names)
    model = build_meta_model(config, ARCHITECTURES[config.architectures[0]], DTYPE)
    entries = synth.disk_layout(model, naming)
    # routing_skew's lever: the correction bias where routers have one (it only moves selection), else the weight.
    routers = {e.source: m[1] for e in entries if (m := _ROUTER_KEY.match(e.source))}
    lever = "e_score_correction_bias" if "e_score_correction_bias" in routers.values() else "weight"
    groups: list[tuple[PlannedTensor, ...]] = []
    for entry in entries:
        skew = routing_skew if routers.get(entry.source) == lever else 0.0
        if entry.mxfp4:  # [E, out, in] as blocks [E, out, in / 32, 16] and e8m0 scales [E, out, in / 32]
            *rows, cols = entry.shape
            exponent = round(math.log2(1.0 / math.sqrt(cols) / _E2M1_STD))
            blocks = PlannedTensor(f"{entry.name}_blocks", torch.uint8, (*rows, cols // 32, 16), Fill.BYTES, 0.0)
            scales = PlannedTensor(
                f"{entry.name}_scales", torch.uint8, (*rows, cols // 32), Fill.CONSTANT, 127 + exponent
            )
            groups.append((blocks, scales))
            continue
        if entry.role is synth.Role.MATRIX:
            std = 1.0 / math.sqrt(entry.shape[-1])  # [out, in]
            if skew:  # a router weight [E, H]: never a Linear, so never FP8
                planned = PlannedTensor(entry.name, DTYPE, entry.shape, Fill.SKEWED_ROWS, std, skew)
            elif fp8 and entry.quantizable:
                rows, cols = entry.shape
                scale_shape = (-(-rows // FP8_BLOCK[0]), -(-cols // FP8_BLOCK[1]))
                groups.append(
                    (
                        PlannedTensor(entry.name, torch.float8_e4m3fn, entry.shape, Fill.FP8, 0.0),
                        PlannedTensor(
                            entry.name + synth.SCALE_SUFFIX, torch.float32, scale_shape, Fill.CONSTANT, std / _FP8_STD
                        ),
                    )
                )
                continue
            else:
                planned = PlannedTensor(entry.name, DTYPE, entry.shape, Fill.RANDOM, std)
        elif entry.role is synth.Role.EMBEDDING:
            planned = PlannedTensor(entry.name, DTYPE, entry.shape, Fill.RANDOM, _EMBED_STD)
        elif entry.role is synth.Role.NORM:
            planned = PlannedTensor(entry.name, DTYPE, entry.shape, Fill.CONSTANT, 1.0)
        elif entry.keep_fp32 and skew:  # the correction bias [E]
            planned = PlannedTensor(entry.name, torch.float32, entry.shape, Fill.SKEWED_BIAS, _SKEW_BIAS, skew)
        elif entry.keep_fp32:
            planned = PlannedTensor(entry.name, torch.float32, entry.shape, Fill.CONSTANT, 0.0)
        else:
            planned = PlannedTensor(entry.name, DTYPE, entry.shape, Fill.RANDOM, _BIAS_STD)
        groups.append((planned,))
    return groups


def _split(groups: list[tuple[PlannedTensor, ...]], shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive groups into files of at most ``shard_bytes`` (a larger group gets a file of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for group in groups:
        group_bytes = sum(t.nbytes for t in group)
        if shards[-1] and size + group_bytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += group_bytes
    return shards


def _prime_at_most(n: int) -> int:
    """The largest prime <= ``n`` (``n >= 2``)."""
    while any(n % d == 0 for d in range(2, math.isqrt(n) + 1)):
        n -= 1
    return n


class _Pool:
    """Seeded N(0, 1) values drawn once; a tensor's bytes are a slice of a scaled copy, at a hashed offset."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self._normal = torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        self._bytes: dict[tuple[torch.dtype, Fill, float], np.ndarray] = {}

    def chunks(self, tensor: PlannedTensor) -> Iterator[memoryview]:
        """The tensor's bytes, in pieces that together make ``tensor.nbytes``."""
        if tensor.fill is Fill.CONSTANT:
            yield from self._constant(tensor)
            return
        if tensor.fill in _SKEWED:
            yield memoryview(self._skewed(tensor).view(torch.uint8).numpy())
            return
        data = memoryview(self._scaled(tensor))
        item = tensor.dtype.itemsize
        for pos, take in self._spans(tensor):
            yield data[pos * item : (pos + take) * item]

    def _spans(self, tensor: PlannedTensor) -> Iterator[tuple[int, int]]:
        """(start, length) pool ranges that make the tensor's values: from its hashed offset, wrapping."""
        pos = self._offset(tensor.name)
        remaining = tensor.numel
        while remaining:
            take = min(remaining, self.size - pos)
            yield pos, take
            remaining -= take
            pos = 0

    def _skewed(self, tensor: PlannedTensor) -> torch.Tensor:
        """A routing_skew tensor, built whole: a router weight [E, H] or correction bias [E] is small."""
        layer = int(_LAYER_INDEX.match(tensor.name)[1])
        rank = expert_ranks(layer, tensor.shape[0], self.seed).to(torch.float32)  # [E]
        if tensor.fill is Fill.SKEWED_BIAS:
            return (-tensor.value * tensor.skew * torch.log1p(rank)).to(tensor.dtype)
        values = torch.cat([self._normal[pos : pos + take] for pos, take in self._spans(tensor)])
        rows = values.view(tensor.shape[0], -1) * tensor.value  # [E, H]: the RANDOM values, before rounding
        return (rows * (1 + rank[:, None]) ** -tensor.skew).to(tensor.dtype)

    def _scaled(self, tensor: PlannedTensor) -> np.ndarray:
        key = (tensor.dtype, tensor.fill, tensor.value)
        if key not in self._bytes:
            if tensor.fill is Fill.FP8:
                codes = (self._normal * _FP8_STD).clamp_(-synth.FP8_MAX, synth.FP8_MAX).to(torch.float8_e4m3fn)
            elif tensor.fill is Fill.BYTES:  # a byte of each value's mantissa: near-uniform bytes
                codes = self._normal.view(torch.uint8)[1::4].contiguous()
            else:
                codes = (self._normal * tensor.value).to(tensor.dtype)
            self._bytes[key] = codes.view(torch.uint8).numpy()
        return self._bytes[key]

    def _offset(self, name: str) -> int:
        return _hash(self.seed, name) % self.size

    @staticmethod
    def _constant(tensor: PlannedTensor) -> Iterator[memoryview]:
        chunk = torch.full((min(tensor.numel, _CONSTANT_CHUNK),), tensor.value, dtype=tensor.dtype)
        data = memoryview(chunk.view(torch.uint8).numpy())
        remaining = tensor.numel
        while remaining:
            take = min(remaining, chunk.numel())
            yield data[: take * tensor.dtype.itemsize]
            remaining -= take


def expert_ranks(layer: int, experts: int, seed: int = 0) -> torch.Tensor:
    """[experts] int64: the popularity rank (0 the most popular) of each routed expert of decoder layer
    ``layer`` in a checkpoint written with ``routing_skew`` > 0 and ``seed``; an order hashed from both."""
    order = sorted(range(experts), key=lambda e: _hash(seed, f"routing_skew:{layer}:{e}"))
    rank = torch.empty(experts, dtype=torch.int64)
    rank[order] = torch.arange(experts)
    return rank


def _hash(seed: int, text: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _write_file(path: Path, tensors: list[PlannedTensor], pool: _Pool) -> None:
    """One safetensors file: header, then each tensor's bytes, wider dtypes first (as safetensors'
    own writer orders them), so every tensor starts aligned to its element size."""
    ordered = sorted(tensors, key=lambda t: -t.dtype.itemsize)  # stable: plan order within a dtype width
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in ordered:
        header[t.name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in ordered:
            for chunk in pool.chunks(t):
                f.write(chunk)
    os.replace(partial, path)  # an interrupted write never leaves a shard under its real name


def write_large_checkpoint(
    config: transformers.PreTrainedConfig,
    out_dir: str | Path,
    *,
    fp8: bool,
    layers: int | None = None,
    shard_bytes: int = 4 << 30,
    seed: int = 0,
    legacy_mixtral_names: bool = True,
    routing_skew: float = 0.0,
) -> Path:
    """Write a random checkpoint of ``config``'s architecture and real dimensions to ``out_dir``.

    ``config`` is a transformers config of a supported architecture (``arch.load_config`` of a
    directory in ``configs/``); ``layers`` overrides its decoder layer count (``benchmark_config``
    tells how dense and MoE layers are then chosen). Writes ``config.json`` (``benchmark_config``, with
    the DeepSeek-V3 release's ``quantization_config`` when ``fp8``: e4m3, block [128, 128]), the
    synthetic tokenizer (``synth.build_tokenizer``, which holds about 900 tokens whatever the vocab
    size), and the weights: ``model.safetensors`` when they fit in ``shard_bytes``, else files of at
    most ``shard_bytes`` each (a larger tensor gets a file of its own) and
    ``model.safetensors.index.json``. Keys, shapes, dtypes and the FP8 selection are those of
    ``synth.write_checkpoint``; the values are described in this module's docstring. Stale weight
    files in ``out_dir`` are removed first. The bytes written are a function of the arguments only.
    Memory stays at the random pool's (under 1 GB): no tensor of the model is ever built.

    ``routing_skew`` (>= 0) makes every MoE layer's router prefer a seeded, layer-dependent set of
    experts, popularity falling roughly Zipf-like down a ranking (``expert_ranks``): for DeepSeek-V3
    through ``e_score_correction_bias``, for the softmax routers by scaling router rows (the module
    docstring gives the formulas and the shares they give). 0, the default, writes exactly the unskewed
    bytes; 1 is a strong skew at the real expert counts. Only one router tensor per MoE layer differs;
    ``config.json`` stays the real one and does not record the skew.
    """
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    config = benchmark_config(config, layers)
    groups = _plan_groups(config, fp8, legacy_mixtral_names, routing_skew)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = _split(groups, shard_bytes)
    largest = max((t.numel for group in groups for t in group if t.fill is not Fill.CONSTANT), default=1)
    pool = _Pool(_prime_at_most(min(_POOL_MAX, max(_POOL_MIN, largest))), seed)

    synth.remove_weights(out)
    n = len(shards)
    names = [synth.SINGLE_FILE] if n == 1 else [synth.shard_file_name(k, n) for k in range(n)]
    total = sum(t.nbytes for shard in shards for t in shard)
    start = time.perf_counter()
    for k, (name, tensors) in enumerate(zip(names, shards, strict=True)):
        shard_start = time.perf_counter()
        _write_file(out / name, tensors, pool)
        size = sum(t.nbytes for t in tensors)
        seconds = time.perf_counter() - shard_start
        logger.info("wrote %s (%d/%d): %.2f GB in %.1f s", name, k + 1, n, size / 1e9, seconds)
    if n > 1:
        weight_map = {t.name: name for name, tensors in zip(names, shards, strict=True) for t in tensors}
        synth.write_index(out, weight_map, total)
    seconds = time.perf_counter() - start
    synth.write_config(config, out, dtype=DTYPE, fp8_block=FP8_BLOCK if fp8 else None)
    synth.build_tokenizer(out, vocab_size=config.vocab_size)
    logger.info(
        "wrote %s: %d tensors, %.2f GB in %d file(s), %.2f GB/s, fp8=%s, routing_skew=%g",
        out,
        sum(len(s) for s in shards),
        total / 1e9,
        n,
        total / 1e9 / max(seconds, 1e-9),
        fp8,
        routing_skew,
    )
    return out
