"""A GGUF file as a model: the transformers config from its metadata, the name table from llama.cpp's
tensor names to our checkpoint keys, and the tokenizer from its `tokenizer.*` keys.

Architectures, as llama.cpp writes them (`general.architecture`):

- `deepseek2`: DeepSeek-V2, V2-Lite, V3 and R1. A sigmoid gating function (`expert_gating_func` 2) is
  V3/R1 (`DeepseekV3ForCausalLM`); softmax (or none written: older files) is V2, with a query LoRA and
  expert groups, or V2-Lite, with neither (`DeepseekV2ForCausalLM`).
- `qwen3moe`: Qwen3-MoE.
- `llama` with experts (`llama.expert_count`): Mixtral. llama.cpp permutes its query and key rows for
  its rotary layout; the table permutes them back.

llama.cpp splits MLA's `kv_b_proj` into `attn_k_b` (per head, transposed) and `attn_v_b`; the table
joins them again. Routed experts come stacked (`ffn_{gate,up,down}_exps`, `[E, out, in]`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from hetero_moe.arch import ARCHITECTURES, POSITIVE_FIELDS, Architecture, ModelError
from hetero_moe.loader.gguf_file import GGUFError, GGUFFile, GGUFTensor

log = logging.getLogger(__name__)

SOFTMAX, SIGMOID = 1, 2  # gguf.ExpertGatingFuncType
CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType
GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER = {  # blk.N.<name> -> model.layers.N.<key>
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
}
EXPERTS = {"ffn_gate_exps.weight": 0, "ffn_up_exps.weight": 1, "ffn_down_exps.weight": 2}  # -> projection
PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")
MLA_SPLIT = ("attn_k_b.weight", "attn_v_b.weight")  # -> self_attn.kv_b_proj.weight
PERMUTED = {"attn_q.weight": "num_attention_heads", "attn_k.weight": "num_key_value_heads"}  # llama only
LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")


def _shortest(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


class _Meta:
    """`general.architecture`-prefixed metadata, with errors that name the file and the key."""

    def __init__(self, g: GGUFFile, prefix: str) -> None:
        self.g, self.prefix = g, prefix

    def get(self, key: str, default: Any = None) -> Any:
        value = self.g.metadata.get(f"{self.prefix}.{key}", default)
        return _shortest(value) if isinstance(value, float) else value

    def req(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GGUFError(f"{self.g.path}: metadata {self.prefix}.{key} is missing")
        return value


def _rope(m: _Meta, mla: bool) -> dict[str, Any]:
    """rope_parameters: plain, linear or YaRN (DeepSeek's `yarn_log_multiplier` is 0.1 * mscale_all_dim)."""
    theta = m.get("rope.freq_base", 10000.0)
    kind = m.get("rope.scaling.type", "none")
    if kind == "none":
        return {"rope_type": "default", "rope_theta": theta}
    factor = m.req("rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    if kind != "yarn":
        raise GGUFError(f"{m.g.path}: rope scaling {kind!r} is not supported (none, linear, yarn)")
    out = {"rope_type": "yarn", "rope_theta": theta, "factor": factor}
    out["original_max_position_embeddings"] = m.req("rope.scaling.original_context_length")
    out["beta_fast"], out["beta_slow"] = (
        m.get("rope.scaling.yarn_beta_fast", 32.0),
        m.get("rope.scaling.yarn_beta_slow", 1.0),
    )
    if mla:
        mscale = round(m.get("rope.scaling.yarn_log_multiplier", 0.0) / 0.1, 6)
        out["mscale"] = out["mscale_all_dim"] = mscale
    return out


def _deepseek2(m: _Meta) -> tuple[str, dict[str, Any]]:
    gating = m.get("expert_gating_func", SOFTMAX)
    if gating not in (SOFTMAX, SIGMOID):
        raise GGUFError(f"{m.g.path}: deepseek2 expert_gating_func {gating} (only 1 softmax and 2 sigmoid exist)")
    heads, rope_dim = m.req("attention.head_count"), m.req("rope.dimension_count")
    key_dim = m.get("attention.key_length_mla") or m.req("attention.key_length")
    groups = m.get("expert_group_count", 1) or 1
    data = {
        "intermediate_size": m.req("feed_forward_length"),
        "moe_intermediate_size": m.req("expert_feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,  # llama.cpp writes MLA as one KV head; transformers counts query heads
        "n_routed_experts": m.req("expert_count"),
        "n_shared_experts": m.get("expert_shared_count", 0),
        "first_k_dense_replace": m.get("leading_dense_block_count", 0),
        "kv_lora_rank": m.req("attention.kv_lora_rank"),
        "q_lora_rank": m.get("attention.q_lora_rank") or None,
        "qk_rope_head_dim": rope_dim,
        "qk_nope_head_dim": key_dim - rope_dim,
        "v_head_dim": m.get("attention.value_length_mla") or m.req("attention.value_length"),
        "routed_scaling_factor": m.get("expert_weights_scale", 1.0),
        "norm_topk_prob": bool(m.get("expert_weights_norm", False)),
        "n_group": groups,
        "topk_group": m.get("expert_group_used_count", 1) or 1,
        "rope_parameters": _rope(m, mla=True),
    }
    if gating == SIGMOID:
        data.update(scoring_func="sigmoid", topk_method="noaux_tc", rope_interleave=True, num_nextn_predict_layers=0)
        log.info("%s: DeepSeek-V3/R1 (sigmoid gating)", m.g.path.name)
        return "DeepseekV3ForCausalLM", data
    data["topk_method"] = "group_limited_greedy" if groups > 1 else "greedy"
    log.info("%s: DeepSeek-%s (softmax gating)", m.g.path.name, "V2" if data["q_lora_rank"] else "V2-Lite")
    return "DeepseekV2ForCausalLM", data


def _qwen3moe(m: _Meta) -> tuple[str, dict[str, Any]]:
    return "Qwen3MoeForCausalLM", {
        "intermediate_size": m.get("feed_forward_length", m.req("expert_feed_forward_length")),
        "moe_intermediate_size": m.req("expert_feed_forward_length"),
        "num_attention_heads": m.req("attention.head_count"),
        "num_key_value_heads": m.get("attention.head_count_kv", m.req("attention.head_count")),
        "head_dim": m.req("attention.key_length"),
        "num_experts": m.req("expert_count"),
        "norm_topk_prob": True,  # llama.cpp's qwen3moe always renormalises the top-k weights
        "decoder_sparse_step": 1,
        "mlp_only_layers": [  # layers with a dense MLP, not a router: none in Qwen3-MoE's releases
            i for i in range(m.req("block_count")) if f"blk.{i}.ffn_gate_inp.weight" not in m.g.tensors
        ],
        "rope_parameters": _rope(m, mla=False),
    }


def _mixtral(m: _Meta) -> tuple[str, dict[str, Any]]:
    if not m.get("expert_count"):
        raise GGUFError(f"{m.g.path}: a dense llama model (no llama.expert_count); of llama, only Mixtral is supported")
    heads = m.req("attention.head_count")
    return "MixtralForCausalLM", {
        "intermediate_size": m.get("expert_feed_forward_length") or m.req("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": m.get("attention.head_count_kv", heads),
        "head_dim": m.get("attention.key_length", m.req("embedding_length") // heads),
        "num_local_experts": m.req("expert_count"),
        "rope_parameters": _rope(m, mla=False),
    }


GGUF_ARCHS: dict[str, Callable[[_Meta], tuple[str, dict[str, Any]]]] = {
    "deepseek2": _deepseek2,
    "qwen3moe": _qwen3moe,
    "llama": _mixtral,
}


def gguf_config(g: GGUFFile) -> tuple[PretrainedConfig, Architecture]:
    """The transformers config and our architecture of the model in `g`, from its metadata."""
    name = g.architecture()
    if name not in GGUF_ARCHS:
        raise ModelError(
            f"{g.path}: unsupported GGUF architecture {name!r}; supported: deepseek2 (DeepSeek-V2, V2-Lite, V3, "
            "R1), qwen3moe (Qwen3-MoE), llama with experts (Mixtral)"
        )
    m = _Meta(g, name)
    hf_name, data = GGUF_ARCHS[name](m)
    embed = g.tensors.get("token_embd.weight")
    if embed is None:
        raise GGUFError(f"{g.path}: no token_embd.weight tensor")
    data.update(
        architectures=[hf_name],
        vocab_size=embed.shape[0],
        hidden_size=m.req("embedding_length"),
        num_hidden_layers=m.req("block_count"),
        num_experts_per_tok=m.req("expert_used_count"),
        max_position_embeddings=m.req("context_length"),
        rms_norm_eps=m.get("attention.layer_norm_rms_epsilon", 1e-6),
        tie_word_embeddings="output.weight" not in g.tensors,
        bos_token_id=g.metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=g.metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=g.metadata.get("tokenizer.ggml.padding_token_id"),
    )
    arch = ARCHITECTURES[hf_name]
    for field in POSITIVE_FIELDS:
        if field in data and not (type(data[field]) is int and data[field] > 0):
            raise GGUFError(f"{g.path}: {field} must be a positive integer, got {data[field]!r} from the metadata")
    try:
        config = CONFIG_MAPPING[arch.model_type](**data)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise GGUFError(f"{g.path}: metadata do not make a valid {hf_name} config: {' '.join(str(e).split())}") from e
    return config, arch


@dataclass(frozen=True)
class Mapped:
    """One of our checkpoint keys, made from GGUF tensors (`build` of their values, in order)."""

    key: str
    sources: tuple[GGUFTensor, ...]
    build: Callable[..., torch.Tensor]

    @property
    def direct(self) -> bool:
        """One tensor taken as it is (its blocks can run as they are)."""
        return len(self.sources) == 1 and self.build is _same


@dataclass(frozen=True)
class ExpertStack:
    """One projection of every routed expert of a layer, `[E, out, in]`."""

    module: str  # model.layers.N.mlp.experts
    proj: int  # 0 gate, 1 up, 2 down
    tensor: GGUFTensor

    def rel(self, expert: int) -> str:
        """The expert's key within the experts module."""
        return f"{expert}.{PROJ_NAMES[self.proj]}.weight"

    def key(self, expert: int) -> str:
        return f"{self.module}.{self.rel(expert)}"


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _join_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """`attn_k_b [H, kv_lora, nope]` and `attn_v_b [H, v, kv_lora]` -> `kv_b_proj [H * (nope + v), kv_lora]`."""
    return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, v_b.shape[2]).contiguous()


def _unpermute(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Undo llama.cpp's query/key row permutation (its rotary pairs adjacent rows; transformers' halves)."""

    def build(w: torch.Tensor) -> torch.Tensor:
        return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).contiguous()

    return build


def name_table(g: GGUFFile, config: PretrainedConfig) -> tuple[list[Mapped], list[ExpertStack], list[GGUFTensor]]:
    """The file's tensors as (our keys, expert stacks, tensors the table does not know)."""
    permute = g.architecture() == "llama"
    mapped, stacks, unknown = [], [], []
    for name, t in g.tensors.items():
        if name in GLOBAL:
            mapped.append(Mapped(GLOBAL[name], (t,), _same))
            continue
        m = LAYER_NAME.match(name)
        layer, rest = (int(m.group(1)), m.group(2)) if m else (-1, "")
        prefix = f"model.layers.{layer}."
        if rest in LAYER:
            build = _unpermute(getattr(config, PERMUTED[rest])) if permute and rest in PERMUTED else _same
            mapped.append(Mapped(prefix + LAYER[rest], (t,), build))
        elif rest in EXPERTS:
            stacks.append(ExpertStack(prefix + "mlp.experts", EXPERTS[rest], t))
        elif rest == MLA_SPLIT[0]:
            v_b = g.tensors.get(f"blk.{layer}.{MLA_SPLIT[1]}")
            if v_b is None:
                raise GGUFError(f"{g.path}: {name} has no {MLA_SPLIT[1]} beside it")
            mapped.append(Mapped(prefix + "self_attn.kv_b_proj.weight", (t, v_b), _join_kv_b))
        elif rest != MLA_SPLIT[1]:
            unknown.append(t)
    return mapped, stacks, unknown


def load_gguf_tokenizer(path: Path, metadata: dict[str, Any]) -> PreTrainedTokenizerBase:
    """The tokenizer and chat template the file's `tokenizer.*` metadata describe, built by transformers' GGUF
    integration from the file alone (not from tokenizer files that may lie beside it; never code)."""
    try:  # transformers 5.24 and later; older ones build GGUF tokenizers only for the architectures they load
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError as e:
        raise ModelError(f"{path}: building a tokenizer from GGUF metadata needs transformers 5.24 or later") from e
    try:
        architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
        backend = _added_tokens(backend, metadata)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ModelError(f"{path}: cannot build the tokenizer from its metadata: {' '.join(str(e).split())}") from e


def _added_tokens(backend: Tokenizer, metadata: dict[str, Any]) -> Tokenizer:
    """The file's control and user-defined tokens as added tokens with their own ids and text. llama.cpp
    stores them as plain text (`<｜User｜>`), not in the byte-level spelling of the rest of a `gpt2`
    vocabulary; transformers respells such tokens and leaves them out of the added ones, so the chat
    markers of DeepSeek's files would be cut into bytes."""
    tokens, kinds = metadata.get("tokenizer.ggml.tokens"), metadata.get("tokenizer.ggml.token_type")
    if metadata.get("tokenizer.ggml.model") != "gpt2" or not tokens or not kinds:
        return backend
    data = json.loads(backend.to_str())
    vocab = data["model"]["vocab"]  # token -> id
    spelled = {i: t for t, i in vocab.items()}
    merged = {part for m in data["model"]["merges"] for part in (m.split(" ") if isinstance(m, str) else m)}
    have = {a["id"] for a in data["added_tokens"]}
    for i, (token, kind) in enumerate(zip(tokens, kinds, strict=False)):
        if kind in (CONTROL, USER_DEFINED) and i not in have:
            old = spelled.get(i)
            if old is not None and old != token and old not in merged:  # an added token's id holds its text
                del vocab[old]
                vocab[token] = i
            special = kind == CONTROL
            data["added_tokens"].append(
                {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False}
                | {"normalized": False, "special": special}
            )
    return Tokenizer.from_str(json.dumps(data))
