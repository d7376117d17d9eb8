"""The op registry: the only way a rules file reaches code.

An op name maps to one implementation per transformers class it can replace, so one rules file
(`op: attention`) serves every architecture while each module still gets exactly its own math.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from hetero_moe.ops.attention import AttentionKwargs, GQAAttention, MLAAttention
from hetero_moe.ops.base import BuildContext, NoKwargs, Op, parse_kwargs
from hetero_moe.ops.cpu_experts import CPUExperts, CPUExpertsKwargs
from hetero_moe.ops.cpu_linear import CPULinear, CPUQuantKwargs
from hetero_moe.ops.experts import TorchExperts
from hetero_moe.ops.linear import LinearKwargs, QuantLinear
from hetero_moe.ops.linear_attention import GatedDeltaNet
from hetero_moe.ops.mlp import GatedMLP, MLPKwargs
from hetero_moe.ops.moe import (
    SIGMOID_ROUTING,
    DeepseekV2Router,
    MixtralRouter,
    MoEBlock,
    QwenRouter,
    SigmoidRouter,
    TopkSoftmaxRouter,
)


@dataclass(frozen=True)
class OpSpec:
    name: str
    summary: str
    impls: Mapping[str, type[Op]]  # transformers class name -> our op class
    kwargs_type: type = field(default=NoKwargs)

    def parse_kwargs(self, raw: Mapping[str, Any]) -> Any:
        return parse_kwargs(self.kwargs_type, raw)

    def build(self, hf: nn.Module, ctx: BuildContext, kwargs: Any) -> Op:
        impl = self.impls.get(type(hf).__name__)
        if impl is None:
            raise TypeError(
                f"op {self.name!r} cannot replace a {type(hf).__name__}; it replaces: {', '.join(sorted(self.impls))}"
            )
        return impl.from_hf(hf, ctx, kwargs)


OPS: Mapping[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec(
            "attention",
            "attention with a KV cache: latent for DeepSeek (V3.2 with its indexer), grouped-query for the others",
            {
                "DeepseekV3Attention": MLAAttention,
                "DeepseekV32Attention": MLAAttention,
                "DeepseekV2Attention": MLAAttention,
                "Qwen3MoeAttention": GQAAttention,
                "MixtralAttention": GQAAttention,
                "Glm4MoeAttention": GQAAttention,
                "MiniMaxM2Attention": GQAAttention,
                "GptOssAttention": GQAAttention,
                "Qwen3_5MoeAttention": GQAAttention,
                "Qwen3NextAttention": GQAAttention,
            },
            AttentionKwargs,
        ),
        OpSpec(
            "linear_attention",
            "gated linear attention (Gated DeltaNet) with a conv and recurrent state per sequence",
            {"Qwen3_5MoeGatedDeltaNet": GatedDeltaNet, "Qwen3NextGatedDeltaNet": GatedDeltaNet},
        ),
        OpSpec(
            "moe",
            "MoE block: router, routed experts and shared experts, each on its own device",
            {
                "DeepseekV3MoE": MoEBlock,
                "DeepseekV32MoE": MoEBlock,
                "DeepseekV2Moe": MoEBlock,
                "Qwen3MoeSparseMoeBlock": MoEBlock,
                "MixtralSparseMoeBlock": MoEBlock,
                "Glm4MoeMoE": MoEBlock,
                "MiniMaxM2SparseMoeBlock": MoEBlock,
                "GptOssMLP": MoEBlock,
                "Qwen3_5MoeSparseMoeBlock": MoEBlock,
                "Qwen3NextSparseMoeBlock": MoEBlock,
            },
        ),
        OpSpec(
            "router",
            "top-k router, exactly as each architecture defines it",
            {
                **dict.fromkeys(SIGMOID_ROUTING, SigmoidRouter),
                "DeepseekV2TopkRouter": DeepseekV2Router,
                "Qwen3MoeTopKRouter": QwenRouter,
                "Qwen3_5MoeTopKRouter": QwenRouter,
                "Qwen3NextTopKRouter": QwenRouter,
                "MixtralTopKRouter": MixtralRouter,
                "GptOssTopKRouter": TopkSoftmaxRouter,
            },
        ),
        OpSpec(
            "experts",
            "routed experts in plain torch (reference speed), stacked in our layout",
            {
                "DeepseekV3Experts": TorchExperts,
                "DeepseekV32Experts": TorchExperts,
                "DeepseekV2Experts": TorchExperts,
                "Qwen3MoeExperts": TorchExperts,
                "MixtralExperts": TorchExperts,
                "Glm4MoeExperts": TorchExperts,
                "MiniMaxM2Experts": TorchExperts,
                "GptOssExperts": TorchExperts,
                "Qwen3_5MoeExperts": TorchExperts,
                "Qwen3NextExperts": TorchExperts,
            },
        ),
        OpSpec(
            "cpu_experts",
            "routed experts on the CPU, quantized (quant: int4 | int8 | fp8 | bf16 | mxfp4), Numba kernels",
            {
                "DeepseekV3Experts": CPUExperts,
                "DeepseekV32Experts": CPUExperts,
                "DeepseekV2Experts": CPUExperts,
                "Qwen3MoeExperts": CPUExperts,
                "MixtralExperts": CPUExperts,
                "Glm4MoeExperts": CPUExperts,
                "MiniMaxM2Experts": CPUExperts,
                "GptOssExperts": CPUExperts,
                "Qwen3_5MoeExperts": CPUExperts,
                "Qwen3NextExperts": CPUExperts,
            },
            CPUExpertsKwargs,
        ),
        OpSpec(
            "mlp",
            "gated MLP: dense layers and shared experts (quant: int4 | int8 on the CPU, int8 dot products)",
            {
                "DeepseekV3MLP": GatedMLP,
                "DeepseekV32MLP": GatedMLP,
                "DeepseekV2MLP": GatedMLP,
                "Qwen3MoeMLP": GatedMLP,
                "Glm4MoeMLP": GatedMLP,
                "Qwen3_5MoeMLP": GatedMLP,
                "Qwen3NextMLP": GatedMLP,
            },
            MLPKwargs,
        ),
        OpSpec(
            "linear",
            "quantized linear on the GPU (quant: fp8 | int4), Triton kernels",
            {"Linear": QuantLinear},
            LinearKwargs,
        ),
        OpSpec(
            "cpu_linear",
            "quantized linear on the CPU (quant: int4 | int8), int8 dot products",
            {"Linear": CPULinear},
            CPUQuantKwargs,
        ),
    )
}

# Classes the model runner calls with our calling convention: rules must replace them.
MUST_REPLACE: Mapping[str, str] = {
    cls: spec.name
    for spec in OPS.values()
    if spec.name in ("attention", "linear_attention", "moe", "router", "experts")
    for cls in spec.impls
}
