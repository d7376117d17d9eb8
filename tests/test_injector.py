"""Applying rules to a model on the meta device: placement, replacement, and the checks."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import torch

from hetero_moe.arch import build_meta_model, load_config
from hetero_moe.inject.injector import InjectError, collapse_layers, inject
from hetero_moe.inject.rules import parse_rules
from hetero_moe.llm import place
from hetero_moe.ops.attention import MLAAttention
from hetero_moe.ops.experts import TorchExperts

V3 = Path(str(resources.files("hetero_moe.configs") / "deepseek-v3"))
V2_LITE = Path(str(resources.files("hetero_moe.configs") / "deepseek-v2-lite"))
QWEN3 = Path(str(resources.files("hetero_moe.configs") / "qwen3-30b-a3b"))

BASE = """
- match: {name: 'mlp\\.experts$'}
  replace: {op: experts, device: cpu}
  recursive: false
- match: {name: 'self_attn$'}
  replace: {op: attention}
- match: {class: 'DeepseekV2Moe'}
  replace: {op: moe}
- match: {class: DeepseekV2TopkRouter}
  replace: {op: router}
"""


def placed_with(text: str, model_dir: Path = V2_LITE):
    config, arch = load_config(model_dir)
    model = build_meta_model(config, arch, torch.bfloat16)
    return inject(model, parse_rules(text, source="t.yaml"), config, arch, torch.bfloat16)


def test_inherited_placement_first_match_and_recursive() -> None:
    placed = placed_with(BASE + "- match: {name: '^$'}\n  replace: {device: 'cuda'}\n")
    p = placed.placements
    assert p[""].device == torch.device("cuda:0")
    assert p["model.layers.5.input_layernorm"].device == torch.device("cuda:0")  # inherited
    assert p["model.layers.5.mlp.experts"].op == "experts" and p["model.layers.5.mlp.experts"].device.type == "cpu"
    assert p["model.layers.5.self_attn"].op == "attention"
    assert p["model.layers.5.self_attn.kv_b_proj"].device == torch.device("cuda:0")
    assert isinstance(placed.model.model.layers[5].self_attn, MLAAttention)
    assert isinstance(placed.model.model.layers[5].mlp.experts, TorchExperts)
    assert p["model.layers.0.mlp"].op is None  # the dense layer kept as transformers' module
    assert placed.warnings == []


def test_recursive_false_stops_matching_children() -> None:
    text = (
        "- match: {name: 'self_attn$'}\n  replace: {op: attention, device: cpu}\n  recursive: false\n"
        "- match: {name: 'kv_b_proj$'}\n  replace: {device: 'cuda:0'}\n" + BASE
    )
    placed = placed_with(text)
    assert placed.placements["model.layers.1.self_attn.kv_b_proj"].device.type == "cpu"
    assert placed.placements["model.layers.1.self_attn.kv_b_proj"].rule is None
    assert any("rule 1" in w and "matches no module" in w for w in placed.warnings)


def test_unused_rule_is_a_warning() -> None:
    placed = placed_with(BASE + "- match: {class: Qwen3MoeMLP}\n  replace: {op: mlp}\n")
    assert placed.warnings == ["t.yaml: rule 4 (line 11): matches no module of this DeepseekV2ForCausalLM"]


def test_unused_optional_rule_is_no_warning() -> None:
    placed = placed_with(BASE + "- match: {class: Qwen3MoeMLP}\n  replace: {op: mlp}\n  optional: true\n")
    assert placed.warnings == []


def test_module_that_must_be_replaced() -> None:
    text = BASE.replace("- match: {class: DeepseekV2TopkRouter}\n  replace: {op: router}\n", "")
    with pytest.raises(
        InjectError, match=r"model\.layers\.1\.mlp\.gate \(DeepseekV2TopkRouter\) must be replaced by op 'router'"
    ):
        placed_with(text)


def test_op_that_cannot_replace_the_matched_class() -> None:
    with pytest.raises(
        InjectError,
        match=r"t.yaml: rule 0 \(line 1\): module model.layers.0.mlp: op 'moe' cannot "
        r"replace a DeepseekV2MLP; it replaces: .*DeepseekV2Moe",
    ):
        placed_with("- match: {name: 'layers\\.\\d+\\.mlp$'}\n  replace: {op: moe}\n" + BASE)


def test_parts_of_an_op_share_its_device() -> None:
    text = (
        BASE
        + "- match: {name: 'kv_b_proj$'}\n  replace: {device: cpu}\n- match: {name: '^$'}\n  replace: {device: cuda}\n"
    )
    with pytest.raises(InjectError, match="kv_b_proj is placed on cpu, but it is part of op 'attention'"):
        placed_with(text)


def test_root_cannot_be_replaced() -> None:
    with pytest.raises(InjectError, match="root model cannot be replaced"):
        placed_with("- match: {name: '^$'}\n  replace: {op: mlp}\n")


def test_rules_check_bytes_on_the_real_deepseek_v3_config() -> None:
    placed = place(V3, "gpu-exact.yaml")  # 671 B parameters on the meta device
    devices = placed.bytes_per_device()
    assert set(devices) == {"cpu", "cuda:0"}
    # bf16: the routed experts are 58 layers x 256 experts x 3 x 7168 x 2048 parameters
    assert devices["cpu"] == 58 * 256 * 3 * 7168 * 2048 * 2
    total_params = (devices["cpu"] + devices["cuda:0"]) / 2
    assert 670e9 < total_params < 672e9
    assert placed.warnings == []


@pytest.mark.parametrize(
    ("model_dir", "rules"),
    [
        (V2_LITE, "deepseek-v2-lite.yaml"),
        (QWEN3, "qwen3-moe.yaml"),
        (V3, "cpu-only.yaml"),
        (QWEN3, "cpu-only.yaml"),
        (V2_LITE, "gpu-exact.yaml"),
    ],
)
def test_shipped_rules_fit_the_real_configs(model_dir: Path, rules: str) -> None:
    placed = place(model_dir, rules)
    experts = [p for p in placed.placements.values() if p.op in ("experts", "cpu_experts")]
    assert experts and all(p.device.type == "cpu" for p in experts)


def test_collapse_layers() -> None:
    names = [f"model.layers.{i}.mlp" for i in (0, 1, 2, 5, 7, 8)]
    assert collapse_layers(names) == "model.layers.{0..2,5,7..8}.mlp"
    assert collapse_layers(["lm_head"]) == "lm_head"


def test_shipped_deepseek_v3_rules_hold_int4_experts_and_fit_their_cards() -> None:
    fp8, int4 = place(V3, "deepseek-v3.yaml"), place(V3, "deepseek-v3-int4-gpu.yaml")
    # per expert, group 64, bf16 scales: 2 x 2048 rows of 7168/2 bytes + 7168/64 scales; 7168 rows of 1024 + 32
    per_expert = 2 * 2048 * (7168 // 2 + 2 * 7168 // 64) + 7168 * (2048 // 2 + 2 * 2048 // 64)
    assert fp8.bytes_per_device()["cpu"] == 58 * 256 * per_expert  # 347 GB, 4.25 bits per weight
    assert fp8.warnings == [] and int4.warnings == []
    # FP8 GPU linears: about 15 B non-expert parameters at one byte, plus bf16 embeddings, lm_head, kv_b_proj
    assert 18e9 < fp8.bytes_per_device()["cuda:0"] < 22e9
    # the 16 GB card: weights plus one 8K-token latent cache (61 layers x 8192 x 576 bf16) within 12 GB
    cache = int4.kv_cache_bytes(8192)
    assert cache == {"cuda:0": 61 * 8192 * 576 * 2}
    assert int4.bytes_per_device()["cuda:0"] + cache["cuda:0"] <= 12e9
    assert int4.placements["model.embed_tokens"].device.type == "cpu"
    assert int4.placements["lm_head"].op == "linear"
