"""Synthetic checkpoints in the real on-disk layout.

No model weights can be downloaded, so tests, the built-in demo model and benchmarks use tiny (or
real-size) models built from transformers' own config classes with deterministic random weights, and
write them the way the real releases are laid out: per-expert safetensors keys (Mixtral's legacy
``block_sparse_moe.experts.E.w1`` names), optional shards with an index, FP8 e4m3 weights with
block-wise ``weight_scale_inv`` (the DeepSeek-V3 release format), gpt-oss's stacked MXFP4 experts
(``gate_up_proj_blocks`` and ``_scales``), a ``config.json`` and an offline
byte-level BPE tokenizer with a chat template mirroring each architecture's (tool calls included).

``write_checkpoint`` also returns the transformers-layout state dict a correct loader must produce
from the files (after bf16 rounding or FP8 dequantization), so a reference transformers model loaded
with it is the oracle for our own loader and model.
"""

from __future__ import annotations

import copy
import enum
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn

from hetero_moe.kernels.mxfp4 import quantize_mxfp4

logger = logging.getLogger(__name__)

SUPPORTED = (
    "DeepseekV3ForCausalLM",
    "DeepseekV2ForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
    "DeepseekV32ForCausalLM",
    "Glm4MoeForCausalLM",
    "MiniMaxM2ForCausalLM",
    "GptOssForCausalLM",
    "Qwen3_5MoeForCausalLM",
    "Qwen3NextForCausalLM",
)

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜pad｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
# Trained first, in this order, so they get ids 0..4 (bos 0, eos 1, pad 2 as in the tiny configs).
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)

# DeepSeek-V3's tool markers: added tokens that are not special, so they decode as text (as in the release).
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"

# A tool call's arguments: the string a client sent back, or the mapping transformers' convention asks for.
_ARGUMENTS = (
    "{%- if tool_call['function']['arguments'] is string %}{{ tool_call['function']['arguments'] }}"
    "{%- else %}{{ tool_call['function']['arguments'] | tojson }}{%- endif %}"
)

# DeepSeek-V3's template, reduced to what we serve: bos, system prompts (and the tools, as vLLM's DeepSeek-V3
# tool template lists them), then alternating turns, tool calls and tool outputs in the release's markers.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', is_tool=false) %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{%- set ns.system = ns.system + message['content'] %}{%- endif %}"
    "{%- endfor %}"
    "{%- if tools %}"
    "{%- set ns.system = ns.system + '\n\n## Tools\n\nYou have access to the following tools:\n' %}"
    "{%- for tool in tools %}"
    "{%- set ns.system = ns.system + '\n### ' + tool['function']['name'] + '\nDescription: '"
    " + (tool['function']['description'] or '') + '\n\nParameters: ' + (tool['function']['parameters'] | tojson)"
    " + '\n' %}"
    "{%- endfor %}"
    "{%- set ns.system = ns.system + '\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
    + TOOL_CALLS_BEGIN
    + TOOL_CALL_BEGIN
    + "function"
    + TOOL_SEP
    + "tool_call_name\n```json\ntool_call_arguments\n```"
    + TOOL_CALL_END
    + TOOL_CALLS_END
    + "' %}"
    "{%- endif %}"
    "{{ bos_token }}{{ ns.system }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if ns.is_tool %}{{ '" + TOOL_OUTPUTS_END + "' }}{%- set ns.is_tool = false %}{%- endif %}"
    "{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if ns.is_tool %}{{ '" + TOOL_OUTPUTS_END + "' }}{%- set ns.is_tool = false %}{%- endif %}"
    "{{ '<｜Assistant｜>' + (message['content'] or '') }}"
    "{%- if message['tool_calls'] %}{{ '" + TOOL_CALLS_BEGIN + "' }}"
    "{%- for tool_call in message['tool_calls'] %}"
    "{{ '" + TOOL_CALL_BEGIN + "' + tool_call['type'] + '" + TOOL_SEP + "' + tool_call['function']['name']"
    " + '\n```json\n' }}" + _ARGUMENTS + "{{ '\n```" + TOOL_CALL_END + "' }}"
    "{%- endfor %}{{ '" + TOOL_CALLS_END + "' }}"
    "{%- endif %}{{ eos_token }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if not ns.is_tool %}{{ '" + TOOL_OUTPUTS_BEGIN + "' }}{%- set ns.is_tool = true %}{%- endif %}"
    "{{ '" + TOOL_OUTPUT_BEGIN + "' + message['content'] + '" + TOOL_OUTPUT_END + "' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if ns.is_tool %}{{ '" + TOOL_OUTPUTS_END + "' }}{%- endif %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}{%- endif %}"
)

# DeepSeek-V2's template knows no tools: the model that tests the refusal of tools.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}{%- endif %}"
)

# Qwen3's template, reduced: ChatML turns, the tools as JSON inside <tools></tools> in the system turn,
# calls as {"name": ..., "arguments": ...} inside <tool_call></tool_call>, results in <tool_response>.
# (transformers renders with trim_blocks: text next to a block tag goes inside {{ }}.)
QWEN3_CHAT_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{ '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{%- for tool in tools %}{{ '\n' }}{{ tool | tojson }}{%- endfor %}"
    "{{ '\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call><|im_end|>\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' + (message['content'] or '') }}"
    "{%- for tool_call in message['tool_calls'] or [] %}"
    "{%- if not loop.first or message['content'] %}{{ '\n' }}{%- endif %}"
    "{{ '<tool_call>\n{\"name\": \"' + tool_call['function']['name'] + '\", \"arguments\": ' }}"
    + _ARGUMENTS
    + "{{ '}\n</tool_call>' }}"
    "{%- endfor %}{{ '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{%- endif %}"
    "{{ '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)

# Mistral's v3 template with tools, reduced: [AVAILABLE_TOOLS] before the last user turn, the system prompt
# in front of it, calls as a JSON list after the [TOOL_CALLS] control token, results in [TOOL_RESULTS].
MIXTRAL_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', last_user=-1) %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{%- set ns.system = ns.system + message['content'] %}"
    "{%- elif message['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if tools and loop.index0 == ns.last_user %}{{ '[AVAILABLE_TOOLS] [' }}"
    "{%- for tool in tools %}{{ tool | tojson }}{%- if not loop.last %}{{ ', ' }}{%- endif %}{%- endfor %}"
    "{{ '][/AVAILABLE_TOOLS]' }}{%- endif %}"
    "{%- if loop.index0 == ns.last_user and ns.system %}{{ '[INST] ' + ns.system + '\n\n' + message['content'] }}"
    "{%- else %}{{ '[INST] ' + message['content'] }}{%- endif %}{{ '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['tool_calls'] %}{{ '[TOOL_CALLS] [' }}"
    "{%- for tool_call in message['tool_calls'] %}"
    "{{ '{\"name\": ' + (tool_call['function']['name'] | tojson) + ', \"arguments\": ' }}"
    + _ARGUMENTS
    + "{{ ', \"id\": ' + (tool_call['id'] | tojson) + '}' }}"
    "{%- if not loop.last %}{{ ', ' }}{%- endif %}{%- endfor %}{{ ']' + eos_token }}"
    "{%- else %}{{ message['content'] + eos_token }}{%- endif %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{ '[TOOL_RESULTS] {\"content\": ' + message['content'] + ', \"call_id\": ' + (message['tool_call_id'] | tojson)"
    " + '}[/TOOL_RESULTS]' }}"
    "{%- endif %}"
    "{%- endfor %}"
)


@dataclass(frozen=True)
class ChatFormat:
    """One architecture's chat template and the tokens it adds after `SPECIAL_TOKENS`: control tokens
    (special: they add no text when decoded) and plain added tokens (always one token, decoded as text)."""

    template: str
    special: tuple[str, ...] = ()
    plain: tuple[str, ...] = ()
    eos_token: str = EOS_TOKEN


_DEEPSEEK_V3_CHAT = ChatFormat(
    CHAT_TEMPLATE,
    plain=(
        TOOL_CALLS_BEGIN,
        TOOL_CALLS_END,
        TOOL_CALL_BEGIN,
        TOOL_CALL_END,
        TOOL_SEP,
        TOOL_OUTPUTS_BEGIN,
        TOOL_OUTPUTS_END,
        TOOL_OUTPUT_BEGIN,
        TOOL_OUTPUT_END,
    ),
)

# Qwen3's ChatML with tool calls, shared by Qwen3.5-MoE and Qwen3-Next
_QWEN3_CHAT = ChatFormat(
    QWEN3_CHAT_TEMPLATE,
    special=("<|im_start|>", "<|im_end|>"),
    plain=("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"),
    eos_token="<|im_end|>",
)

CHAT_FORMATS = {
    "DeepseekV3ForCausalLM": _DEEPSEEK_V3_CHAT,
    "DeepseekV32ForCausalLM": _DEEPSEEK_V3_CHAT,
    "DeepseekV2ForCausalLM": ChatFormat(PLAIN_CHAT_TEMPLATE),
    # GLM-4.5, MiniMax-M2 and gpt-oss: plain turns; their own templates (gpt-oss's harmony) and tool-call
    # formats are not built here
    "Glm4MoeForCausalLM": ChatFormat(PLAIN_CHAT_TEMPLATE),
    "MiniMaxM2ForCausalLM": ChatFormat(PLAIN_CHAT_TEMPLATE),
    "GptOssForCausalLM": ChatFormat(PLAIN_CHAT_TEMPLATE),
    "Qwen3MoeForCausalLM": _QWEN3_CHAT,
    "Qwen3_5MoeForCausalLM": _QWEN3_CHAT,
    "Qwen3NextForCausalLM": _QWEN3_CHAT,
    "MixtralForCausalLM": ChatFormat(
        MIXTRAL_CHAT_TEMPLATE,
        special=(
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ),
    ),
}

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
SCALE_SUFFIX = "_scale_inv"  # an FP8 weight's block scales are stored as f"{weight}{SCALE_SUFFIX}"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Random init. Linear weights use std = gain / sqrt(fan_in) (0.18 at width 72), so activations keep
# unit scale at any width. The real configs' 0.02 gives near-uniform logits in a 72-wide model (top-2
# gaps of a few 1e-3; greedy decoding falls into one repeated token). Gain 1 still gives runs of one
# repeated token for some prompts; gain 1.5 gives varied greedy continuations with top-2 gaps of a few
# tenths. Larger gains make greedy output more sensitive: rounding the gain-1.5 weights to bf16
# changes the greedy continuation after 18 of 32 tokens on average (11-29 by architecture and seed).
_LINEAR_GAIN = 1.5
_EMBED_STD = 1.0
_NORM_STD = 0.1  # RMSNorm weights are 1 + N(0, _NORM_STD)
_VECTOR_STD = 0.1  # biases and persistent buffers (e_score_correction_bias), large enough to matter

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

_YARN_BASE = {
    "rope_type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "rope_theta": 10000.0,
}
# YaRN configs are self-consistent: max_position_embeddings = factor * original (as 163840 = 40 * 4096).
_YARN_MAX_POSITIONS = 40 * 64

_COMMON: dict[str, Any] = {
    "num_hidden_layers": 3,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
    "hidden_act": "silu",
}

# DeepSeek-V3's and V3.2's tiny shapes (the same layers; V3.2 adds the indexer)
_V3_SHAPES: dict[str, Any] = {
    "vocab_size": 419,
    "hidden_size": 72,
    "intermediate_size": 120,
    "moe_intermediate_size": 40,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "num_experts_per_tok": 3,
    "n_group": 4,
    "topk_group": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "q_lora_rank": 48,
    "kv_lora_rank": 24,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": _YARN_MAX_POSITIONS,
    "rope_parameters": {**_YARN_BASE, "mscale": 1.0, "mscale_all_dim": 1.0},
}

# Qwen3.5-MoE's and Qwen3-Next's shared tiny shapes: linear attention, full attention, linear attention.
_QWEN_LINEAR_SHAPES: dict[str, Any] = {
    "hidden_size": 72,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 24,  # 6 dims rotate
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 6,
    "linear_key_head_dim": 12,
    "linear_value_head_dim": 10,
    "linear_conv_kernel_dim": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "full_attention_interval": 2,  # every second layer: linear, full, linear at three layers
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 576,
}

# Tiny but awkward shapes: nothing a multiple of 128, q/k/v head dims all different, GQA, a dense layer
# before the MoE layers, grouped routing, shared experts. One row per architecture.
_TINY: dict[str, tuple[type[transformers.PreTrainedConfig], dict[str, Any]]] = {
    "DeepseekV3ForCausalLM": (
        transformers.DeepseekV3Config,
        {
            **_V3_SHAPES,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
        },
    ),
    "DeepseekV2ForCausalLM": (
        transformers.DeepseekV2Config,
        {
            "vocab_size": 389,
            "hidden_size": 76,
            "intermediate_size": 104,
            "moe_intermediate_size": 36,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "n_routed_experts": 10,
            "num_experts_per_tok": 3,
            "n_group": 1,
            "topk_group": 1,
            "topk_method": "greedy",
            "scoring_func": "softmax",
            "n_shared_experts": 2,
            "first_k_dense_replace": 1,
            "q_lora_rank": None,
            "kv_lora_rank": 20,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 12,
            "routed_scaling_factor": 1.0,
            "norm_topk_prob": False,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": _YARN_MAX_POSITIONS,
            "rope_parameters": {**_YARN_BASE, "mscale": 0.707, "mscale_all_dim": 0.707},
        },
    ),
    "Qwen3MoeForCausalLM": (
        transformers.Qwen3MoeConfig,
        {
            "vocab_size": 457,
            "hidden_size": 72,
            "intermediate_size": 112,
            "moe_intermediate_size": 44,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "head_dim": 16,  # 6 * 16 = 96 != hidden, as in the real model (32 * 128 vs 2048)
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [0],
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 576,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    ),
    "MixtralForCausalLM": (
        transformers.MixtralConfig,
        {
            "vocab_size": 331,
            "hidden_size": 72,
            "intermediate_size": 40,  # Mixtral's experts use intermediate_size
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_local_experts": 6,
            "num_experts_per_tok": 2,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 576,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    ),
    # DeepSeek-V3 at the V3 row's shapes plus the lightning indexer: index_topk 8, so the 11-token test
    # prompt and every decoded token past it attend to a subset; 6 index heads make exact zero scores
    # (every head's ReLU at 0), whose ties would make the top-k choice arbitrary, rare.
    "DeepseekV32ForCausalLM": (
        transformers.DeepseekV32Config,
        {
            **_V3_SHAPES,
            "index_topk": 8,
            "index_n_heads": 6,
            "index_head_dim": 20,
        },
    ),
    # GLM-4.5: half the head dim rotates, QK norm per head, q/k/v biases, one sigmoid group, shared expert.
    "Glm4MoeForCausalLM": (
        transformers.Glm4MoeConfig,
        {
            "vocab_size": 401,
            "hidden_size": 72,
            "intermediate_size": 112,
            "moe_intermediate_size": 36,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "head_dim": 20,
            "n_routed_experts": 8,
            "num_experts_per_tok": 3,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "use_qk_norm": True,
            "attention_bias": True,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 576,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5},
        },
    ),
    # MiniMax-M2: half the head dim rotates, QK norm over all heads at once, sigmoid router with the bias
    # on the block, no shared expert and no dense layer.
    "MiniMaxM2ForCausalLM": (
        transformers.MiniMaxM2Config,
        {
            "vocab_size": 389,
            "hidden_size": 72,
            "intermediate_size": 40,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 24,
            "num_local_experts": 8,
            "num_experts_per_tok": 3,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 576,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.5},
        },
    ),
    # gpt-oss: attention sinks, sliding-window layers between full ones (a window of 6, shorter than the test
    # prompts), q/k/v/o biases, top-k-then-softmax routing with a bias, MXFP4 experts (sizes multiples of 32:
    # 3 and 5 blocks) with biases and the clamped SwiGLU (limit 2, which this model's activations reach), YaRN.
    "GptOssForCausalLM": (
        transformers.GptOssConfig,
        {
            "vocab_size": 409,
            "hidden_size": 96,
            "intermediate_size": 160,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "head_dim": 20,
            "num_local_experts": 6,
            "num_experts_per_tok": 2,
            "sliding_window": 6,
            "swiglu_limit": 2.0,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 32 * 64,
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 64,
                "rope_theta": 150000.0,
            },
        },
    ),
    # Qwen3.5-MoE: linear attention (Gated DeltaNet: 2 key heads, 3 value heads each, a 4-wide causal conv)
    # around a full-attention layer (output gate, QK norm, a quarter of the head dim rotates), softmax router,
    # one shared expert behind a sigmoid gate, every layer MoE.
    "Qwen3_5MoeForCausalLM": (
        transformers.Qwen3_5MoeTextConfig,
        {
            **_QWEN_LINEAR_SHAPES,
            "vocab_size": 443,
            "moe_intermediate_size": 44,
            "shared_expert_intermediate_size": 36,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000000.0,
                "partial_rotary_factor": 0.25,
                "mrope_section": [1, 1, 1],
                "mrope_interleaved": True,
            },
        },
    ),
    # Qwen3-Next: the same layers with q/k/v/z and b/a projected together per key head, a dense first layer.
    "Qwen3NextForCausalLM": (
        transformers.Qwen3NextConfig,
        {
            **_QWEN_LINEAR_SHAPES,
            "vocab_size": 421,
            "intermediate_size": 100,
            "moe_intermediate_size": 40,
            "shared_expert_intermediate_size": 52,
            "mlp_only_layers": [0],
            "norm_topk_prob": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
        },
    ),
}


def tiny_config(arch: str, **overrides: Any) -> transformers.PreTrainedConfig:
    """A tiny config of ``arch`` (one of ``SUPPORTED``); ``overrides`` are extra config kwargs."""
    if arch not in _TINY:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED)}")
    config_cls, shape = _TINY[arch]
    kwargs = {**_COMMON, **copy.deepcopy(shape), "architectures": [arch], **overrides}
    return config_cls(**kwargs)


def random_model(config: transformers.PreTrainedConfig, seed: int = 0) -> transformers.PreTrainedModel:
    """The transformers model for ``config.architectures[0]``, float32 on the CPU, in eval mode, with
    deterministic random weights and persistent buffers (a function of ``config`` and ``seed`` only).

    The caller's config is not modified and the global RNG state is left as it was.
    """
    arch = _architecture(config)
    model_cls = getattr(transformers, arch)
    config = copy.deepcopy(config)  # _from_config writes dtype and attn implementation into it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation=_ATTENTION.get(arch, "sdpa"), dtype=torch.float32)
    _randomize(model, torch.Generator().manual_seed(seed))
    return model.eval()


# transformers' attention for the reference models: SDPA, or eager where SDPA lacks the model's math (sinks)
_ATTENTION = {"GptOssForCausalLM": "eager"}
# Releases whose routed experts are stacked MXFP4 blocks with their scales (gpt-oss), not per-expert floats
_MXFP4_RELEASES = ("GptOssForCausalLM",)
_MXFP4_QUANTIZATION = {  # gpt-oss's config.json
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}


def _architecture(config: transformers.PreTrainedConfig) -> str:
    archs = getattr(config, "architectures", None) or []
    if not archs or archs[0] not in SUPPORTED:
        raise ValueError(f"config.architectures={archs!r}: expected one of {', '.join(SUPPORTED)}")
    return archs[0]


class Role(enum.Enum):
    """What a state-dict tensor is, which decides how synthetic weights initialise it."""

    NORM = "norm"  # an RMSNorm weight: around 1
    EMBEDDING = "embedding"
    MATRIX = "matrix"  # [out, in] or fused experts [E, out, in]: std proportional to 1/sqrt(in)
    VECTOR = "vector"  # biases and persistent buffers (e_score_correction_bias)


def tensor_roles(model: nn.Module) -> dict[str, Role]:
    """The role of every state-dict tensor of ``model``, from module types and shapes only (so a model
    on the meta device works)."""
    norm_weights = {
        f"{name}.weight"
        for name, m in model.named_modules()
        if type(m).__name__.endswith(("RMSNorm", "RMSNormGated")) or isinstance(m, nn.LayerNorm)
    }
    embeddings = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    roles: dict[str, Role] = {}
    for name, tensor in model.state_dict().items():
        if name in norm_weights:
            roles[name] = Role.NORM
        elif name in embeddings:
            roles[name] = Role.EMBEDDING
        elif tensor.dim() >= 2:
            roles[name] = Role.MATRIX
        else:
            roles[name] = Role.VECTOR
    return roles


@torch.no_grad()
def _randomize(model: nn.Module, generator: torch.Generator) -> None:
    """Overwrite every parameter and persistent buffer, in state-dict order."""
    roles = tensor_roles(model)
    # experts transformers keeps as [E, in, out] (gpt-oss): their fan-in is the middle dim
    transposed = {
        f"{name}.{proj}"
        for name, m in model.named_modules()
        if getattr(m, "is_transposed", False)
        for proj in ("gate_up_proj", "down_proj")
    }
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied weights: initialise once
            continue
        seen.add(tensor.data_ptr())
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
        role = roles[name]
        if role is Role.NORM:
            value = 1.0 + _NORM_STD * noise
        elif role is Role.EMBEDDING:
            value = _EMBED_STD * noise
        elif role is Role.MATRIX:
            # [out, in] or fused experts [E, out, in]: fan-in is the last dim
            value = _LINEAR_GAIN / math.sqrt(tensor.shape[-2 if name in transposed else -1]) * noise
        else:
            value = _VECTOR_STD * noise
        tensor.copy_(value)


# ---------------------------------------------------------------------------------------------------
# Checkpoint writing


@dataclass(frozen=True)
class WrittenCheckpoint:
    """A checkpoint directory and the values a correct loader must produce from it.

    ``state_dict`` is in the transformers layout (fused experts), float32, holding what is on disk
    upcast (bf16 rounding included) or, for FP8 weights, the block-wise dequantized values.
    """

    path: Path
    state_dict: dict[str, torch.Tensor]


@dataclass(frozen=True)
class ExpertNaming:
    """How one MoE block's routed experts are named on disk."""

    block: str  # module holding router and experts under model.layers.N
    gate: str
    up: str
    down: str


_HF_NAMING = ExpertNaming(block="mlp", gate="gate_proj", up="up_proj", down="down_proj")
# The original Mixtral release: block_sparse_moe.gate / block_sparse_moe.experts.E.{w1,w3,w2}.
_MIXTRAL_LEGACY_NAMING = ExpertNaming(block="block_sparse_moe", gate="w1", up="w3", down="w2")

_LEGACY_NAMED = ("MixtralForCausalLM", "MiniMaxM2ForCausalLM")  # releases with Mixtral's names
_MLP_KEY = re.compile(r"^(model\.layers\.\d+)\.mlp\.(.+)$")
# Linear weights the FP8 releases keep in bf16: DeepSeek-V3.2's indexer head weights.
_NOT_FP8 = re.compile(r"\.indexer\.weights_proj\.weight$")


def expert_naming(config: transformers.PreTrainedConfig, legacy_mixtral_names: bool = True) -> ExpertNaming:
    """The on-disk naming of ``config``'s routed experts: the original Mixtral release's
    ``block_sparse_moe.experts.E.w1`` names when ``legacy_mixtral_names``, else transformers' own."""
    arch = _architecture(config)
    return _MIXTRAL_LEGACY_NAMING if arch in _LEGACY_NAMED and legacy_mixtral_names else _HF_NAMING


@dataclass(frozen=True)
class DiskEntry:
    """One tensor of the release layout, described by the transformers model's shapes alone."""

    name: str  # the key on disk
    source: str  # the transformers state-dict key holding its values
    expert: int | None  # routed experts: index into the fused source [E, ...]
    rows: tuple[int, int] | None  # row range of the source expert (gate or up half of gate_up_proj)
    shape: tuple[int, ...]  # on disk
    role: Role
    quantizable: bool  # a Linear weight inside the decoder layers: FP8 in the DeepSeek-V3 release
    keep_fp32: bool  # persistent buffers such as e_score_correction_bias stay float32 on disk
    mxfp4: bool = False  # stacked experts [E, out, in] in MXFP4: ``{name}_blocks`` and ``{name}_scales`` (gpt-oss)

    def take(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """This tensor's values, a view of the transformers state dict ``state``."""
        value = state[self.source]
        if self.mxfp4:  # transformers keeps these [E, in, out]
            value = value.transpose(1, 2)
        if self.expert is not None:
            value = value[self.expert]
        if self.rows is not None:
            value = value[self.rows[0] : self.rows[1]]
        return value


def write_checkpoint(
    model: transformers.PreTrainedModel,
    out_dir: str | Path,
    *,
    shards: int = 1,
    fp8: bool = False,
    block_size: tuple[int, int] = (128, 128),
    legacy_mixtral_names: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer: bool = True,
    model_type: str | None = None,
) -> WrittenCheckpoint:
    """Write ``model`` to ``out_dir`` in the real release layout and return the expected state dict.

    Writes ``config.json`` (with the FP8 ``quantization_config`` when ``fp8``), the weights as
    ``model.safetensors`` or ``shards`` files plus ``model.safetensors.index.json``, and, when
    ``tokenizer``, a tokenizer (``build_tokenizer``); ``model_type`` replaces transformers' own in ``config.json``,
    as releases that name their own do (Kimi-K2: ``kimi_k2``). Stale ``model*.safetensors`` files and index in
    ``out_dir`` are removed first. The output bytes are a function of the arguments only.
    """
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {dtype}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if len(block_size) != 2 or min(block_size) < 1:
        raise ValueError(f"block_size must be two positive ints, got {block_size}")
    naming = expert_naming(model.config, legacy_mixtral_names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    entries = disk_layout(model, naming)
    state = model.state_dict()
    # Groups of tensors that go to the same file: a weight and its scale are never split.
    groups: list[dict[str, torch.Tensor]] = []
    loaded: dict[str, torch.Tensor] = {}  # disk name -> what a loader must produce, float32
    for entry in entries:
        value = entry.take(state).detach().to(torch.float32).contiguous()
        if entry.mxfp4:
            from transformers.integrations.mxfp4 import convert_moe_packed_tensors

            blocks, scales = quantize_mxfp4(value)
            groups.append({f"{entry.name}_blocks": blocks, f"{entry.name}_scales": scales})
            # transformers' own dequantization, in its [E, in, out] layout
            loaded[entry.name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        elif fp8 and entry.quantizable:
            q, scale_inv = _quantize_fp8_blockwise(value, block_size)
            groups.append({entry.name: q, f"{entry.name}{SCALE_SUFFIX}": scale_inv})
            loaded[entry.name] = dequantize_fp8_reference(q, scale_inv, block_size)
        else:
            stored = value.to(torch.float32 if entry.keep_fp32 else dtype).contiguous()
            groups.append({entry.name: stored})
            loaded[entry.name] = stored.to(torch.float32, copy=True)  # never aliases the model

    _write_weights(out, groups, shards)
    write_config(model.config, out, dtype=dtype, fp8_block=block_size if fp8 else None, model_type=model_type)
    if tokenizer:
        build_tokenizer(out, vocab_size=model.config.vocab_size, arch=_architecture(model.config))
    state_dict = _assemble_state_dict(model, naming, loaded)
    logger.debug("wrote %s: %d tensors in %d file(s), fp8=%s", out, len(entries), shards, fp8)
    return WrittenCheckpoint(path=out, state_dict=state_dict)


def _disk_name(key: str, naming: ExpertNaming) -> str:
    """transformers key -> on-disk key, for everything but the fused experts."""
    match = _MLP_KEY.match(key)
    if match is None:
        return key
    return f"{match[1]}.{naming.block}.{match[2]}"


def _layer_prefix(key: str) -> str:
    """'model.layers.N.mlp.experts.down_proj' -> 'model.layers.N'."""
    match = _MLP_KEY.match(key)
    if match is None:
        raise ValueError(f"routed experts outside model.layers.N.mlp: {key}")
    return match[1]


def _expert_names(layer: str, naming: ExpertNaming, expert: int) -> tuple[str, str, str]:
    prefix = f"{layer}.{naming.block}.experts.{expert}"
    return (
        f"{prefix}.{naming.gate}.weight",
        f"{prefix}.{naming.up}.weight",
        f"{prefix}.{naming.down}.weight",
    )


def disk_layout(model: nn.Module, naming: ExpertNaming) -> list[DiskEntry]:
    """The tensors of the release layout, in state-dict order, fused experts split per expert.

    Reads only module types and shapes, so ``model`` may live on the meta device. Tied releases store
    only the embedding.
    """
    linear_weights = {
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith("model.layers.")
    }
    buffers = {name for name, _ in model.named_buffers()}
    roles = tensor_roles(model)
    state = model.state_dict()  # persistent tensors only: rotary inv_freq is not in it
    tied = getattr(model.config, "tie_word_embeddings", False)
    mxfp4 = _architecture(model.config) in _MXFP4_RELEASES
    entries: list[DiskEntry] = []
    for key, value in state.items():
        if tied and key == "lm_head.weight":
            continue
        if mxfp4 and key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            shape = (value.shape[0], value.shape[2], value.shape[1])  # [E, out, in]
            entries.append(DiskEntry(_disk_name(key, naming), key, None, None, shape, Role.MATRIX, False, False, True))
        elif key.endswith(".experts.gate_up_proj"):
            # [E, 2I, H]: gate rows first, then up
            layer = _layer_prefix(key)
            n_experts, two_inter, hidden = value.shape
            inter = two_inter // 2
            down_key = key.removesuffix("gate_up_proj") + "down_proj"
            down_shape = tuple(state[down_key].shape[1:])  # [H, I]
            for e in range(n_experts):
                gate_name, up_name, down_name = _expert_names(layer, naming, e)
                for name, rows in ((gate_name, (0, inter)), (up_name, (inter, two_inter))):
                    entries.append(_expert_entry(name, key, e, rows, (inter, hidden)))
                entries.append(_expert_entry(down_name, down_key, e, None, down_shape))
        elif key.endswith(".experts.down_proj"):
            continue  # written with gate_up_proj, expert by expert
        else:
            entries.append(
                DiskEntry(
                    _disk_name(key, naming),
                    key,
                    None,
                    None,
                    tuple(value.shape),
                    roles[key],
                    quantizable=key in linear_weights and value.dim() == 2 and not _NOT_FP8.search(key),
                    keep_fp32=key in buffers,
                )
            )
    return entries


def _expert_entry(
    name: str, source: str, expert: int, rows: tuple[int, int] | None, shape: tuple[int, ...]
) -> DiskEntry:
    return DiskEntry(name, source, expert, rows, shape, Role.MATRIX, quantizable=True, keep_fp32=False)


def _assemble_state_dict(
    model: nn.Module, naming: ExpertNaming, loaded: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Back from disk names to the transformers layout, fusing experts again."""
    state = model.state_dict()
    result: dict[str, torch.Tensor] = {}
    mxfp4 = _architecture(model.config) in _MXFP4_RELEASES
    for key, value in state.items():
        if mxfp4 and key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            result[key] = loaded[_disk_name(key, naming)]
        elif key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            layer = _layer_prefix(key)
            per_expert = [_expert_names(layer, naming, e) for e in range(value.shape[0])]
            if key.endswith("gate_up_proj"):
                # [E, 2I, H]
                result[key] = torch.stack([torch.cat([loaded[g], loaded[u]]) for g, u, _ in per_expert])
            else:
                # [E, H, I]
                result[key] = torch.stack([loaded[d] for _, _, d in per_expert])
        elif key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
            result[key] = loaded["model.embed_tokens.weight"]
        else:
            result[key] = loaded[_disk_name(key, naming)]
    return result


def _quantize_fp8_blockwise(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float32 -> (q [out, in] float8_e4m3fn, scale_inv [ceil(out/b0), ceil(in/b1)] float32).

    One scale per block, edge blocks ragged; ``w ~= q * scale_inv`` block by block.
    """
    b0, b1 = block
    rows, cols = w.shape
    nb0, nb1 = -(-rows // b0), -(-cols // b1)
    # Zero-pad to whole blocks; padding never raises a block's amax.
    padded = torch.zeros(nb0 * b0, nb1 * b1, dtype=torch.float32)
    padded[:rows, :cols] = w
    blocks = padded.view(nb0, b0, nb1, b1)
    amax = blocks.abs().amax(dim=(1, 3))  # [nb0, nb1]
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = blocks / scale_inv[:, None, :, None]
    q = scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(nb0 * b0, nb1 * b1)
    return q[:rows, :cols].contiguous(), scale_inv.contiguous()


def dequantize_fp8_reference(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Plain block-by-block FP8 dequantization, the test oracle: [out, in] float32 = q * scale_inv.

    Deliberately a simple loop, independent of the project's fast dequantizer.
    """
    b0, b1 = block
    rows, cols = q.shape
    expected_scale_shape = (-(-rows // b0), -(-cols // b1))
    if tuple(scale_inv.shape) != expected_scale_shape:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} != {expected_scale_shape} for {q.shape}")
    out = torch.empty(rows, cols, dtype=torch.float32)
    for i in range(expected_scale_shape[0]):
        for j in range(expected_scale_shape[1]):
            r0, c0 = i * b0, j * b1
            r1, c1 = min(r0 + b0, rows), min(c0 + b1, cols)
            out[r0:r1, c0:c1] = q[r0:r1, c0:c1].to(torch.float32) * scale_inv[i, j].item()
    return out


def _shard_of_groups(sizes: list[int], shards: int) -> list[int]:
    """Contiguous split of groups into ``shards`` non-empty files of about equal bytes."""
    if len(sizes) < shards:
        raise ValueError(f"cannot split {len(sizes)} tensors into {shards} shards")
    total = sum(sizes)
    result: list[int] = []
    start = 0
    for i, size in enumerate(sizes):
        wanted = min(shards - 1, start * shards // max(total, 1))
        needed = shards - (len(sizes) - i)  # leave at least one group for every later shard
        previous = result[-1] if result else 0
        result.append(min(max(previous, wanted, needed), previous + 1))
        start += size
    return result


def remove_weights(out: Path) -> None:
    """Delete the ``model*.safetensors`` files and the index in ``out``, left by an earlier write."""
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
        if stale.exists():
            stale.unlink()


def shard_file_name(k: int, shards: int) -> str:
    """The release name of shard ``k`` (from 0) of ``shards``: ``model-00001-of-00003.safetensors``."""
    return f"model-{k + 1:05d}-of-{shards:05d}.safetensors"


def write_index(out: Path, weight_map: dict[str, str], total_size: int) -> None:
    """Write ``model.safetensors.index.json``: each tensor's file, and the tensors' total bytes."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _write_weights(out: Path, groups: list[dict[str, torch.Tensor]], shards: int) -> None:
    remove_weights(out)
    metadata = {"format": "pt"}
    if shards == 1:
        tensors = {name: t for group in groups for name, t in group.items()}
        save_file(tensors, str(out / SINGLE_FILE), metadata=metadata)
        return
    sizes = [sum(t.numel() * t.element_size() for t in g.values()) for g in groups]
    placement = _shard_of_groups(sizes, shards)
    files = [shard_file_name(k, shards) for k in range(shards)]
    weight_map: dict[str, str] = {}
    for k, file in enumerate(files):
        tensors = {name: t for g, shard in zip(groups, placement, strict=True) if shard == k for name, t in g.items()}
        save_file(tensors, str(out / file), metadata=metadata)
        weight_map.update(dict.fromkeys(tensors, file))
    write_index(out, weight_map, sum(sizes))


def write_config(
    config: transformers.PreTrainedConfig,
    out: Path,
    *,
    dtype: torch.dtype,
    fp8_block: tuple[int, int] | None,
    model_type: str | None = None,
) -> None:
    """Write ``config.json`` as ``save_pretrained`` would, declaring ``dtype`` as the checkpoint's and,
    when ``fp8_block`` is given, the DeepSeek-V3 release's FP8 ``quantization_config`` with that block;
    ``model_type``, when given, in place of transformers' own."""
    data = config.to_diff_dict()  # what save_pretrained writes: every model key, no generic noise
    if model_type is not None:
        data["model_type"] = model_type
    data["dtype"] = _DTYPE_NAMES[dtype]  # the model object is float32; the files are not
    data.pop("quantization_config", None)
    if _architecture(config) in _MXFP4_RELEASES:
        data["quantization_config"] = copy.deepcopy(_MXFP4_QUANTIZATION)
    if fp8_block is not None:
        data["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": list(fp8_block),
        }
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------
# Tokenizer

# Training text: prose, code and numbers, enough distinct pairs for several hundred merges.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few of its
experts; the router scores each expert, keeps the best ones and weighs their outputs. Most weights of
such a model are experts, so a server can keep them in the large memory of the CPU and run attention,
the router and the shared experts on the GPU, where the memory is fast but small.

Once upon a time, in a small village by the sea, there lived an old fisherman and his wife. Every
morning he went out in his little boat, and every evening he came back with fish for the market.
"What did you catch today?" she asked. "Nothing but a golden fish," he said, "and I let it go."

Decoding is bound by memory bandwidth: each new token reads the selected experts' bytes once. With
eight experts of 2048 by 7168 weights in each of 58 layers, that is about 20.4 billion parameters per
token, or 11.5 GB at four and a half bits per weight. At 102 GB/s that gives at most 8.9 tokens per second.

def softmax(x: list[float]) -> list[float]:
    m = max(x)
    e = [math.exp(v - m) for v in x]
    s = sum(e)
    return [v / s for v in e]

class Router:
    def __init__(self, num_experts: int, top_k: int) -> None:
        self.num_experts = num_experts
        self.top_k = top_k

    def route(self, scores: list[float]) -> list[int]:
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return order[: self.top_k]

for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }
if __name__ == "__main__":
    result = softmax([1.0, 2.0, 3.0])

Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 128 256 512 1024 2048 4096 8192 16384.
3.14159 2.71828 1.41421 0.5772 1e-6 -42 +7 100% $19.99 2024-05-17 12:34:56 v5.23.0 #1 @home
Questions and answers: What is the capital of France? Paris. How many legs does a spider have? Eight.
Why is the sky blue? Because air scatters blue light more than red light. Who wrote Hamlet? Shakespeare.
Unicode: café, naïve, déjà vu, Zürich, 東京, 北京, Ελληνικά, русский, emoji 🙂 and symbols → ≤ ≥ ±.
"""


def build_tokenizer(
    out_dir: str | Path, vocab_size: int, arch: str = "DeepseekV3ForCausalLM"
) -> transformers.PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE tokenizer offline and save it to ``out_dir``.

    ``len(tokenizer) <= vocab_size``; ids 0, 1, 2 are bos, eos and pad, 3 and 4 DeepSeek's turn markers;
    plain encoding prepends bos; the chat template and the tokens added after those are ``arch``'s
    (``CHAT_FORMATS``: DeepSeek-V3's turns and tool markers, Qwen3's ChatML and ``<tool_call>``, Mixtral's
    ``[INST]`` and ``[TOOL_CALLS]``; DeepSeek-V2's template has no tools).
    """
    if arch not in CHAT_FORMATS:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED)}")
    chat = CHAT_FORMATS[arch]
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS) + len(chat.special) + len(chat.plain)
    if vocab_size < minimum:
        raise ValueError(f"a byte-level tokenizer needs vocab_size >= {minimum}, got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(chat.special) - len(chat.plain),
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in chat.special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in chat.plain])
    # DeepSeek's tokenizers prepend bos through the post-processor.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, SPECIAL_TOKENS.index(BOS_TOKEN))],
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=chat.eos_token,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[USER_TOKEN, ASSISTANT_TOKEN, *chat.special],
        chat_template=chat.template,
        clean_up_tokenization_spaces=False,
    )
    if len(tokenizer) > vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size={vocab_size}")
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
