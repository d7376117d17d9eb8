"""Load a GGUF file into a placed model.

Before loading (`use_gguf_blocks`, called where the model is placed, so `rules check` and `plan` count
the same bytes): CPU experts whose stacked tensors are llama.cpp blocks are told to run them as they are
(gate and up of one type, down of the same or another); block types the kernels lack are an error (no
silent requantization). Then every check
the headers allow: names through the table, shapes, missing and unexpected tensors. Loading dequantizes
the dense tensors (and experts an op takes as floats) one at a time, and hands block experts to their op
(which reads Q4_K, Q6_K and IQ4_XS rows in place, and repacks the others or takes them from the
converted-weights cache); the rows read in place are then read into memory when they fit. Q4_0 and Q8_0 experts
are repacked into rows across lanes (the same values, faster kernels) when they fit in memory, and else read in
place, which pages them from disk as decoding needs them.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from hetero_moe.inject.injector import PlacedModel
from hetero_moe.kernels.ggml_blocks import LANE_REPACK, REPACK
from hetero_moe.loader.checkpoint import prefault
from hetero_moe.loader.converted import fits_in_memory
from hetero_moe.loader.gguf_file import GGUFError, GGUFFile, GGUFTensor, dequantize
from hetero_moe.loader.gguf_model import ExpertStack, Mapped, name_table
from hetero_moe.loader.load import Progress
from hetero_moe.ops.attention import MLAAttention
from hetero_moe.ops.base import Op, assign_direct
from hetero_moe.ops.cpu_experts import CPUExperts
from hetero_moe.ops.cpu_linear import CPULinear
from hetero_moe.ops.embedding import BlockEmbedding
from hetero_moe.ops.mlp import QuantGatedMLP

log = logging.getLogger(__name__)

FLOAT_TYPES = ("F32", "F16", "BF16")
KV_B = ".kv_b_proj.weight"  # MLA's, joined from llama.cpp's attn_k_b and attn_v_b


def use_gguf_blocks(placed: PlacedModel, g: GGUFFile) -> None:
    """Tell each CPU experts op whose layer's experts are GGUF blocks to run those blocks; a CPU embedding
    in blocks (untied) keeps them too (`BlockEmbedding`)."""
    g.check_types()
    mapped, stacks, _ = name_table(g, placed.config)
    embed = next((m for m in mapped if m.key == "model.embed_tokens.weight"), None)
    if (
        embed is not None
        and embed.sources[0].type.name not in FLOAT_TYPES
        and placed.placements["model.embed_tokens"].device.type == "cpu"
        and not placed.config.tie_word_embeddings
    ):
        vocab, hidden = embed.sources[0].shape
        placed.model.model.embed_tokens = BlockEmbedding(vocab, hidden, embed.sources[0].type.name, placed.dtype)
    kept = _dense_blocks(placed, [m for m in mapped if m.direct and m.sources[0].type.name not in FLOAT_TYPES])
    if isinstance(placed.model.model.embed_tokens, BlockEmbedding):
        kept[f"embedding in {embed.sources[0].type.name}"] += 1
    by_module: dict[str, list[ExpertStack]] = {}
    for s in stacks:
        by_module.setdefault(s.module, []).append(s)
    modules = dict(placed.model.named_modules())
    for name, group in by_module.items():
        op = modules.get(name)
        if not isinstance(op, CPUExperts):
            continue
        types = {s.proj: s.tensor.type.name for s in group}
        if len(types) < 3 or set(types.values()) <= set(FLOAT_TYPES):
            # a projection missing (an error where the tensors are matched), or float experts: quantized as
            # the rules say, like a safetensors checkpoint's
            continue
        if types.get(0) != types.get(1) or not set(types.values()).isdisjoint(FLOAT_TYPES):
            listed = ", ".join(f"{s.tensor.name} {s.tensor.type.name}" for s in group)
            raise GGUFError(
                f"{g.path}: the routed experts of one layer mix types the CPU kernels cannot run together "
                f"({listed}): gate and up must share a block type, and down be blocks too"
            )
        op.use_blocks((types[0], types[2]), group[0].tensor.name)
        kept[f"routed experts in {op.block_type}"] += 1
    if kept:
        log.info(
            "the file's quantized blocks run as it has them, whatever quant the rules name: %s",
            ", ".join(f"{n} x {what}" for what, n in sorted(kept.items())),
        )


BLOCK_OPS = (CPULinear, QuantGatedMLP, BlockEmbedding)  # ops that can take a GGUF tensor's blocks as they are


def _dense_blocks(placed: PlacedModel, mapped: list[Mapped]) -> Counter[str]:
    """Quantized CPU linears and MLPs whose weights are GGUF blocks run those blocks (exact; Q4_0, Q8_0, Q4_K,
    Q6_K and IQ4_XS in place) instead of requantizing their values; an MLP's gate and up only when of one type.
    Returns how many weights of each block type run so."""
    keys = placed.owned_keys()
    kept: Counter[str] = Counter()
    mlps: dict[str, dict[str, str]] = {}
    for m in mapped:
        target = keys.get(m.key)
        if target is None:
            continue  # an error where the tensors are matched
        _, owner, rel, _ = target
        if isinstance(owner, CPULinear):
            owner.use_blocks(rel, m.sources[0].type.name)
            kept[f"dense weights in {m.sources[0].type.name}"] += 1
        elif isinstance(owner, QuantGatedMLP):
            mlps.setdefault(target[0], {})[rel] = m.sources[0].type.name
    modules = dict(placed.model.named_modules())
    for name, types in mlps.items():
        if types.get("gate_proj.weight") != types.get("up_proj.weight"):
            types.pop("gate_proj.weight", None)
            types.pop("up_proj.weight", None)
        for rel, block_type in types.items():
            modules[name].use_blocks(rel, block_type)
            kept[f"dense weights in {block_type}"] += 1
    return kept


@dataclass(frozen=True)
class _Item:
    owner_name: str
    owner: nn.Module
    rel: str
    device: torch.device


def load_gguf_weights(placed: PlacedModel, g: GGUFFile, progress: Progress | None = None) -> None:
    mapped, stacks, blocks = _plan(placed, g)
    _use_lanes(blocks)
    restored = _restore_cached(blocks, g)
    in_place = [b for b in blocks if b[1].format.in_place(b[0].proj)]  # handed over even when restored
    todo = [*mapped, *stacks, *[b for b in blocks if b[0].module not in restored or b[1].format.in_place(b[0].proj)]]
    total = sum(sum(s.nbytes for s in _sources(x)) for x in todo)
    done = 0
    for entry in todo:
        _load_one(entry)
        done += sum(s.nbytes for s in _sources(entry))
        if progress is not None:
            progress(done, total)
    _read_in(in_place, [m.sources[0] for m, target in mapped if _in_place(m, target)])
    _mla_heads(placed, [m for m, _ in mapped])
    if "lm_head.weight" not in {m.key for m, _ in mapped} and placed.config.tie_word_embeddings:
        model = placed.model
        device = placed.placements["lm_head"].device
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.to(device), requires_grad=False)
    for module in reversed(list(placed.model.modules())):
        if isinstance(module, Op):
            module.finalize()


def _mla_heads(placed: PlacedModel, mapped: list[Mapped]) -> None:
    """Latent attention layers that absorb W_UK and W_UV on the CPU take them from the file's `attn_k_b` and
    `attn_v_b` blocks (`MLAAttention.use_head_blocks`; float ones are quantized from `kv_b_proj` as before), which
    `kv_b_proj` was joined from."""
    modules = dict(placed.model.named_modules())
    for m in mapped:
        if len(m.sources) != 2 or not m.key.endswith(KV_B):
            continue
        attention = modules.get(m.key.removesuffix(KV_B))
        if isinstance(attention, MLAAttention) and attention.absorb and isinstance(attention.kv_b_proj, CPULinear):
            for name, t in zip(("uk", "uv"), m.sources, strict=True):
                if t.type.name in REPACK:
                    attention.use_head_blocks(name, t.type.name, t.data)


def _use_lanes(blocks: list[tuple[ExpertStack, CPUExperts]]) -> None:
    """Experts in Q4_0 and Q8_0 blocks run repacked into rows across lanes (`BlockFormat.use_lanes`) when all of
    them fit in memory: the repack is made there once, then cached. Else they are read in place from the file."""
    lanes = [(stack, op) for stack, op in blocks if stack.tensor.type.name in LANE_REPACK]
    if not lanes or not fits_in_memory(sum(stack.tensor.nbytes for stack, _ in lanes)):
        return
    for op in {id(op): op for _, op in lanes}.values():
        op.use_lanes()


def _in_place(m: Mapped, target: _Item) -> bool:
    """Whether `target` takes `m`'s blocks as they are from the memory map."""
    owner = target.owner
    return isinstance(owner, BLOCK_OPS) and owner.takes_blocks(target.rel) and REPACK[m.sources[0].type.name].in_place


def _read_in(in_place: list[tuple[ExpertStack, CPUExperts]], dense: list[GGUFTensor]) -> None:
    """Read the weights the kernels take from the memory map (`in_place` experts, `dense` tensors) into memory
    now, when they fit; else decoding reads the experts from disk as it needs them, each call asking the
    kernel to read its experts ahead (`BlockFormat.page_from`)."""
    by_file: dict = {}
    for t in [stack.tensor for stack, _ in in_place] + dense:
        by_file.setdefault(t.file, []).append(t.data)
    total = sum(a.nbytes for arrays in by_file.values() for a in arrays)
    if not total:
        return
    if not fits_in_memory(total):
        log.info(
            "the weights read in place (%.1f GB) do not fit in the memory left: read from disk as needed", total / 1e9
        )
        for stack, op in in_place:
            op.format.page_from(stack.proj, stack.tensor.file, stack.tensor.offset, stack.tensor.data.strides[0])
        return
    for path, arrays in by_file.items():
        prefault(path, arrays)


def _sources(entry) -> tuple[GGUFTensor, ...]:
    return entry[0].sources if isinstance(entry[0], Mapped) else (entry[0].tensor,)


def _load_one(entry) -> None:
    what, target = entry
    if isinstance(what, Mapped) and isinstance(target.owner, BLOCK_OPS) and target.owner.takes_blocks(target.rel):
        target.owner.load_blocks(target.rel, what.sources[0].data)
    elif isinstance(what, Mapped):
        tensor = what.build(*[dequantize(s) for s in what.sources])
        if isinstance(target.owner, Op):
            target.owner.load_weight(target.rel, tensor)
        else:
            assign_direct(target.owner, target.rel, tensor, target.device)
    elif isinstance(target, CPUExperts) and target.block_type is not None:
        target.load_blocks(what.proj, what.tensor.data)
    else:  # experts the op takes as floats, one expert at a time (a whole stack may not fit in memory)
        for e in range(what.tensor.shape[0]):
            target.load_weight(what.rel(e), dequantize(what.tensor, e))


def _restore_cached(blocks: list[tuple[ExpertStack, CPUExperts]], g: GGUFFile) -> set[str]:
    """Ops whose repacked blocks are in the converted-weights cache take them from there."""
    by_module: dict[str, list[tuple[ExpertStack, CPUExperts]]] = {}
    for stack, op in blocks:
        by_module.setdefault(stack.module, []).append((stack, op))
    restored = set()
    for name, group in by_module.items():
        if group[0][1].restore(name, [stack.tensor.info() for stack, _ in group]):
            restored.add(name)
    if restored:
        log.info("%d expert layers took their repacked blocks from the cache", len(restored))
    return restored


def _plan(placed: PlacedModel, g: GGUFFile) -> tuple[list, list, list]:
    """(mapped tensors, float expert stacks, block expert stacks), each with its target, all checked."""
    g.check_types()
    mapped, stacks, unknown = name_table(g, placed.config)
    expected = placed.owned_keys()
    if placed.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    dense, floats, blocks = [], [], []
    for m in mapped:
        target = expected.pop(m.key, None)
        if target is None:
            unknown.extend(m.sources)
            continue
        owner_name, owner, rel, shape = target
        value_shape = _built_shape(m)
        if value_shape != tuple(shape):
            raise GGUFError(
                f"{g.path}: {m.sources[0].name} gives {m.key} of shape {list(value_shape)}, not {list(shape)}"
            )
        dense.append((m, _Item(owner_name, owner, rel, placed.placements[owner_name].device)))
    for s in stacks:
        targets = [expected.pop(s.key(e), None) for e in range(s.tensor.shape[0])]
        if not targets or any(t is None for t in targets):
            unknown.append(s.tensor)
            continue
        owner = targets[0][1]
        if tuple(targets[0][3]) != s.tensor.shape[1:]:
            raise GGUFError(
                f"{g.path}: {s.tensor.name} has experts of shape {list(s.tensor.shape[1:])}, not {list(targets[0][3])}"
            )
        (blocks if isinstance(owner, CPUExperts) and owner.block_type is not None else floats).append((s, owner))
    _report(g, placed, unknown, expected)
    return dense, floats, blocks


def _built_shape(m: Mapped) -> tuple[int, ...]:
    return tuple(m.build(*[torch.empty(s.shape, device="meta") for s in m.sources]).shape)


def _report(g: GGUFFile, placed: PlacedModel, unknown: list[GGUFTensor], missing: dict) -> None:
    if unknown:
        listed = "; ".join(t.name for t in unknown[:5])
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise GGUFError(f"{g.path}: {len(unknown)} tensor(s) not expected for {placed.arch.name}: {listed}{more}")
    if missing:
        keys = list(missing)
        more = f" (and {len(keys) - 5} more)" if len(keys) > 5 else ""
        raise GGUFError(f"{g.path}: {len(keys)} tensor(s) of the model not in the file: {', '.join(keys[:5])}{more}")
