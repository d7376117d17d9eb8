"""`hetero-moe plan`: write the rules for this box.

1. What must sit on the GPU (attention, routers, shared experts, dense layers, norms, embeddings,
   lm_head, and the KV cache for `max_context` tokens) goes there in the most precise form that fits:
   the model's dtype, else FP8 linears (on a GPU with FP8 tensor cores), else INT4 linears with INT4
   lm_head and the embedding in DRAM. Without a GPU everything stays in DRAM.
2. The routed experts go to DRAM in INT4 (or `experts_quant`; gpt-oss's in its release's MXFP4, the only
   format their kernels take), and must fit there.
3. With a routing profile (`hetero-moe profile`), the most-routed experts are pinned on the GPU, in
   the compute dtype, with the GPU memory left over.

Every candidate is a rules text placed on the meta device exactly as `rules check` does, so the
predicted bytes are those loading will allocate and the written file passes `rules check`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hetero_moe.arch import build_meta_model, load_config
from hetero_moe.inject.injector import PlacedModel, inject
from hetero_moe.inject.rules import parse_rules
from hetero_moe.llm import resolve_dtype
from hetero_moe.loader.gguf_file import GGUFFile, is_gguf
from hetero_moe.loader.gguf_load import use_gguf_blocks
from hetero_moe.loader.gguf_model import gguf_config
from hetero_moe.ops.cpu_experts import CPUExperts
from hetero_moe.ops.experts import MXFP4_EXPERTS
from hetero_moe.ops.moe import MoEBlock
from hetero_moe.ops.registry import OPS
from hetero_moe.settings import GB, RESERVES, available_memory

DEFAULT_CONTEXT = 8192  # tokens of KV cache planned for, when not given (or the model's own limit)
MLA = ("DeepseekV3ForCausalLM", "DeepseekV32ForCausalLM", "DeepseekV2ForCausalLM")

EXPERTS = r"^model\.layers\.\d+\.mlp\.experts$"
LINEARS = (
    r"^model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa)"
    r"|linear_attn\.(in_proj_qkv|in_proj_z|in_proj_qkvz|out_proj)|mlp(\.shared_experts?)?\.(gate|up|down)_proj)$"
)


class PlanError(ValueError):
    """The box cannot hold the model; the message says what is missing."""


@dataclass(frozen=True)
class Box:
    gpu_bytes: float  # usable GPU memory; 0 without a GPU
    cpu_bytes: float  # usable DRAM
    gpu_fp8: bool = False  # FP8 tensor cores (compute capability 8.9 or later)

    @staticmethod
    def measure(gpu_gb: float | None = None, cpu_gb: float | None = None, gpu_fp8: bool | None = None) -> Box:
        """This box, where not given: free GPU memory of cuda:0, available DRAM, the GPU's capability."""
        if gpu_gb is None:
            gpu = torch.cuda.mem_get_info(0)[0] if torch.cuda.is_available() else 0.0
        else:
            gpu = gpu_gb * GB
        cpu = cpu_gb * GB if cpu_gb is not None else available_memory()
        if cpu is None:
            raise PlanError("cannot tell the available DRAM on this system; pass --cpu-memory")
        if gpu_fp8 is None:
            gpu_fp8 = torch.cuda.is_available() and torch.cuda.get_device_capability(0) >= (8, 9)
        return Box(gpu, cpu, gpu_fp8)


@dataclass
class Plan:
    rules: str  # the YAML text
    gpu_linears: str  # "none" (no GPU), the dtype name, "fp8" or "int4"
    experts_quant: str
    weights: dict[str, int]  # bytes per device
    kv_cache: dict[str, int]  # bytes per device for max_context tokens
    pinned: dict[str, list[int]] = field(default_factory=dict)  # experts module -> pinned experts
    pinned_share: float = 0.0  # of the profiled routings that land on pinned experts
    max_context: int = DEFAULT_CONTEXT  # tokens of the KV cache in `kv_cache`
    paged: int = 0  # bytes beyond the usable DRAM, read from the GGUF file in place: they page from disk


def plan(
    model_dir: Path,
    box: Box,
    max_context: int | None = None,
    profile: dict | None = None,
    experts_quant: str = "int4",
    dtype: str = "auto",
) -> Plan:
    gguf = GGUFFile.open(model_dir) if is_gguf(model_dir) else None
    config, arch = gguf_config(gguf) if gguf is not None else load_config(model_dir)
    torch_dtype = resolve_dtype(dtype, config)
    if max_context is None:
        max_context = min(DEFAULT_CONTEXT, config.max_position_embeddings)
    if not 0 < max_context <= config.max_position_embeddings:
        raise PlanError(f"max_context must be in 1..{config.max_position_embeddings}, got {max_context}")
    gpu_budget = RESERVES["cuda"].usable(box.gpu_bytes, box.gpu_bytes)
    cpu_budget = RESERVES["cpu"].usable(box.cpu_bytes, box.cpu_bytes)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    # dense MLP layers or shared experts: a rule for them only where the model has some (no unused rules)
    classes = [type(m).__name__ for m in build_meta_model(config, arch, torch_dtype).modules()]
    has_mlp = any(c in OPS["mlp"].impls for c in classes)
    linear = any(c in OPS["linear_attention"].impls for c in classes)  # Qwen3.5-MoE's, Qwen3-Next's
    moe_layers = sum(c in OPS["moe"].impls for c in classes)
    mxfp4 = any(c in MXFP4_EXPERTS for c in classes)  # gpt-oss: its own MXFP4, never pinned (not supported)
    if mxfp4:
        experts_quant = "mxfp4"
    tried = []
    choice = None
    for gpu_linears in _gpu_candidates(box, dtype_name):
        text = _rules(arch.name, gpu_linears, experts_quant, {}, has_mlp, moe_layers, linear)
        placed = _place(config, arch, torch_dtype, text, gguf)
        weights, cache = placed.bytes_per_device(), placed.kv_cache_bytes(max_context)
        gpu = weights.get("cuda:0", 0) + cache.get("cuda:0", 0)
        tried.append((gpu_linears, gpu))
        if gpu_linears == "none" or gpu <= gpu_budget:
            choice = (gpu_linears, text, placed, weights, cache)
            break
    if choice is None:
        smallest = min(g for _, g in tried)
        raise PlanError(
            f"the GPU is too small: {box.gpu_bytes / GB:.1f} GB, of which {gpu_budget / GB:.1f} GB usable, but the "
            f"smallest placement (INT4 linears) needs {smallest / GB:.1f} GB with the KV cache of {max_context} "
            "tokens; use a smaller --max-context, a larger GPU, or no GPU (--gpu-memory 0)"
        )
    gpu_linears, text, placed, weights, cache = choice
    experts_quant = _experts_format(placed, experts_quant)
    cpu = weights.get("cpu", 0) + cache.get("cpu", 0)
    in_place = placed.mapped_bytes()  # GGUF blocks the kernels read from the file: the page cache serves them
    if cpu - in_place > cpu_budget:
        mapped = f" ({in_place / GB:.1f} GB of it read in place from the file)" if in_place else ""
        raise PlanError(
            f"DRAM is too small: {box.cpu_bytes / GB:.1f} GB, of which {cpu_budget / GB:.1f} GB usable, but the "
            f"model needs {cpu / GB:.1f} GB there{mapped} with {experts_quant.upper()} experts"
        )
    paged = int(max(cpu - cpu_budget, 0))
    result = Plan(text, gpu_linears, experts_quant, weights, cache, max_context=max_context, paged=paged)
    if profile is not None and gpu_linears != "none" and not mxfp4:
        pinned, share = _pin(placed, profile, gpu_budget - weights.get("cuda:0", 0) - cache.get("cuda:0", 0))
        if pinned:
            text = _rules(arch.name, gpu_linears, experts_quant, pinned, has_mlp, moe_layers, linear)
            placed = _place(config, arch, torch_dtype, text, gguf)
            weights = placed.bytes_per_device()
            result = Plan(text, gpu_linears, experts_quant, weights, cache, pinned, share, max_context, paged)
    return result


def _gpu_candidates(box: Box, dtype_name: str) -> list[str]:
    if box.gpu_bytes <= 0:
        return ["none"]
    return [dtype_name, *(["fp8"] if box.gpu_fp8 else []), "int4"]


def _place(config, arch, dtype: torch.dtype, text: str, gguf: GGUFFile | None = None) -> PlacedModel:
    placed = inject(build_meta_model(config, arch, dtype), parse_rules(text, "<plan>"), config, arch, dtype)
    if gguf is not None:  # experts in the file's blocks run (and weigh) as such
        use_gguf_blocks(placed, gguf)
    return placed


def _experts_format(placed: PlacedModel, experts_quant: str) -> str:
    """`experts_quant`, or the GGUF block type the CPU experts run in instead."""
    blocks = {m.block_type for m in placed.model.modules() if isinstance(m, CPUExperts) and m.block_type}
    return f"{'/'.join(sorted(blocks))} (the GGUF's own blocks)" if blocks else experts_quant


def _pin(placed: PlacedModel, profile: dict, free: float) -> tuple[dict[str, list[int]], float]:
    """The most-routed (layer, expert) pairs that fit in `free` bytes of GPU memory, and their share of all
    profiled routings."""
    blocks = {name: m for name, m in placed.model.named_modules() if isinstance(m, MoEBlock)}
    layers = profile["layers"]
    if set(layers) != set(blocks):
        missing = sorted(set(blocks) - set(layers))[:3]
        raise PlanError(
            f"the profile does not fit this model: its MoE layers differ (e.g. {missing or list(layers)[:3]})"
        )
    experts = next(iter(blocks.values())).experts
    if profile["num_experts"] != experts.num_experts:
        raise PlanError(f"the profile has {profile['num_experts']} experts per layer, this model {experts.num_experts}")
    per_expert = 3 * experts.inter * experts.hidden * placed.dtype.itemsize
    ranked = sorted(
        ((count, name, e) for name, counts in layers.items() for e, count in enumerate(counts) if count > 0),
        reverse=True,
    )
    n = max(int(free // per_expert), 0)
    chosen = ranked[:n]
    pinned: dict[str, list[int]] = {}
    for _, name, e in chosen:
        pinned.setdefault(f"{name}.experts", []).append(e)
    total = sum(sum(c) for c in layers.values())
    share = sum(c for c, _, _ in chosen) / total if total else 0.0
    return {k: sorted(v) for k, v in sorted(pinned.items(), key=lambda kv: _layer(kv[0]))}, share


def _layer(name: str) -> int:
    return int(re.search(r"\.layers\.(\d+)\.", name).group(1))


def _rules(
    arch: str,
    gpu_linears: str,
    experts_quant: str,
    pinned: dict[str, list[int]],
    has_mlp: bool,
    moe_layers: int,
    linear_attention: bool = False,
) -> str:
    """The rules text of one candidate; per-layer experts rules for pinned experts come first."""
    device = "cpu" if gpu_linears == "none" else "'cuda:0'"
    experts_kwargs = f"quant: {experts_quant}" + (", group_size: 64" if experts_quant == "int4" else "")
    lines = []
    for name, experts in pinned.items():
        lines += [
            f"- match: {{name: '^{re.escape(name)}$'}}",
            f"  replace: {{op: cpu_experts, device: cpu, kwargs: {{{experts_kwargs}, pinned: {experts}}}}}",
            "  recursive: false",
        ]
    if len(pinned) < moe_layers:  # the layers with no pinned expert
        lines += [
            f"- match: {{name: '{EXPERTS}'}}",
            f"  replace: {{op: cpu_experts, device: cpu, kwargs: {{{experts_kwargs}}}}}",
            "  recursive: false",
        ]
    if gpu_linears == "int4":
        lines += ["- match: {name: '^model\\.embed_tokens$'}", "  replace: {device: cpu}"]
    absorb = ", kwargs: {absorb: true}" if arch in MLA and gpu_linears != "none" else ""
    lines += ["- match: {name: '^model\\.layers\\.\\d+\\.self_attn$'}", f"  replace: {{op: attention{absorb}}}"]
    if linear_attention:
        lines += ["- match: {name: '^model\\.layers\\.\\d+\\.linear_attn$'}", "  replace: {op: linear_attention}"]
    if gpu_linears in ("fp8", "int4"):
        quant = "quant: fp8" if gpu_linears == "fp8" else "quant: int4, group_size: 64"
        pattern = LINEARS if gpu_linears == "fp8" else LINEARS + "|^lm_head$"
        lines += [f"- match: {{name: '{pattern}'}}", f"  replace: {{op: linear, kwargs: {{{quant}}}}}"]
    lines += [
        f"- match: {{class: '{'|'.join(OPS['moe'].impls)}'}}",
        "  replace: {op: moe}",
        "- match: {name: '^model\\.layers\\.\\d+\\.mlp\\.gate$'}",
        "  replace: {op: router}",
    ]
    if has_mlp:
        lines += ["- match: {name: '^model\\.layers\\.\\d+\\.mlp(\\.shared_experts?)?$'}", "  replace: {op: mlp}"]
    lines += [
        "- match: {name: '^$'}",
        f"  replace: {{device: {device}}}",
    ]
    return "\n".join(lines) + "\n"


def render(p: Plan, box: Box) -> str:
    """The rules file: a header that says what it was planned for, then the rules."""
    devices = ", ".join(f"{d} {(b + p.kv_cache.get(d, 0)) / GB:.2f} GB" for d, b in p.weights.items())
    header = [
        "# Written by `hetero-moe plan` for a box with "
        + (f"{box.gpu_bytes / GB:.1f} GB of GPU memory" if box.gpu_bytes else "no GPU")
        + f" and {box.cpu_bytes / GB:.1f} GB of DRAM, {p.max_context} tokens of context.",
        f"# GPU linears: {p.gpu_linears}; routed experts: {p.experts_quant} in DRAM"
        + (
            f", {sum(len(v) for v in p.pinned.values())} of them pinned on the GPU "
            f"({p.pinned_share:.0%} of the profiled routings)"
            if p.pinned
            else ""
        )
        + ".",
        f"# Predicted memory (weights and one {p.max_context}-token KV cache): {devices}.",
    ]
    if p.paged:
        header.append(
            f"# {p.paged / GB:.1f} GB more than the usable DRAM: the weights read in place from the GGUF file "
            "page from disk as decoding needs them, at the disk's read speed."
        )
    return "\n".join(header) + "\n" + p.rules
