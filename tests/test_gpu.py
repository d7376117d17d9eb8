"""On a GPU: the exact GPU rules against transformers, and the shipped GPU rules (quantized linears,
absorbed latent attention with its Triton kernel, INT4 CPU experts overlapped with the GPU) against
the same model with each kernel swapped for plain torch. Skipped without a GPU."""

from __future__ import annotations

from importlib import resources

import pytest
import torch
import torch.nn.functional as F
from hetero_moe.kernels.quant import dequantize_fp8_blocks

from hetero_moe.bench.teacher import TeacherForced
from hetero_moe.llm import LLM
from hetero_moe.ops.attention import MLAAttention
from hetero_moe.ops.linear import FP8Weight, QuantLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHIPPED = {
    "DeepseekV3ForCausalLM": ["deepseek-v3.yaml", "deepseek-v3-int4-gpu.yaml"],
    "DeepseekV2ForCausalLM": ["deepseek-v2-lite.yaml"],
    "Qwen3MoeForCausalLM": ["qwen3-moe.yaml"],
    "MixtralForCausalLM": ["mixtral.yaml"],
}
PROMPT = [0, 5, 17, 42, 99, 7, 3, 100, 200, 11, 64]
FP8_ACTIVATIONS = {"deepseek-v3.yaml"}  # rules whose linears quantize activations to e4m3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


@pytest.mark.parametrize("arch", list(SHIPPED))
@pytest.mark.parametrize(("fp8", "shards"), [(False, 1), (True, 3)], ids=["bf16-single", "fp8-sharded"])
def test_gpu_rules_match_transformers_in_float32(tiny, hf_greedy, arch: str, fp8: bool, shards: int) -> None:
    t = tiny(arch, fp8=fp8, shards=shards, block_size=(32, 32))
    llm = LLM(t.path, rules="gpu-exact.yaml", dtype="float32")
    p = llm.placed.placements
    assert p["model.layers.1.mlp.experts"].device.type == "cpu"
    assert p["model.layers.1.self_attn"].device == torch.device("cuda:0")
    assert llm.placed.model.lm_head.weight.device.type == "cuda"
    ours = llm.generate(PROMPT, max_tokens=40, temperature=0, ignore_eos=True).token_ids
    assert ours == hf_greedy(t.reference, PROMPT, 40)
    assert llm.placed.services.overlap is not None and llm.placed.services.overlap.stats.calls > 0
    assert all(b.is_pinned() for b in llm.placed.services.overlap.buffers.values())


@pytest.mark.parametrize("arch", list(SHIPPED))
def test_gpu_rules_in_bfloat16_are_as_close_to_float32_as_transformers(tiny, bf16_accuracy, arch: str) -> None:
    """Both on the GPU, teacher-forced over 256 positions of three random models (conftest's
    `bf16_accuracy` says why the measure is the distance to float32, not agreement with transformers'
    bf16, and why one model is too few)."""
    models = [tiny(arch, seed=seed) for seed in range(3)]
    bf16_accuracy([(t, LLM(t.path, rules="gpu-exact.yaml", dtype="bfloat16")) for t in models], PROMPT, "cuda")


def _act_quant_reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per token per `block` channels to e4m3 and back, in plain torch."""
    t, k = x.shape
    xp = F.pad(x.float(), (0, -k % block)).view(t, -1, block)
    s = xp.abs().amax(-1, keepdim=True) / 448.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    return ((xp / s).to(torch.float8_e4m3fn).float() * s).view(t, -1)[:, :k]


def _torch_linear(op: QuantLinear):
    w = op.weight
    if isinstance(op.format, FP8Weight):
        return lambda x: F.linear(_act_quant_reference(x, op.format.block[1]).to(x.dtype), w.to(x.dtype))
    return lambda x: F.linear(x, w.to(x.dtype))


def _logits(llm: LLM, steps: int = 8) -> torch.Tensor:
    cache = TeacherForced(llm.runner, len(PROMPT) + steps)
    out = [cache.feed(PROMPT)]
    for _ in range(steps):
        out.append(cache.feed(out[-1].argmax()[None]))
    return torch.stack(out)


@pytest.mark.parametrize(("arch", "rules"), [(a, r) for a, files in SHIPPED.items() for r in files])
def test_shipped_gpu_rules_kernels_against_plain_torch(tiny, arch: str, rules: str) -> None:
    """Float32: the Triton INT4 linears and the absorbed decode kernel against torch on the very same
    weights; the routed experts are the same INT4 CPU experts on both sides, overlapped with the GPU.
    FP8 linears run torch's reference on both sides: Hopper's FP8 dot keeps about 14 bits within a
    dot (the ops' own test bounds it), and the next layer's e4m3 activations turn a difference that small
    into flipped roundings, one sixteenth of a value each, that no end-to-end bound survives (a relative
    3e-5 on every linear's output moved a tiny model's logits by 7 %)."""
    t = tiny(arch, fp8=arch.startswith("DeepseekV3"), shards=2, block_size=(32, 32))
    llm = LLM(t.path, rules=rules, dtype="float32")
    assert llm.placed.placements["model.layers.1.mlp.experts"].op == "cpu_experts"
    assert llm.placed.services.overlap is not None
    for m in llm.placed.model.modules():
        if isinstance(m, QuantLinear) and isinstance(m.format, FP8Weight):
            m._run = _torch_linear(m)
    ours = _logits(llm)
    assert llm.placed.services.overlap.stats.calls > 0
    assert all(b.is_pinned() for b in llm.placed.services.overlap.buffers.values())
    for m in llm.placed.model.modules():
        if isinstance(m, QuantLinear):
            m._run = _torch_linear(m)
        if isinstance(m, MLAAttention):
            assert m.absorb
            m._latent_attend = m._latent_attend_sdpa
    assert rel(ours, _logits(llm)) < 1e-3


def test_fp8_linear_error_against_the_dequantized_weight() -> None:
    """The FP8 scheme's own error (activations quantized per token per 128 channels) at a real shape."""
    from hetero_moe.kernels.quant import quantize_fp8_blocks
    from hetero_moe.kernels.triton.fp8_linear import fp8_linear

    g = torch.Generator().manual_seed(0)
    w, s = quantize_fp8_blocks(torch.randn(2048, 7168, generator=g) * 0.02, (128, 128))
    x = torch.randn(4, 7168, generator=g)
    out = fp8_linear(x.to("cuda", torch.bfloat16), w.cuda(), s.cuda(), (128, 128))
    ref = x.double() @ dequantize_fp8_blocks(w, s, (128, 128)).double().T
    assert rel(out, ref) < 0.05


@pytest.mark.parametrize("rules", ["gpu-exact.yaml", "shipped"])
@pytest.mark.parametrize("arch", list(SHIPPED))
def test_batched_greedy_on_the_gpu_equals_alone(tiny, arch: str, rules: str) -> None:
    """Continuous batching on the GPU rules (paged pool on the GPU, gathered rows, chunked prefill,
    preemption): every request's tokens are those it gets alone. Rules with FP8 linears run in bf16, what
    they are for: FP8 activations turn any changed bit into another token within 20, and in float32
    cuBLAS gives a row other bits when the batch has more rows (on the H200; its bf16 gave the same)."""
    from hetero_moe.engine.sampler import SamplingParams
    from hetero_moe.engine.scheduler import SchedulerConfig

    rules = SHIPPED[arch][0] if rules == "shipped" else rules
    llm = LLM(tiny(arch).path, rules=rules, dtype="bfloat16" if rules in FP8_ACTIVATIONS else "float32")
    prompts = [PROMPT, list(range(3, 40)), [9, 8, 7], list(range(50, 120, 3)), [1, 1]]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    alone = [llm.generate(p, params).token_ids for p in prompts]
    engine = llm.new_engine(SchedulerConfig(max_batch=3, kv_cache_tokens=96, prefill_chunk=7, page_tokens=8))
    outs: list[list[int]] = [[] for _ in prompts]
    for i, step in engine.stream(prompts, [params] * len(prompts)):
        outs[i].append(step.token_id)
    stats = engine.stats()
    assert outs == alone and stats.preempted_total > 0 and stats.kv_cache_used_tokens == 0


def test_pinned_experts_on_the_gpu_equal_them_in_dram(tiny, tmp_path) -> None:
    """`plan`'s pinned experts: computed on the GPU (overlapped with the CPU experts), same model. Pinned
    experts are the INT4 weights dequantized, times float activations: the CPU experts run that math too
    with `torch_min_tokens: 1` (their integer kernels quantize the activations to int8, 3e-3 away)."""
    t = tiny("DeepseekV2ForCausalLM")
    text = (resources.files("hetero_moe.rules") / "deepseek-v2-lite.yaml").read_text()
    text = text.replace("group_size: 64}", "group_size: 64, torch_min_tokens: 1}")
    plain_rules, pinned_rules = tmp_path / "plain.yaml", tmp_path / "pinned.yaml"
    plain_rules.write_text(text)
    pinned_rules.write_text(text.replace("torch_min_tokens: 1}", "torch_min_tokens: 1, pinned: [0, 3, 5]}"))
    plain = LLM(t.path, rules=str(plain_rules), dtype="float32")
    pinned = LLM(t.path, rules=str(pinned_rules), dtype="float32")
    assert pinned.placed.model.model.layers[1].mlp.experts.pinned_w13.device.type == "cuda"
    assert rel(_logits(pinned), _logits(plain)) < 1e-4
