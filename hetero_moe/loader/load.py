"""Stream a checkpoint's tensors, one at a time, into the ops and modules of a placed model.

Every check that can be made from the headers is made before the first weight is read: names
(after the architecture's renames), shapes, dtypes, FP8 scales, MXFP4 scales (gpt-oss's experts: each
`*_blocks` tensor with its `*_scales`, both uint8, handed together to the op that owns them). Missing
and unexpected tensors are errors; only the MTP layer of DeepSeek-V3 is skipped, explicitly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hetero_moe.inject.injector import PlacedModel
from hetero_moe.kernels.quant import dequantize_fp8_blocks, fp8_scale_shape
from hetero_moe.loader.checkpoint import Checkpoint, CheckpointError, TensorInfo
from hetero_moe.ops.base import Op, assign_direct

log = logging.getLogger(__name__)

SCALE_SUFFIX = "_scale_inv"
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class _Item:
    info: TensorInfo
    owner_name: str
    owner: nn.Module
    rel: str
    device: torch.device
    scale: TensorInfo | None  # the FP8 block scale, if the tensor is FP8
    mxfp4_scales: TensorInfo | None = None  # the e8m0 scales, if the tensor is MXFP4 blocks


def load_weights(placed: PlacedModel, checkpoint: Checkpoint, progress: Progress | None = None) -> None:
    items, skipped = _plan(placed, checkpoint)
    if skipped:
        log.info("skipping %d tensors of the MTP layer (not used for decoding)", skipped)
    items = _restore_cached(items)
    block = _block_size(placed) if any(i.scale for i in items) else (0, 0)
    total = sum(i.info.nbytes for i in items)
    done = 0
    by_key = {i.info.key: i for i in items}
    # FP8 block scales are small (1/16384 of their weights): read them all first, one pass per file
    scales = {info.key: t for info, t in checkpoint.read([i.scale.key for i in items if i.scale is not None])}
    for info, tensor in checkpoint.read([i.info.key for i in items]):
        item = by_key[info.key]
        if item.mxfp4_scales is not None:  # read beside its blocks: a model's scales are GBs
            _, mx_scales = next(checkpoint.read([item.mxfp4_scales.key]))
            item.owner.load_mxfp4(item.rel, tensor, mx_scales)
        elif isinstance(item.owner, Op) and item.scale is not None:
            item.owner.load_fp8(item.rel, tensor, scales.pop(item.scale.key), block)
        elif isinstance(item.owner, Op):
            item.owner.load_weight(item.rel, tensor)
        else:
            if item.scale is not None:
                tensor = dequantize_fp8_blocks(tensor, scales.pop(item.scale.key), block)
            assign_direct(item.owner, item.rel, tensor, item.device)
        done += info.nbytes
        if progress is not None:
            progress(done, total)
    _tie_embeddings(placed, checkpoint)
    for module in reversed(list(placed.model.modules())):
        if isinstance(module, Op):
            module.finalize()


def _restore_cached(items: list[_Item]) -> list[_Item]:
    """Let ops that keep a cache of their converted weights take them from it; drop their items."""
    by_owner: dict[str, list[_Item]] = {}
    for item in items:
        if isinstance(item.owner, Op):
            by_owner.setdefault(item.owner_name, []).append(item)
    restored = set()
    for name, owned in by_owner.items():
        sources = [i.info for i in owned] + [s for i in owned for s in (i.scale, i.mxfp4_scales) if s is not None]
        if owned[0].owner.restore(name, sources):
            restored.add(name)
    if restored:
        log.info("%d ops took their converted weights from the cache", len(restored))
    return [i for i in items if i.owner_name not in restored]


def _plan(placed: PlacedModel, checkpoint: Checkpoint) -> tuple[list[_Item], int]:
    expected = placed.owned_keys()
    if _tied(placed, checkpoint):
        expected.pop("lm_head.weight")
    config, arch = placed.config, placed.arch
    items: list[_Item] = []
    unexpected: list[TensorInfo] = []
    skipped = 0
    for key, info in checkpoint.tensors.items():
        if key.endswith(SCALE_SUFFIX):
            if key[: -len(SCALE_SUFFIX)] not in checkpoint.tensors:
                unexpected.append(info)
            continue
        if key.endswith(MXFP4_SCALES) and key.removesuffix(MXFP4_SCALES) + MXFP4_BLOCKS in checkpoint.tensors:
            continue  # goes with its blocks
        if arch.is_mtp(key, config):
            skipped += 1
            continue
        target = expected.pop(arch.module_key(key), None)
        if target is None:
            unexpected.append(info)
            continue
        owner_name, owner, rel, shape = target
        if info.shape != shape:
            raise CheckpointError(
                f"{info.file}: tensor {key} has shape {list(info.shape)}, the model expects {list(shape)}"
            )
        scale = checkpoint.tensors.get(key + SCALE_SUFFIX)
        if key.endswith(MXFP4_BLOCKS) and info.dtype == torch.uint8:
            items.append(_mxfp4_item(checkpoint, info, owner_name, owner, rel, placed.placements[owner_name].device))
            continue
        if info.dtype == torch.float8_e4m3fn:
            if scale is None:
                raise CheckpointError(f"{info.file}: FP8 tensor {key} has no {key + SCALE_SUFFIX}")
        elif info.dtype not in FLOATS:
            raise CheckpointError(f"{info.file}: tensor {key} has dtype {info.dtype}; expected a float type")
        elif scale is not None:
            raise CheckpointError(f"{scale.file}: {scale.key} scales {key}, which is {info.dtype}, not FP8")
        items.append(_Item(info, owner_name, owner, rel, placed.placements[owner_name].device, scale))
    if unexpected:
        listed = "; ".join(f"{i.key} in {i.file.name}" for i in unexpected[:5])
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"{checkpoint.directory}: {len(unexpected)} unexpected tensor(s) for {arch.name}: {listed}{more}"
        )
    if expected:
        missing = list(expected)
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{checkpoint.directory}: {len(missing)} tensor(s) missing from the checkpoint: "
            f"{', '.join(missing[:5])}{more}"
        )
    if any(i.scale for i in items):
        block = _block_size(placed)
        for i in items:
            if i.scale is not None and i.scale.shape != fp8_scale_shape(i.info.shape, block):
                raise CheckpointError(
                    f"{i.scale.file}: {i.scale.key} has shape {list(i.scale.shape)}; weight "
                    f"{list(i.info.shape)} with block {list(block)} needs {list(fp8_scale_shape(i.info.shape, block))}"
                )
    return items, skipped


def _mxfp4_item(checkpoint: Checkpoint, info: TensorInfo, owner_name: str, owner: nn.Module, rel, device) -> _Item:
    """MXFP4 blocks `[..., G, 16]` and their scales `[..., G]`, both uint8, for an op that takes them."""
    key = info.key
    scales = checkpoint.tensors.get(key.removesuffix(MXFP4_BLOCKS) + MXFP4_SCALES)
    if scales is None:
        raise CheckpointError(f"{info.file}: MXFP4 tensor {key} has no {key.removesuffix(MXFP4_BLOCKS)}{MXFP4_SCALES}")
    if scales.dtype != torch.uint8 or scales.shape != info.shape[:-1]:
        raise CheckpointError(
            f"{scales.file}: {scales.key} is {scales.dtype} {list(scales.shape)}; the MXFP4 blocks "
            f"{list(info.shape)} need uint8 scales {list(info.shape[:-1])}"
        )
    if not isinstance(owner, Op):
        raise CheckpointError(f"{info.file}: {key} is MXFP4; only an op that takes MXFP4 loads it, not {owner_name}")
    return _Item(info, owner_name, owner, rel, device, None, scales)


def _block_size(placed: PlacedModel) -> tuple[int, int]:
    qc = getattr(placed.config, "quantization_config", None) or {}
    block = qc.get("weight_block_size") if isinstance(qc, dict) else getattr(qc, "weight_block_size", None)
    if not block or len(block) != 2:
        raise CheckpointError(
            "the checkpoint holds FP8 weights with block scales, but config.json has no "
            "quantization_config.weight_block_size"
        )
    return int(block[0]), int(block[1])


def _tied(placed: PlacedModel, checkpoint: Checkpoint) -> bool:
    return bool(getattr(placed.config, "tie_word_embeddings", False)) and "lm_head.weight" not in checkpoint.tensors


def _tie_embeddings(placed: PlacedModel, checkpoint: Checkpoint) -> None:
    if not _tied(placed, checkpoint):
        return
    model = placed.model
    device = placed.placements["lm_head"].device
    model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.to(device), requires_grad=False)
