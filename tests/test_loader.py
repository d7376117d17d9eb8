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
from hetero_moe.loader.checkpoint import INDEX, Checkpoint, CheckpointError
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


def write_raw(path: Path, header: object, data: bytes = b"\0" * 16) -> Path:
    """A safetensors file with the given header object, written by hand."""
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        ([1, 2], "a list, not an object"),
        ({"w": 3}, "tensor 'w' is a int"),
        ({"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, "has shape '4'"),
        ({"w": {"dtype": "F32", "shape": [4, -1], "data_offsets": [0, 16]}}, "has shape [4, -1]"),
        ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "has shape [True]"),
        ({"w": {"dtype": "F32", "shape": [4]}}, "has data_offsets None"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}, "negative or reversed"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, "negative or reversed"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, "16"]}}, "not [begin, end]"),
        ({"w": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, "unsupported dtype ['F32']"),
    ],
)
def test_malformed_headers_are_one_line_errors(tmp_path, header: object, fragment: str) -> None:
    path = write_raw(tmp_path / "model.safetensors", header)
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(tmp_path)
    message = str(info.value)
    assert message.startswith(str(path)) and fragment in message and "\n" not in message


def test_shards_outside_the_model_directory_are_refused(tiny, tmp_path) -> None:
    t = tiny("DeepseekV2ForCausalLM", shards=2)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = write_raw(outside / "secret.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})
    for i, name in enumerate(["../outside/secret.safetensors", str(secret), "sub/../../outside/secret.safetensors"]):
        copy = shutil.copytree(t.path, tmp_path / f"c{i}")
        index = json.loads((copy / INDEX).read_text())
        index["weight_map"]["w"] = name
        (copy / INDEX).write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match="outside the model directory") as info:
            Checkpoint.open(copy)
        assert "\n" not in str(info.value)
    linked = shutil.copytree(t.path, tmp_path / "linked")
    shard = linked / "model-00001-of-00002.safetensors"
    moved = shard.rename(outside / shard.name)
    shard.symlink_to(moved)
    with pytest.raises(CheckpointError, match="a link to .*outside the model directory; refused"):
        Checkpoint.open(linked)
    for bad in ([], {"weight_map": [1]}, {"weight_map": {"w": 3}}):
        (linked / INDEX).write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="not a valid safetensors index"):
            Checkpoint.open(linked)


def test_links_inside_the_model_directory_and_the_hub_cache_layout(tiny, tmp_path) -> None:
    t = tiny("DeepseekV2ForCausalLM", shards=2)
    expected = set(Checkpoint.open(t.path).tensors)
    inside = shutil.copytree(t.path, tmp_path / "inside")
    (inside / "blobs").mkdir()
    shard = inside / "model-00001-of-00002.safetensors"
    shard.symlink_to(shard.rename(inside / "blobs" / "abc"))
    assert set(Checkpoint.open(inside).tensors) == expected
    # the Hugging Face cache: models--org--name/snapshots/<revision>/file -> ../../blobs/<hash>
    repo = tmp_path / "models--org--tiny"
    snapshot = shutil.copytree(t.path, repo / "snapshots" / "0123abc")
    (repo / "blobs").mkdir()
    for f in snapshot.glob("*.safetensors"):
        f.symlink_to(f.rename(repo / "blobs" / f.name))
    assert set(Checkpoint.open(snapshot).tensors) == expected


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ([{"architectures": ["DeepseekV3ForCausalLM"]}], "expected a JSON object, got a list"),
        ({"architectures": [["DeepseekV3ForCausalLM"]], "model_type": "deepseek_v3"}, "unsupported architecture"),
        ({"architectures": "DeepseekV3ForCausalLM", "model_type": "deepseek_v3"}, "unsupported architecture"),
        ({"architectures": [{"a": 1}], "model_type": "deepseek_v3"}, "unsupported architecture"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
        ({"hidden_size": "64"}, "hidden_size must be a positive integer, got '64'"),
        ({"num_hidden_layers": True}, "num_hidden_layers must be a positive integer"),
        ({"n_routed_experts": -2}, "n_routed_experts must be a positive integer"),
    ],
)
def test_bad_configs_are_one_line_errors(tiny, tmp_path, config: object, fragment: str) -> None:
    copy = shutil.copytree(tiny("DeepseekV3ForCausalLM").path, tmp_path / "c")
    if isinstance(config, dict) and "architectures" not in config:
        config = {**json.loads((copy / "config.json").read_text()), **config}
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as info:
        place(copy, "cpu-only.yaml")
    message = str(info.value)
    assert message.startswith(str(copy / "config.json")) and fragment in message and "\n" not in message


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_a_malformed_generation_config_is_one_line(tiny, tmp_path, text: str) -> None:
    from hetero_moe.llm import LLM

    copy = shutil.copytree(tiny("Qwen3MoeForCausalLM").path, tmp_path / "c")
    (copy / "generation_config.json").write_text(text)
    with pytest.raises(ModelError, match=r"generation_config.json: (not valid JSON|expected a JSON object)"):
        LLM(copy, dtype="float32")
