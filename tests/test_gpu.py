"""The GPU rules: everything but the routed experts on cuda:0, experts on the CPU. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from hetero_moe.llm import LLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RULES = {
    "DeepseekV3ForCausalLM": "deepseek-v3.yaml",
    "DeepseekV2ForCausalLM": "deepseek-v2-lite.yaml",
    "Qwen3MoeForCausalLM": "qwen3-moe.yaml",
    "MixtralForCausalLM": "mixtral.yaml",
}
PROMPT = [0, 5, 17, 42, 99, 7, 3, 100, 200, 11, 64]


@pytest.mark.parametrize("arch", list(RULES))
@pytest.mark.parametrize(("fp8", "shards"), [(False, 1), (True, 3)], ids=["bf16-single", "fp8-sharded"])
def test_gpu_rules_match_transformers_in_float32(tiny, hf_greedy, arch: str, fp8: bool, shards: int) -> None:
    t = tiny(arch, fp8=fp8, shards=shards, block_size=(32, 32))
    llm = LLM(t.path, rules=RULES[arch], dtype="float32")
    p = llm.placed.placements
    assert p["model.layers.1.mlp.experts"].device.type == "cpu"
    assert p["model.layers.1.self_attn"].device == torch.device("cuda:0")
    assert llm.placed.model.lm_head.weight.device.type == "cuda"
    ours = llm.generate(PROMPT, max_tokens=40, temperature=0, ignore_eos=True).token_ids
    assert ours == hf_greedy(t.reference, PROMPT, 40)


@pytest.mark.parametrize("arch", list(RULES))
def test_gpu_rules_in_bfloat16_agree_with_cpu_bfloat16(tiny, arch: str) -> None:
    t = tiny(arch)
    gpu = LLM(t.path, rules=RULES[arch], dtype="bfloat16")
    cpu = LLM(t.path, rules="cpu-only.yaml", dtype="bfloat16")
    seq = cpu.generate(PROMPT, max_tokens=64, temperature=0, ignore_eos=True).token_ids
    ids = PROMPT + seq
    agree = 0
    caches = [m.runner.new_cache(len(ids)) for m in (gpu, cpu)]
    first = [int(m.runner.forward(torch.tensor(PROMPT), c).argmax()) for m, c in zip((gpu, cpu), caches, strict=True)]
    agree += first[0] == first[1]
    for tok in ids[len(PROMPT) : -1]:
        a, b = (int(m.runner.forward(torch.tensor([tok]), c).argmax()) for m, c in zip((gpu, cpu), caches, strict=True))
        agree += a == b
    assert agree / len(seq) >= 0.9
