"""Synthetic checkpoints: tiny configs, random models, the on-disk layout, FP8, tokenizer."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from hetero_moe.synth.tiny import (
    SUPPORTED,
    WrittenCheckpoint,
    build_tokenizer,
    dequantize_fp8_reference,
    random_model,
    tiny_config,
    write_checkpoint,
)

# Per architecture: MoE layer indices, routed experts per layer, on-disk MoE block and expert names.
LAYOUT = {
    "DeepseekV3ForCausalLM": ([1, 2], 8, "mlp", ("gate_proj", "up_proj", "down_proj")),
    "DeepseekV2ForCausalLM": ([1, 2], 10, "mlp", ("gate_proj", "up_proj", "down_proj")),
    "Qwen3MoeForCausalLM": ([1, 2], 8, "mlp", ("gate_proj", "up_proj", "down_proj")),
    "MixtralForCausalLM": ([0, 1, 2], 6, "block_sparse_moe", ("w1", "w3", "w2")),
    "DeepseekV32ForCausalLM": ([1, 2], 8, "mlp", ("gate_proj", "up_proj", "down_proj")),
    "Glm4MoeForCausalLM": ([1, 2], 8, "mlp", ("gate_proj", "up_proj", "down_proj")),
    "MiniMaxM2ForCausalLM": ([0, 1, 2], 8, "block_sparse_moe", ("w1", "w3", "w2")),
    "Qwen3_5MoeForCausalLM": ([0, 1, 2], 8, "mlp", ("gate_proj", "up_proj", "down_proj")),
    "Qwen3NextForCausalLM": ([1, 2], 8, "mlp", ("gate_proj", "up_proj", "down_proj")),
}


@pytest.fixture(scope="module")
def models() -> dict[str, transformers.PreTrainedModel]:
    return {arch: random_model(tiny_config(arch)) for arch in SUPPORTED}


def read_files(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[key] = f.get_tensor(key)
    return tensors


def greedy(model: transformers.PreTrainedModel, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=2)
    return out[0, len(prompt) :].tolist()


# --- configs and models ------------------------------------------------------------------------------


def test_unknown_architecture_is_rejected() -> None:
    with pytest.raises(ValueError, match="supported"):
        tiny_config("LlamaForCausalLM")


@pytest.mark.parametrize("arch", SUPPORTED)
def test_tiny_config_common(arch: str) -> None:
    config = tiny_config(arch)
    assert config.architectures == [arch]
    assert 300 <= config.vocab_size <= 600
    assert config.num_hidden_layers == 3
    assert config.max_position_embeddings >= 512
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 1, 2)
    assert config.tie_word_embeddings is False
    assert config.dtype == torch.bfloat16
    assert config.hidden_size % 128 != 0
    assert tiny_config(arch, num_hidden_layers=2, vocab_size=333).num_hidden_layers == 2


def test_tiny_config_deepseek_v3_matches_release_features() -> None:
    c = tiny_config("DeepseekV3ForCausalLM")
    assert (c.first_k_dense_replace, c.n_routed_experts, c.num_experts_per_tok) == (1, 8, 3)
    assert (c.n_group, c.topk_group, c.n_shared_experts) == (4, 2, 1)
    assert c.q_lora_rank is not None
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (16, 8, 12)
    assert c.routed_scaling_factor == 2.5 and c.norm_topk_prob is True
    rope = c.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 40
    assert (rope["mscale"], rope["mscale_all_dim"], rope["beta_fast"], rope["beta_slow"]) == (1.0, 1.0, 32, 1)
    assert c.max_position_embeddings == rope["factor"] * rope["original_max_position_embeddings"]


def test_tiny_config_other_architectures() -> None:
    v2 = tiny_config("DeepseekV2ForCausalLM")
    assert v2.q_lora_rank is None and v2.topk_method == "greedy" and v2.n_group == 1
    assert (v2.n_shared_experts, v2.first_k_dense_replace) == (2, 1)
    assert v2.rope_parameters["rope_type"] == "yarn" and v2.rope_parameters["mscale"] == 0.707
    qwen = tiny_config("Qwen3MoeForCausalLM")
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.norm_topk_prob) == (8, 2, True)
    assert qwen.num_key_value_heads < qwen.num_attention_heads
    assert qwen.head_dim * qwen.num_attention_heads != qwen.hidden_size
    assert qwen.mlp_only_layers == [0] and qwen.decoder_sparse_step == 1
    mixtral = tiny_config("MixtralForCausalLM")
    assert (mixtral.num_local_experts, mixtral.num_experts_per_tok) == (6, 2)
    assert mixtral.num_key_value_heads < mixtral.num_attention_heads


@pytest.mark.parametrize("arch", SUPPORTED)
def test_random_model_forward(arch: str, models: dict[str, transformers.PreTrainedModel]) -> None:
    model = models[arch]
    assert not model.training
    assert model.config._attn_implementation == ("eager" if arch == "GptOssForCausalLM" else "sdpa")  # sinks
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        logits = model(torch.tensor([[0, 17, 42, 5, 99]])).logits
    assert logits.shape == (1, 5, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # Not degenerate: greedy decoding visits many tokens and the top-2 logits are not tied.
    tokens = greedy(model, [0, 17, 42, 5, 99], 16)
    assert len(set(tokens)) >= 6, tokens
    top2 = logits[0, -1].topk(2).values
    assert top2[0] - top2[1] > 1e-3


def test_random_model_init(models: dict[str, transformers.PreTrainedModel]) -> None:
    model = models["DeepseekV3ForCausalLM"]
    norm = model.model.layers[1].input_layernorm.weight
    assert 0.05 < (norm - 1).std() < 0.2
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and 0.03 < bias.std() < 0.3
    q_a = model.model.layers[0].self_attn.q_a_proj.weight
    assert 0.05 < q_a.std() < 0.25


def test_random_model_is_deterministic_and_pure() -> None:
    config = tiny_config("MixtralForCausalLM")
    rng = torch.get_rng_state()
    a, b, c = random_model(config, seed=3), random_model(config, seed=3), random_model(config, seed=4)
    assert torch.equal(torch.get_rng_state(), rng)
    assert config.dtype == torch.bfloat16  # not overwritten by the float32 model
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


# --- on-disk layout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [a for a in SUPPORTED if a != "GptOssForCausalLM"])  # MXFP4: test_gpt_oss.py
def test_layout_per_expert_keys(arch: str, models: dict[str, transformers.PreTrainedModel], tmp_path: Path) -> None:
    model = models[arch]
    written = write_checkpoint(model, tmp_path, tokenizer=False)
    assert written.path == tmp_path
    assert (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "model.safetensors.index.json").exists()
    files = read_files(tmp_path)
    moe_layers, n_experts, block, (gate, up, down) = LAYOUT[arch]
    inter = model.model.layers[moe_layers[0]].mlp.experts.down_proj.shape[-1]
    hidden = model.config.hidden_size
    for layer in moe_layers:
        prefix = f"model.layers.{layer}.{block}"
        assert files[f"{prefix}.gate.weight"].shape == (n_experts, hidden)
        for e in range(n_experts):
            assert files[f"{prefix}.experts.{e}.{gate}.weight"].shape == (inter, hidden)
            assert files[f"{prefix}.experts.{e}.{up}.weight"].shape == (inter, hidden)
            assert files[f"{prefix}.experts.{e}.{down}.weight"].shape == (hidden, inter)
        assert f"{prefix}.experts.{n_experts}.{gate}.weight" not in files
    assert not [k for k in files if k.endswith(("gate_up_proj", "experts.down_proj"))]
    assert not [k for k in files if "inv_freq" in k]
    if arch == "MixtralForCausalLM":
        assert not [k for k in files if ".mlp." in k]
    assert "lm_head.weight" in files and "model.embed_tokens.weight" in files
    for key, tensor in files.items():
        expected = torch.float32 if key.endswith("e_score_correction_bias") else torch.bfloat16
        assert tensor.dtype == expected, key
    if arch == "DeepseekV3ForCausalLM":
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [arch]
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    assert transformers.AutoConfig.from_pretrained(tmp_path).architectures == [arch]


def test_mixtral_transformers_names(models: dict[str, transformers.PreTrainedModel], tmp_path: Path) -> None:
    written = write_checkpoint(models["MixtralForCausalLM"], tmp_path, legacy_mixtral_names=False, tokenizer=False)
    files = read_files(tmp_path)
    assert "model.layers.0.mlp.gate.weight" in files
    assert "model.layers.0.mlp.experts.5.gate_proj.weight" in files
    assert not [k for k in files if "block_sparse_moe" in k]
    fresh = random_model(tiny_config("MixtralForCausalLM"), seed=1)
    fresh.load_state_dict(written.state_dict, strict=True)


def test_sharded_index(models: dict[str, transformers.PreTrainedModel], tmp_path: Path) -> None:
    written = write_checkpoint(models["DeepseekV3ForCausalLM"], tmp_path, shards=3, fp8=True, tokenizer=False)
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    weight_map: dict[str, str] = index["weight_map"]
    names = [f"model-{k:05d}-of-00003.safetensors" for k in (1, 2, 3)]
    assert sorted(set(weight_map.values())) == names
    total = 0
    for name in names:
        with safe_open(str(tmp_path / name), framework="pt") as f:
            keys = list(f.keys())
            assert keys, name
            assert all(weight_map[k] == name for k in keys)
            total += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
    assert set(weight_map) == set(read_files(tmp_path))
    assert index["metadata"]["total_size"] == total
    # Experts of one layer are spread over files; a weight and its scale never are.
    spans = {}
    for key, file in weight_map.items():
        match = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.\d+\.", key)
        if match:
            spans.setdefault(match[1], set()).add(file)
        if key.endswith("_scale_inv"):
            assert weight_map[key.removesuffix("_scale_inv")] == file
    assert max(len(files) for files in spans.values()) >= 2
    fresh = random_model(tiny_config("DeepseekV3ForCausalLM"), seed=1)
    fresh.load_state_dict(written.state_dict, strict=True)


@pytest.mark.parametrize("arch", SUPPORTED)
def test_transformers_reads_our_layout(
    arch: str, models: dict[str, transformers.PreTrainedModel], tmp_path: Path
) -> None:
    """transformers' own loader (per-expert fusion, Mixtral renames) gives exactly the returned values."""
    written = write_checkpoint(models[arch], tmp_path, shards=2, tokenizer=False)
    # gpt-oss's MXFP4 experts dequantized, as a CPU without Triton's kernels loads them (with Hugging Face's
    # `kernels` installed, transformers would otherwise fetch its MXFP4 kernels from the Hub)
    mxfp4 = {"quantization_config": transformers.Mxfp4Config(dequantize=True)} if arch == "GptOssForCausalLM" else {}
    reference = getattr(transformers, arch).from_pretrained(tmp_path, dtype=torch.float32, **mxfp4)
    loaded = reference.state_dict()
    assert set(loaded) == set(written.state_dict)
    for key, value in written.state_dict.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("arch", SUPPORTED)
def test_state_dict_is_rounded_and_loads_strict(
    arch: str, models: dict[str, transformers.PreTrainedModel], tmp_path: Path
) -> None:
    model = models[arch]
    written = write_checkpoint(model, tmp_path, fp8=arch.startswith("Deepseek"), block_size=(32, 32), tokenizer=False)
    fresh = random_model(tiny_config(arch), seed=1)
    fresh.load_state_dict(written.state_dict, strict=True)
    original = model.state_dict()
    assert set(written.state_dict) == set(original)
    for key, value in written.state_dict.items():
        assert value.dtype == torch.float32 and value.shape == original[key].shape, key
        if arch == "GptOssForCausalLM" and key.endswith(("experts.gate_up_proj", "experts.down_proj")):  # MXFP4
            assert (value - original[key]).abs().max() <= original[key].abs().max() / 3, key
            continue
        torch.testing.assert_close(value, original[key], rtol=2**-4, atol=1e-2)
    # Unquantized tensors are exactly the bf16-rounded originals; buffers are exact.
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(written.state_dict[key], original[key].to(torch.bfloat16).float()), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes(dtype: torch.dtype, models: dict[str, transformers.PreTrainedModel], tmp_path: Path) -> None:
    model = models["Qwen3MoeForCausalLM"]
    written = write_checkpoint(model, tmp_path, dtype=dtype, tokenizer=False)
    assert {t.dtype for t in read_files(tmp_path).values()} == {dtype}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    for key, value in model.state_dict().items():
        assert torch.equal(written.state_dict[key], value.to(dtype).float()), key


# --- FP8 --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [(128, 128), (32, 32), (16, 24)])
def test_fp8_layout(block: tuple[int, int], models: dict[str, transformers.PreTrainedModel], tmp_path: Path) -> None:
    write_checkpoint(models["DeepseekV3ForCausalLM"], tmp_path, fp8=True, block_size=block, tokenizer=False)
    files = read_files(tmp_path)
    quantized = [k for k, t in files.items() if t.dtype == torch.float8_e4m3fn]
    for key in quantized:
        scale = files[f"{key}_scale_inv"]
        rows, cols = files[key].shape
        assert scale.dtype == torch.float32
        assert tuple(scale.shape) == (math.ceil(rows / block[0]), math.ceil(cols / block[1])), key
    expected = {
        # 2-D Linear weights inside the decoder layers
        "model.layers.0.self_attn.q_a_proj.weight",
        "model.layers.0.self_attn.q_b_proj.weight",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.0.self_attn.kv_b_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight",
        "model.layers.2.mlp.experts.7.gate_proj.weight",
        "model.layers.2.mlp.experts.7.down_proj.weight",
    }
    assert expected <= set(quantized)
    for key in quantized:
        assert key.startswith("model.layers.") and ".gate.weight" not in key
    for key in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.1.mlp.gate.weight",
        "model.norm.weight",
    ):
        assert files[key].dtype == torch.bfloat16 and f"{key}_scale_inv" not in files
    assert files["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    # A ragged shape: shared expert gate_proj is [40, 72].
    assert files["model.layers.1.mlp.shared_experts.gate_proj.weight"].shape == (40, 72)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }


def test_fp8_round_trip_within_e4m3_precision(models: dict[str, transformers.PreTrainedModel], tmp_path: Path) -> None:
    block = (16, 24)
    model = models["DeepseekV3ForCausalLM"]
    written = write_checkpoint(model, tmp_path, fp8=True, block_size=block, tokenizer=False)
    files = read_files(tmp_path)
    original = model.state_dict()
    key = "model.layers.1.mlp.shared_experts.gate_proj.weight"  # [40, 72]: ragged in both dims
    w, deq = original[key], written.state_dict[key]
    scale = files[f"{key}_scale_inv"]
    per_element_scale = scale.repeat_interleave(block[0], 0)[:40].repeat_interleave(block[1], 1)[:, :72]
    # e4m3: 3 mantissa bits, so rounding is within 2^-4 relative; below the smallest normal (2^-6 in
    # scaled units) the spacing is 2^-9, so within 2^-10 absolute.
    bound = torch.maximum(w.abs() * 2**-4, per_element_scale * 2**-10) * (1 + 1e-6)
    assert ((deq - w).abs() <= bound).all()
    # Each block's largest magnitude maps to 448 exactly.
    assert torch.allclose(scale[0, 0] * 448, w[:16, :24].abs().max())
    for name, value in written.state_dict.items():  # all weights, fused experts included
        torch.testing.assert_close(value, original[name], rtol=2**-4, atol=0.05)


def test_dequantize_reference_on_known_values() -> None:
    q = torch.tensor([[1.0, -2.0, 0.5], [448.0, 0.0, -0.125]]).to(torch.float8_e4m3fn)  # exact in e4m3
    scale = torch.tensor([[2.0, 10.0]])  # block (2, 2): columns 0-1 and the ragged column 2
    expected = torch.tensor([[2.0, -4.0, 5.0], [896.0, 0.0, -1.25]])
    assert torch.equal(dequantize_fp8_reference(q, scale, (2, 2)), expected)
    with pytest.raises(ValueError, match="scale_inv shape"):
        dequantize_fp8_reference(q, scale, (1, 2))


def test_fp8_agrees_with_transformers_on_whole_blocks(
    models: dict[str, transformers.PreTrainedModel], tmp_path: Path
) -> None:
    """Every tiny shape is a multiple of 8, where transformers' CPU FP8 dequantizer is right."""
    written = write_checkpoint(models["DeepseekV3ForCausalLM"], tmp_path, fp8=True, block_size=(8, 8), tokenizer=False)
    loaded = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    for key, value in written.state_dict.items():
        # transformers dequantizes into bf16
        torch.testing.assert_close(loaded[key].float(), value, rtol=2**-8, atol=1e-6, msg=key)


# --- determinism ------------------------------------------------------------------------------------------


def test_written_bytes_are_deterministic(tmp_path: Path) -> None:
    config = tiny_config("DeepseekV3ForCausalLM")
    outputs = []
    for run in ("a", "b"):
        written = write_checkpoint(
            random_model(config, seed=7), tmp_path / run, shards=3, fp8=True, block_size=(32, 32)
        )
        assert isinstance(written, WrittenCheckpoint)
        outputs.append({p.name: p.read_bytes() for p in sorted(written.path.iterdir())})
    assert outputs[0].keys() == outputs[1].keys()
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= outputs[0].keys()
    for name in outputs[0]:
        assert outputs[0][name] == outputs[1][name], name


def test_rewrite_removes_stale_shards(models: dict[str, transformers.PreTrainedModel], tmp_path: Path) -> None:
    model = models["MixtralForCausalLM"]
    write_checkpoint(model, tmp_path, shards=3, tokenizer=False)
    write_checkpoint(model, tmp_path, tokenizer=False)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


# --- tokenizer ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> transformers.PreTrainedTokenizerBase:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path, vocab_size=419)
    return transformers.AutoTokenizer.from_pretrained(path)


def test_tokenizer_special_tokens(tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    assert len(tokenizer) <= 419
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids(["<｜User｜>", "<｜Assistant｜>"]) == [3, 4]
    assert len(tokenizer.get_vocab()) == len(tokenizer)
    assert max(tokenizer.get_vocab().values()) < 419


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! The router picks 8 of 256 experts.",
        "def f(x):\n    return x * 2  # tabs\tand  spaces ",
        "café 東京 🙂 → ±",
        "",
    ],
)
def test_tokenizer_round_trip(text: str, tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert all(0 <= i < 419 for i in ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_merges_common_words(tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    text = "the experts of the router"
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) < len(text) // 2


def test_chat_template(tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello<｜end▁of▁sentence｜>"
        "<｜User｜>2+2?<｜Assistant｜>"
    )
    plain = tokenizer.apply_chat_template(messages[1:2], tokenize=False)
    assert plain == "<｜begin▁of▁sentence｜><｜User｜>Hi"
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert isinstance(encoded, transformers.BatchEncoding)
    ids = encoded["input_ids"]
    assert ids[0] == 0 and ids.count(0) == 1  # one bos, from the template
    assert ids[-1] == 4  # <｜Assistant｜>
    assert encoded["attention_mask"] == [1] * len(ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Be brief.HiHello2+2?"


def test_tokenizer_rejects_tiny_vocab(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(tmp_path, vocab_size=200)


def test_tokenizer_is_deterministic(tmp_path: Path) -> None:
    build_tokenizer(tmp_path / "a", vocab_size=389)
    build_tokenizer(tmp_path / "b", vocab_size=389)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
