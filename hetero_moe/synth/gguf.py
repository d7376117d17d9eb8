"""Tiny GGUF files written with the `gguf` package the way llama.cpp lays them out: its tensor names and
metadata keys, MLA's `kv_b_proj` split into `attn_k_b` / `attn_v_b`, stacked experts, Mixtral's permuted
queries and keys, a byte-level (`gpt2`) vocabulary, any of the tensor types we read, split sets. For tests
and for comparing with llama.cpp itself (`benchmarks/gguf_llamacpp.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from hetero_moe.synth import tiny as synth

HF_TO_GGUF = {  # model.layers.N.<key> -> blk.N.<name>, as llama.cpp's converter names them
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
GGUF_ARCH = {
    "DeepseekV3ForCausalLM": "deepseek2",
    "DeepseekV2ForCausalLM": "deepseek2",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "MixtralForCausalLM": "llama",
}
# block types' fp16 fields (byte offsets in a block), set to small scales in random blocks
EXPERT_PROJS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
SCALE_FIELDS = {
    QT.Q4_0: (0,),
    QT.Q8_0: (0,),
    QT.Q5_0: (0,),
    QT.IQ4_NL: (0,),
    QT.Q4_1: (0, 2),
    QT.Q5_1: (0, 2),
    QT.Q4_K: (0, 2),
    QT.Q5_K: (0, 2),
    QT.Q6_K: (-2,),
    QT.IQ4_XS: (0,),
}


def fp16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16)


def exact_blocks(w: np.ndarray, qtype: QT) -> np.ndarray:
    """Q4_0 / Q8_0 blocks of `w [..., I]` whose codes use the symmetric range (+-7, +-127) with the block's
    largest value on it, so our own INT4 / INT8 quantizers (group 32, fp16 scales) find the same codes."""
    top = 7 if qtype == QT.Q4_0 else 127
    b = w.reshape(-1, 32).astype(np.float32)
    d = fp16(np.abs(b).max(axis=1) / top)
    df = d.astype(np.float32)[:, None]
    q = np.clip(np.rint(np.divide(b, df, out=np.zeros_like(b), where=df > 0)), -top, top).astype(np.int8)
    if qtype == QT.Q8_0:
        body = q.view(np.uint8)
    else:
        u = (q + 8).astype(np.uint8)
        body = u[:, :16] | (u[:, 16:] << 4)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), body], axis=1).reshape(*w.shape[:-1], -1)


def random_blocks(shape: tuple[int, ...], qtype: QT, rng: np.random.Generator) -> np.ndarray:
    """Valid blocks of `qtype` holding random codes, with scales that keep the values small."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (int(np.prod(shape[:-1])), shape[-1] // block, size), dtype=np.uint8)
    for at in SCALE_FIELDS.get(qtype, ()):
        scale = fp16(rng.uniform(2e-5, 1e-4, raw.shape[:2])).view(np.uint8).reshape(*raw.shape[:2], 2)
        raw[:, :, at : at + 2 if at != -2 else None] = scale
    return raw.reshape(*shape[:-1], -1)


def encode(w: np.ndarray, qtype: QT, rng: np.random.Generator) -> np.ndarray:
    if qtype in (QT.F32, QT.F16):
        return w.astype(np.float32 if qtype == QT.F32 else np.float16)
    if qtype in (QT.BF16, QT.Q4_0, QT.Q8_0):
        return gguf.quants.quantize(w.astype(np.float32), qtype)
    return random_blocks(w.shape, qtype, rng)


def fits(qtype: QT, in_dim: int) -> bool:
    return in_dim % gguf.GGML_QUANT_SIZES[qtype][0] == 0


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's query/key row order for its rotary (LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_layout(state: dict[str, torch.Tensor], config) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names and layouts, float32."""
    arch = config.architectures[0]
    out: dict[str, np.ndarray] = {}
    for key, t in state.items():
        w = t.detach().float().numpy()
        if key in GLOBAL:
            out[GLOBAL[key]] = w
        elif key == "lm_head.weight":
            out["output.weight"] = w
        elif key.startswith("model.layers."):
            _, _, n, rest = key.split(".", 3)
            p = f"blk.{n}."
            if rest == "self_attn.kv_b_proj.weight":
                heads, nope = config.num_attention_heads, config.qk_nope_head_dim
                kv = w.reshape(heads, nope + config.v_head_dim, -1)
                out[p + "attn_k_b.weight"] = np.ascontiguousarray(kv[:, :nope].transpose(0, 2, 1))
                out[p + "attn_v_b.weight"] = np.ascontiguousarray(kv[:, nope:])
            elif rest == "mlp.experts.gate_up_proj":
                inter = w.shape[1] // 2
                out[p + "ffn_gate_exps.weight"], out[p + "ffn_up_exps.weight"] = w[:, :inter], w[:, inter:]
            elif rest == "mlp.experts.down_proj":
                out[p + "ffn_down_exps.weight"] = w
            elif arch == "MixtralForCausalLM" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                heads = config.num_attention_heads if "q_proj" in rest else config.num_key_value_heads
                out[p + HF_TO_GGUF[rest]] = permute(w, heads)
            else:
                out[p + HF_TO_GGUF[rest]] = w
    return out


def from_gguf_layout(tensors: dict[str, np.ndarray], config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `to_gguf_layout`, written the other way round on purpose (the loader has its own)."""
    arch = config.architectures[0]
    out = {}
    for key in state:
        if key in GLOBAL:
            v = tensors[GLOBAL[key]]
        elif key == "lm_head.weight":
            v = tensors["output.weight"]
        else:
            _, _, n, rest = key.split(".", 3)
            p = f"blk.{n}."
            if rest == "self_attn.kv_b_proj.weight":
                k_b, v_b = tensors[p + "attn_k_b.weight"], tensors[p + "attn_v_b.weight"]
                v = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, k_b.shape[1])
            elif rest == "mlp.experts.gate_up_proj":
                v = np.concatenate([tensors[p + "ffn_gate_exps.weight"], tensors[p + "ffn_up_exps.weight"]], axis=1)
            elif rest == "mlp.experts.down_proj":
                v = tensors[p + "ffn_down_exps.weight"]
            else:
                v = tensors[p + HF_TO_GGUF[rest]]
                if arch == "MixtralForCausalLM" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                    heads = config.num_attention_heads if "q_proj" in rest else config.num_key_value_heads
                    g = v.reshape(heads, v.shape[0] // heads // 2, 2, *v.shape[1:])
                    v = g.swapaxes(1, 2).reshape(v.shape)
        out[key] = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).reshape(state[key].shape)
    return out


def add_metadata(w: gguf.GGUFWriter, config) -> None:
    arch = config.architectures[0]
    c = config
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_vocab_size(c.vocab_size)
    if arch.startswith("Deepseek"):
        w.add_head_count_kv(1)
        w.add_expert_count(c.n_routed_experts)
        w.add_leading_dense_block_count(c.first_k_dense_replace)
        w.add_kv_lora_rank(c.kv_lora_rank)
        if c.q_lora_rank:
            w.add_q_lora_rank(c.q_lora_rank)
        w.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
        w.add_value_length(c.kv_lora_rank)
        w.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
        w.add_value_length_mla(c.v_head_dim)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
        w.add_expert_shared_count(c.n_shared_experts)
        w.add_expert_weights_scale(c.routed_scaling_factor)
        if c.norm_topk_prob:
            w.add_expert_weights_norm(True)
        v3 = arch == "DeepseekV3ForCausalLM"
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if v3 else gguf.ExpertGatingFuncType.SOFTMAX)
        w.add_expert_group_count(c.n_group)
        w.add_expert_group_used_count(c.topk_group)
        w.add_rope_dimension_count(c.qk_rope_head_dim)
        rope = c.rope_parameters
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    elif arch == "Qwen3MoeForCausalLM":
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_expert_count(c.num_experts)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    else:
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_expert_count(c.num_local_experts)
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)


def add_tokenizer(w: gguf.GGUFWriter, tok, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's `gpt2` (byte-level BPE) vocabulary, padded to the model's vocabulary."""
    by_id = {i: t for t, i in tok.get_vocab().items()}
    special = set(tok.all_special_ids)
    added = {i for i, t in tok.added_tokens_decoder.items() if not t.special}
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        kind = gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL
        types.append(gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.CONTROL if i in special else kind)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(True)
    w.add_chat_template(tok.chat_template)


def write_gguf(
    path: Path, model, dense: list[QT], experts: QT | tuple[QT, QT, QT], split: int = 0, seed: int = 0
) -> dict[str, np.ndarray]:
    """`model` as a GGUF: dense matrices in the `dense` types, taken in turn (F16 where a row does not fit
    the blocks), experts in `experts` (one type, or gate, up and down types), norms, routers and biases F32.
    Returns every tensor dequantized by `gguf.quants`, in llama.cpp's layout."""
    rng = np.random.default_rng(seed)
    config = model.config
    w = gguf.GGUFWriter(path, GGUF_ARCH[config.architectures[0]], split_max_tensors=split)
    add_metadata(w, config)
    tok = synth.build_tokenizer(path.parent / f"{path.stem}-tokenizer", config.vocab_size, config.architectures[0])
    add_tokenizer(w, tok, config.vocab_size)
    turn = 0
    values = {}
    for name, v in to_gguf_layout(model.state_dict(), config).items():
        if "_exps" in name:
            qtype = experts if isinstance(experts, QT) else experts[EXPERT_PROJS.index(name.split(".")[2])]
            raw = exact_blocks(v, qtype) if qtype in (QT.Q4_0, QT.Q8_0) else encode(v, qtype, rng)
        elif v.ndim == 1 or "ffn_gate_inp" in name:
            qtype, raw = QT.F32, v.astype(np.float32)
        else:
            qtype = dense[turn % len(dense)]
            turn += 1
            qtype = qtype if fits(qtype, v.shape[-1]) else QT.F16
            raw = encode(v, qtype, rng)
        block = qtype in (QT.F32, QT.F16)
        w.add_tensor(name, raw, raw_dtype=None if block else qtype)
        values[name] = gguf.quants.dequantize(raw, qtype).reshape(v.shape).astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


GGUF_SIZES = {  # rows that fit 32-value blocks, hidden 256 for the K-quants; odd where the blocks allow
    "DeepseekV3ForCausalLM": {
        "hidden_size": 256,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "q_lora_rank": 64,
        "v_head_dim": 32,
    },
    "DeepseekV2ForCausalLM": {
        "hidden_size": 256,
        "intermediate_size": 256,
        "moe_intermediate_size": 96,
        "v_head_dim": 32,
    },
    "Qwen3MoeForCausalLM": {"hidden_size": 256, "intermediate_size": 256, "moe_intermediate_size": 96},
    "MixtralForCausalLM": {"hidden_size": 256, "intermediate_size": 96},
}


_CPU_RULES = """\
- match: {{name: '^model\\.layers\\.\\d+\\.mlp\\.experts$'}}
  replace: {experts}
  recursive: false
- match: {{name: '^model\\.layers\\.\\d+\\.self_attn$'}}
  replace: {{op: attention}}
- match: {{class: 'DeepseekV3MoE|DeepseekV2Moe|Qwen3MoeSparseMoeBlock|MixtralSparseMoeBlock'}}
  replace: {{op: moe}}
- match: {{name: '^model\\.layers\\.\\d+\\.mlp\\.gate$'}}
  replace: {{op: router}}
- match: {{name: '^model\\.layers\\.\\d+\\.mlp(\\.shared_experts)?$'}}
  replace: {{op: mlp}}
- match: {{name: '^$'}}
  replace: {{device: cpu}}
"""


def cpu_rules(experts: str) -> str:
    """Rules that run a GGUF model of these tests on the CPU in float: everything exact but the routed
    experts, which take `experts` (a rule's `replace` mapping, YAML flow style)."""
    return _CPU_RULES.format(experts=experts)
