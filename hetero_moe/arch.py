"""The supported architectures: how to read their config, build them on the meta device, name
their checkpoint tensors and lay out their rotary embeddings. One table, no per-model branches."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from hetero_moe.ops.rope import ComplexRope, HalfRope, InterleavedRope, Rope, SplitHalfRope


class ModelError(ValueError):
    """A model directory or config that cannot be used."""


def _half(config: PretrainedConfig, out: Any) -> Rope:
    return HalfRope(*out)


def _deepseek_v3(config: PretrainedConfig, out: Any) -> Rope:
    return InterleavedRope(*out) if config.rope_interleave else HalfRope(*out)


def _interleaved(config: PretrainedConfig, out: Any) -> Rope:
    return InterleavedRope(*out)


def _complex(config: PretrainedConfig, out: Any) -> Rope:
    return ComplexRope(out)


def _split_half(config: PretrainedConfig, out: Any) -> Rope:
    return SplitHalfRope(*out)


@dataclass(frozen=True)
class Architecture:
    name: str  # config.architectures[0]
    model_type: str
    rope: Callable[[PretrainedConfig, Any], Rope]  # rotary module output -> Rope
    renames: tuple[tuple[str, str], ...] = ()  # checkpoint key regex -> our key, applied in order
    has_mtp: bool = False  # DeepSeek-V3's multi-token-prediction layers follow the decoder layers
    mtp_prefix: str | None = None  # or a module of their own (Qwen3-Next's and Qwen3.5's "mtp.")
    # releases that name their own model_type for transformers' config (Kimi-K2: "kimi_k2", read as DeepSeek-V3)
    release_model_types: tuple[str, ...] = ()

    def module_key(self, checkpoint_key: str) -> str:
        for pattern, repl in self.renames:
            checkpoint_key = re.sub(pattern, repl, checkpoint_key)
        return checkpoint_key

    def is_mtp(self, key: str, config: PretrainedConfig) -> bool:
        """Keys of the MTP module (layers past `num_hidden_layers`, or under `mtp_prefix`), which decoding
        does not use."""
        if self.mtp_prefix is not None and key.startswith(self.mtp_prefix):
            return True
        if not self.has_mtp or not getattr(config, "num_nextn_predict_layers", 0):
            return False
        m = re.match(r"model\.layers\.(\d+)\.", key)
        return m is not None and int(m.group(1)) >= config.num_hidden_layers


# The original Mixtral release's MoE names (MiniMax-M2's release keeps them): block_sparse_moe, w1 / w3 / w2.
_MIXTRAL_NAMES = (
    (r"\.block_sparse_moe\.", ".mlp."),
    (r"(\.experts\.\d+)\.w1\.", r"\1.gate_proj."),
    (r"(\.experts\.\d+)\.w3\.", r"\1.up_proj."),
    (r"(\.experts\.\d+)\.w2\.", r"\1.down_proj."),
)

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "DeepseekV3ForCausalLM", "deepseek_v3", _deepseek_v3, has_mtp=True, release_model_types=("kimi_k2",)
        ),
        Architecture("DeepseekV2ForCausalLM", "deepseek_v2", _complex),
        Architecture("Qwen3MoeForCausalLM", "qwen3_moe", _half),
        Architecture("MixtralForCausalLM", "mixtral", _half, renames=_MIXTRAL_NAMES),
        Architecture("DeepseekV32ForCausalLM", "deepseek_v32", _interleaved, has_mtp=True),
        Architecture("Glm4MoeForCausalLM", "glm4_moe", _half, has_mtp=True),
        Architecture(
            "MiniMaxM2ForCausalLM",
            "minimax_m2",
            _half,
            # the correction bias sits on the MoE block in the release, on the router in ours
            renames=(*_MIXTRAL_NAMES, (r"\.mlp\.e_score_correction_bias$", ".mlp.gate.e_score_correction_bias")),
        ),
        # the MoE block's `router` is our MoE op's `gate`, as in every other architecture
        Architecture("GptOssForCausalLM", "gpt_oss", _split_half, renames=((r"\.mlp\.router\.", ".mlp.gate."),)),
        Architecture("Qwen3_5MoeForCausalLM", "qwen3_5_moe_text", _half, mtp_prefix="mtp."),
        Architecture("Qwen3NextForCausalLM", "qwen3_next", _half, mtp_prefix="mtp."),
    )
}


POSITIVE_FIELDS = (  # config fields that must be positive integers where the architecture has them
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "n_routed_experts",
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
)


def read_json_object(path: Path) -> dict:
    """A model folder's JSON file that must hold an object; anything else is one `ModelError` line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ModelError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def load_config(model_dir: str | Path) -> tuple[PretrainedConfig, Architecture]:
    """Read `config.json` with transformers' own config class for its model type (never remote code:
    an `auto_map` in it is ignored). Every problem is one `ModelError` line naming the file."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelError(f"{model_dir}: no config.json (is this a model directory?)")
    data = read_json_object(path)
    names = data.get("architectures")
    name = names[0] if isinstance(names, list) and len(names) == 1 and isinstance(names[0], str) else None
    arch = ARCHITECTURES.get(name) if name is not None else None
    if arch is None:
        shown = names if names is not None else data.get("model_type")
        raise ModelError(
            f"{path}: unsupported architecture {shown!r} (one name in 'architectures'); "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    if data.get("model_type") not in (arch.model_type, *arch.release_model_types):
        raise ModelError(f"{path}: model_type {data.get('model_type')!r} does not match {arch.name}")
    data = {**data, "model_type": arch.model_type}
    for field in POSITIVE_FIELDS:
        value = data.get(field)
        if field in data and not (type(value) is int and value > 0):
            raise ModelError(f"{path}: {field} must be a positive integer, got {value!r}")
    try:
        config = CONFIG_MAPPING[arch.model_type].from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ModelError(f"{path}: not a valid {arch.name} config: {' '.join(str(e).split())}") from e
    return config, arch


def build_meta_model(config: PretrainedConfig, arch: Architecture, dtype: torch.dtype) -> nn.Module:
    """The transformers model on the meta device: structure and shapes, no memory."""
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[arch.model_type])
    with torch.device("meta"):
        return cls._from_config(config, dtype=dtype)


def config_dtype(config: PretrainedConfig) -> torch.dtype:
    """The checkpoint's own dtype, or bfloat16 where it is FP8 or unset."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
