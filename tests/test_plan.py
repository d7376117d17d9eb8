"""`hetero-moe plan` on the real model configs (no weights) for several boxes, `hetero-moe profile` on
a tiny model, and pinned experts: computed on their own device, the same result as in DRAM."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from hetero_moe.bench.teacher import TeacherForced
from hetero_moe.cli import main
from hetero_moe.llm import LLM, place
from hetero_moe.ops.cpu_experts import CPUExpertsKwargs
from hetero_moe.tune.plan import GB, Box, PlanError, plan, render
from hetero_moe.tune.profile import FORMAT, load_profile

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
V3, V2_LITE, QWEN3 = CONFIGS / "deepseek-v3", CONFIGS / "deepseek-v2-lite", CONFIGS / "qwen3-30b-a3b"


def checked(tmp_path: Path, model_dir: Path, box: Box, **kwargs):
    """Plan, write the file, and place it as `rules check` does: the prediction must be exact."""
    p = plan(model_dir, box, **kwargs)
    path = tmp_path / "planned.yaml"
    path.write_text(render(p, box))
    placed = place(model_dir, path)
    assert placed.bytes_per_device() == p.weights and placed.warnings == []
    gpu = p.weights.get("cuda:0", 0) + p.kv_cache.get("cuda:0", 0)
    assert gpu <= box.gpu_bytes * 0.95 - 1 * GB or box.gpu_bytes == 0
    return p, placed


@pytest.mark.parametrize(
    ("gpu_gb", "fp8", "linears"),
    [(80, True, "bfloat16"), (24, True, "fp8"), (24, False, "int4"), (16, False, "int4")],
)
def test_deepseek_v3_takes_the_most_precise_gpu_form_that_fits(tmp_path, gpu_gb: float, fp8: bool, linears: str):
    p, placed = checked(tmp_path, V3, Box(gpu_gb * GB, 512 * GB, fp8))
    assert p.gpu_linears == linears
    assert placed.placements["model.layers.5.mlp.experts"].op == "cpu_experts"
    assert placed.placements["model.layers.5.self_attn"].device.type == "cuda"
    assert (placed.placements["model.embed_tokens"].device.type == "cpu") == (linears == "int4")
    assert 347e9 < p.weights["cpu"] < 350e9  # INT4 experts (plus the embedding for INT4 GPU linears)


def test_boxes_too_small_get_a_clear_error(tmp_path) -> None:
    with pytest.raises(PlanError, match="the GPU is too small: 8.0 GB.*INT4 linears.*needs 10.8 GB"):
        plan(V3, Box(8 * GB, 512 * GB))
    with pytest.raises(PlanError, match="DRAM is too small: 256.0 GB.*needs 349.2 GB there with INT4 experts"):
        plan(V3, Box(24 * GB, 256 * GB))
    with pytest.raises(PlanError, match="max_context must be in 1..40960"):
        plan(QWEN3, Box(0, 64 * GB), max_context=10**6)


def test_no_gpu_plans_everything_in_dram(tmp_path) -> None:
    p, placed = checked(tmp_path, QWEN3, Box(0, 64 * GB))
    assert p.gpu_linears == "none" and set(p.weights) == {"cpu"}
    assert all(pl.device.type == "cpu" for pl in placed.placements.values())


def skewed_profile(placed, seed: int = 0) -> dict:
    """Zipf-like routing counts for every MoE layer of a placed model."""
    rng = np.random.default_rng(seed)
    layers = {}
    for name, module in placed.model.named_modules():
        if type(module).__name__ == "MoEBlock":
            e = module.gate.num_experts
            counts = (1e5 / np.arange(1, e + 1) ** 1.2).astype(int)
            layers[name] = rng.permutation(counts).tolist()
    return {"format": FORMAT, "num_experts": e, "tokens": 10**5, "layers": layers}


def test_a_profile_pins_the_busiest_experts_in_the_gpu_memory_left(tmp_path) -> None:
    box = Box(16 * GB, 64 * GB)
    plain, placed = checked(tmp_path, V2_LITE, box)
    profile = skewed_profile(placed)
    p, pinned_placed = checked(tmp_path, V2_LITE, box, profile=profile)
    n = sum(len(v) for v in p.pinned.values())
    per_expert = 3 * 2048 * 1408 * 2  # bf16 on the GPU
    free = box.gpu_bytes * 0.95 - 1 * GB - plain.weights["cuda:0"] - plain.kv_cache["cuda:0"]
    assert n == int(free // per_expert) > 100
    assert p.weights["cuda:0"] == plain.weights["cuda:0"] + n * per_expert
    # the busiest of all (layer, expert) pairs, and so a larger share of routings than their number
    counts = sorted((c for layer in profile["layers"].values() for c in layer), reverse=True)
    assert p.pinned_share == pytest.approx(sum(counts[:n]) / sum(counts))
    assert p.pinned_share > 1.5 * n / len(counts)  # 39 % of the experts take 87 % of the routings
    layer, experts = next(iter(p.pinned.items()))
    op = pinned_placed.model.get_submodule(layer)
    assert op.pinned == tuple(experts) and op.pinned_device == torch.device("cuda:0")
    assert "pinned on the GPU" in render(p, box)


def test_profile_that_does_not_fit_the_model(tmp_path) -> None:
    placed = place(V2_LITE, "cpu-only-int4.yaml")
    profile = skewed_profile(placed)
    profile["layers"].pop(next(iter(profile["layers"])))
    with pytest.raises(PlanError, match="the profile does not fit this model"):
        plan(V2_LITE, Box(16 * GB, 64 * GB), profile=profile)
    (tmp_path / "p.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="not a profile written by `hetero-moe profile`"):
        load_profile(tmp_path / "p.json")


def test_profile_command_and_plan_cli(tiny, tmp_path, capsys) -> None:
    t = tiny("DeepseekV2ForCausalLM")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('hello there\n{"prompt": "a b c"}\n{"messages": [{"role": "user", "content": "hi"}]}\n\n')
    out = tmp_path / "profile.json"
    argv = ["profile", "--model", str(t.path), "--prompts", str(prompts), "--out", str(out), "--dtype", "float32"]
    assert main([*argv, "--max-tokens", "4"]) == 0
    report = load_profile(out)
    top_k = report["top_k"]
    assert all(sum(c) == report["tokens"] * top_k for c in report["layers"].values())
    assert report["tokens"] > 3 * 4
    rules = tmp_path / "r.yaml"
    assert main(["plan", "--model", str(t.path), "--gpu-memory", "0", "--cpu-memory", "8", "--out", str(rules)]) == 0
    assert "no GPU" in capsys.readouterr().out
    assert LLM(t.path, rules=str(rules), dtype="float32").generate([0, 5, 7], max_tokens=3).token_ids
    prompts.write_text('{"neither": 1}\n')
    assert main([*argv]) == 2
    assert 'needs "prompt" (text) or "messages"' in capsys.readouterr().err


def test_pinned_experts_give_the_same_model(tiny, tmp_path, monkeypatch) -> None:
    """Pinned experts (here on the CPU too, dequantized to the compute dtype) against all experts in the
    kernels; the kernels' float backend, so both sides multiply the same weights with float activations."""
    monkeypatch.setenv("HETERO_MOE_CPU_ISA", "float")
    t = tiny("DeepseekV2ForCausalLM")
    text = (resources.files("hetero_moe.rules") / "cpu-only.yaml").read_text()
    experts = "replace: {op: cpu_experts, device: cpu, kwargs: {quant: int4, group_size: 64%s}}"
    plain_rules, rules = tmp_path / "plain.yaml", tmp_path / "pinned.yaml"
    plain_rules.write_text(text.replace("replace: {op: experts, device: cpu}", experts % ""))
    pinned_kwargs = ", pinned: [5, 0, 3], pinned_device: cpu"
    rules.write_text(text.replace("replace: {op: experts, device: cpu}", experts % pinned_kwargs))
    plain = LLM(t.path, rules=str(plain_rules), dtype="float32")
    pinned = LLM(t.path, rules=str(rules), dtype="float32")
    experts = pinned.placed.model.model.layers[1].mlp.experts
    assert experts.pinned == (0, 3, 5) and experts.pinned_w13.shape[0] == 3
    ids = torch.tensor(list(range(3, 40)))
    a = TeacherForced(plain.runner, 64).feed(ids)
    b = TeacherForced(pinned.runner, 64).feed(ids)
    assert float((a - b).norm() / a.norm()) < 1e-5
    prompt = [0, 5, 17, 42]
    assert (
        pinned.generate(prompt, max_tokens=16, temperature=0, ignore_eos=True).token_ids
        == plain.generate(prompt, max_tokens=16, temperature=0, ignore_eos=True).token_ids
    )
    per_expert = 3 * experts.inter * experts.hidden * 4  # float32 compute dtype
    layers = sum(1 for m in pinned.placed.model.modules() if type(m).__name__ == "CPUExperts")
    assert pinned.placed.bytes_per_device()["cpu"] == plain.placed.bytes_per_device()["cpu"] + 3 * per_expert * layers


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pinned": [1, 1]}, "pinned lists an expert twice"),
        ({"pinned": [-1]}, "pinned must be a list of expert numbers"),
        ({"pinned": "3"}, "pinned must be a list of expert numbers"),
        ({"pinned_device": "gpu7"}, "pinned_device 'gpu7' is not a device"),
    ],
)
def test_pinned_kwargs_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CPUExpertsKwargs(**kwargs)
