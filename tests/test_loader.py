"""Loading checkpoints: exact values (FP8 block dequantization included) and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hetero_moe.kernels.quant import dequantize_fp8_blocks
from safetensors.torch import load_file, save_file

from hetero_moe.arch import ModelError
from hetero_moe.llm import place
from hetero_moe.loader.checkpoint import Checkpoint, CheckpointError
from hetero_moe.loader.load import load_weights


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def rewrite(src: Path, dst: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """A copy of checkpoint `src` holding `tensors` in one file (and optionally another config)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def load(path: Path, rules: str = "cpu-only.yaml"):
    placed = place(path, rules, "float32")
    load_weights(placed, Checkpoint.open(path))
    return placed


def test_fp8_weights_equal_the_exact_block_dequantization(tiny) -> None:
    t = tiny("DeepseekV3ForCausalLM", fp8=True, shards=3, block_size=(32, 32))
    on_disk = tensors_of(t.path)
    assert on_disk["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.float8_e4m3fn
    placed = load(t.path)
    ours = dict(placed.model.named_parameters())
    expected = t.reference.state_dict()
    checked = 0
    for key, value in expected.items():
        if key in ours:
            assert torch.equal(ours[key], value), key
            checked += 1
    experts = placed.model.model.layers[1].mlp.experts
    assert torch.equal(experts.w13, expected["model.layers.1.mlp.experts.gate_up_proj"])
    assert torch.equal(experts.w2, expected["model.layers.1.mlp.experts.down_proj"])
    assert checked > 20


@pytest.mark.parametrize(
    ("out_dim", "in_dim", "block"),
    [(576, 7168, (128, 128)), (40, 72, (32, 32)), (1, 1, (128, 128)), (129, 257, (128, 128)), (7, 300, (4, 128))],
)
def test_dequantize_blocks_against_a_loop(out_dim: int, in_dim: int, block: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(out_dim * in_dim)
    w = (torch.randn(out_dim, in_dim, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand((-(-out_dim // block[0]), -(-in_dim // block[1])), generator=g) + 0.01
    ref = torch.empty(out_dim, in_dim)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            ref[rows, cols] = w[rows, cols].float() * scale[i, j]
    assert torch.equal(dequantize_fp8_blocks(w, scale, block), ref)
    with pytest.raises(ValueError, match="does not fit"):
        dequantize_fp8_blocks(w, scale[:, :-1] if scale.shape[1] > 1 else scale[:0], block)


def test_mtp_layer_is_skipped_explicitly(tiny, tmp_path) -> None:
    t = tiny("DeepseekV3ForCausalLM")
    tensors = tensors_of(t.path)
    layers = t.reference.config.num_hidden_layers
    mtp = {
        k.replace("model.layers.2.", f"model.layers.{layers}."): v.clone()
        for k, v in tensors.items()
        if k.startswith("model.layers.2.")
    }
    config = json.loads((t.path / "config.json").read_text())
    with_mtp = rewrite(t.path, tmp_path / "mtp", {**tensors, **mtp}, {**config, "num_nextn_predict_layers": 1})
    load(with_mtp)
    without = rewrite(t.path, tmp_path / "nomtp", {**tensors, **mtp}, {**config, "num_nextn_predict_layers": 0})
    with pytest.raises(CheckpointError, match=rf"unexpected tensor\(s\).*model\.layers\.{layers}\."):
        load(without)


def test_missing_tensor(tiny, tmp_path) -> None:
    t = tiny("Qwen3MoeForCausalLM")
    tensors = tensors_of(t.path)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) missing .*model\.layers\.1\.mlp\.experts\.3\.up_proj"):
        load(rewrite(t.path, tmp_path / "c", tensors))


def test_unexpected_tensor(tiny, tmp_path) -> None:
    t = tiny("Qwen3MoeForCausalLM")
    tensors = {**tensors_of(t.path), "model.layers.1.mlp.surprise.weight": torch.zeros(2, 2)}
    with pytest.raises(
        CheckpointError, match=r"unexpected .*model\.layers\.1\.mlp\.surprise\.weight in model.safetensors"
    ):
        load(rewrite(t.path, tmp_path / "c", tensors))


def test_shape_mismatch(tiny, tmp_path) -> None:
    t = tiny("MixtralForCausalLM")
    tensors = tensors_of(t.path)
    key = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    tensors[key] = tensors[key][:, :-1].contiguous()
    with pytest.raises(
        CheckpointError, match=rf"model.safetensors: tensor {key} has shape \[72, 39\], the model expects \[72, 40\]"
    ):
        load(rewrite(t.path, tmp_path / "c", tensors))


def test_non_float_tensor(tiny, tmp_path) -> None:
    t = tiny("MixtralForCausalLM")
    tensors = tensors_of(t.path)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    with pytest.raises(CheckpointError, match="tensor model.norm.weight has dtype torch.int32"):
        load(rewrite(t.path, tmp_path / "c", tensors))


def test_fp8_without_scale_and_bad_fp8_scale_shape(tiny, tmp_path) -> None:
    t = tiny("DeepseekV3ForCausalLM", fp8=True, block_size=(32, 32))
    tensors = tensors_of(t.path)
    key = "model.layers.0.self_attn.o_proj.weight"
    no_scale = {k: v for k, v in tensors.items() if k != key + "_scale_inv"}
    with pytest.raises(CheckpointError, match=f"FP8 tensor {key} has no {key}_scale_inv"):
        load(rewrite(t.path, tmp_path / "a", no_scale))
    bad = {**tensors, key + "_scale_inv": tensors[key + "_scale_inv"][:, :1].contiguous()}
    with pytest.raises(
        CheckpointError,
        match=rf"{key}_scale_inv has shape \[3, 1\]; weight \[72, 48\] with block \[32, 32\] needs \[3, 2\]",
    ):
        load(rewrite(t.path, tmp_path / "b", bad))
    config = json.loads((t.path / "config.json").read_text())
    del config["quantization_config"]
    with pytest.raises(CheckpointError, match="no quantization_config.weight_block_size"):
        load(rewrite(t.path, tmp_path / "c", tensors, config))


def test_missing_and_truncated_shards(tiny, tmp_path) -> None:
    t = tiny("DeepseekV2ForCausalLM", shards=3)
    missing = shutil.copytree(t.path, tmp_path / "missing")
    (missing / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors: shard listed in .* is missing"):
        Checkpoint.open(missing)
    truncated = shutil.copytree(t.path, tmp_path / "truncated")
    shard = truncated / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model-00003-of-00003.safetensors: truncated: tensor"):
        Checkpoint.open(truncated)
    stub = shutil.copytree(t.path, tmp_path / "stub")
    (stub / "model-00001-of-00003.safetensors").write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint.open(stub)
    garbage = shutil.copytree(t.path, tmp_path / "garbage")
    (garbage / "model-00001-of-00003.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"not json" + b"\x00" * 8)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        Checkpoint.open(garbage)


def test_index_that_disagrees_with_its_shards(tiny, tmp_path) -> None:
    t = tiny("DeepseekV2ForCausalLM", shards=2)
    copy = shutil.copytree(t.path, tmp_path / "c")
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = "model-00001-of-00002.safetensors"
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"listed but not in their shard, e.g. model.layers.0.extra.weight"):
        Checkpoint.open(copy)


def test_no_weights_at_all(tiny, tmp_path) -> None:
    copy = shutil.copytree(tiny("DeepseekV2ForCausalLM").path, tmp_path / "c")
    for f in copy.glob("*.safetensors"):
        f.unlink()
    (copy / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="only safetensors checkpoints are read"):
        Checkpoint.open(copy)


def test_config_errors(tmp_path) -> None:
    with pytest.raises(ModelError, match="no config.json"):
        place(tmp_path, "cpu-only.yaml")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        place(tmp_path, "cpu-only.yaml")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(
        ModelError,
        match="unsupported architecture.*supported: DeepseekV3ForCausalLM, DeepseekV2ForCausalLM, "
        "Qwen3MoeForCausalLM, MixtralForCausalLM",
    ):
        place(tmp_path, "cpu-only.yaml")


def test_loads_float16_and_float32_checkpoints(tiny, hf_greedy) -> None:
    from hetero_moe.llm import LLM

    for dtype in (torch.float16, torch.float32):
        t = tiny("Qwen3MoeForCausalLM", dtype=dtype, shards=2)
        assert tensors_of(t.path)["model.norm.weight"].dtype == dtype
        llm = LLM(t.path, dtype="float32")
        prompt = [0, 9, 8, 7, 6, 5]
        assert llm.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True).token_ids == hf_greedy(
            t.reference, prompt, 12
        )
