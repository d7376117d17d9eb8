"""The GPU side's ops, checked wherever the tests run: quantized linears (Triton, under the interpreter
without a GPU) against their dequantized weights, and the MoE block's CPU/GPU overlap against the
sequential block. Device-only checks (FP8 exactness, the absorbed decode kernel inside the model) are
in test_gpu.py."""

from __future__ import annotations

from importlib import resources

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton")  # on a CPU-only machine conftest.py has chosen the interpreter

from hetero_moe.kernels.quant import dequantize_fp8_blocks, dequantize_int4, quantize_fp8_blocks
from hetero_moe.kernels.triton.fp8_linear import act_quant

from hetero_moe.bench.teacher import TeacherForced
from hetero_moe.inject.injector import InjectError
from hetero_moe.llm import LLM
from hetero_moe.ops.base import BuildContext, Services
from hetero_moe.ops.linear import LinearKwargs, QuantLinear
from hetero_moe.ops.moe import MoEBlock
from hetero_moe.ops.staging import HostStaging

DEVICE = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
PROMPT = [0, 5, 17, 42, 99, 7, 3, 100, 200, 11, 64]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


def quant_linear(out_dim: int, in_dim: int, bias: bool, **kwargs) -> QuantLinear:
    with torch.device("meta"):
        hf = nn.Linear(in_dim, out_dim, bias=bias)
    ctx = BuildContext(config=None, dtype=torch.float32, device=DEVICE, services=Services(triton_on_cpu=True))
    return QuantLinear.from_hf(hf, ctx, LinearKwargs(**kwargs))


@pytest.mark.parametrize(("out_dim", "in_dim"), [(40, 72), (130, 300), (1, 33)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "kwargs", [{"quant": "int4", "group_size": 32}, {"quant": "int4", "scale_dtype": "fp16"}, {"quant": "fp8"}]
)
def test_quant_linear_is_its_dequantized_weight(out_dim: int, in_dim: int, bias: bool, kwargs: dict) -> None:
    g = torch.Generator().manual_seed(out_dim + in_dim)
    w, b, x = torch.randn(out_dim, in_dim, generator=g), torch.randn(out_dim, generator=g), torch.randn(5, in_dim)
    op = quant_linear(out_dim, in_dim, bias, **kwargs)
    assert op.checkpoint_keys() == {"weight": (out_dim, in_dim), **({"bias": (out_dim,)} if bias else {})}
    meta_bytes = op.nbytes()
    op.load_weight("weight", w)
    if bias:
        op.load_weight("bias", b)
    op.finalize()
    assert op.nbytes() == meta_bytes  # rules check counts exactly what loading allocates
    y = op(x.to(DEVICE))
    wd = op.weight.double().cpu()  # the stored weight, dequantized
    if kwargs["quant"] == "fp8":  # activations quantized per token per block as the kernel does
        xq, xs = act_quant(x.to(DEVICE), 128)
        x = dequantize_fp8_blocks(xq.cpu(), xs.cpu(), (1, 128))
        scales = -(-out_dim // 128) * -(-in_dim // 128)
        assert meta_bytes == out_dim * in_dim + 4 * scales + (4 * out_dim if bias else 0)  # float32 bias
    ref = x.double() @ wd.T + (b.double() if bias else 0)
    # Hopper's FP8 tensor cores accumulate with about 14 bits kept within a dot (Triton's default on sm_90,
    # as DeepSeek-V3's report describes): 3e-5 to 1.1e-4 here on an H200; the interpreter is exact
    tol = 3e-4 if kwargs["quant"] == "fp8" and DEVICE.type == "cuda" else 1e-5
    assert y.shape == (5, out_dim) and rel(y.cpu(), ref) < tol
    assert rel(wd, w) < (0.15 if kwargs["quant"] == "int4" else 0.05)  # the weight itself survives quantization


def test_fp8_checkpoint_weights_are_kept_as_they_are() -> None:
    w, s = quantize_fp8_blocks(torch.randn(40, 72), (32, 32))
    op = quant_linear(40, 72, False, quant="fp8")
    op.load_fp8("weight", w, s, (32, 32))
    assert op.format.block == (32, 32)
    assert torch.equal(op.format.weight.cpu().view(torch.uint8), w.view(torch.uint8))
    assert torch.equal(op.format.scale.cpu(), s)
    # a block the kernel cannot tile by is requantized to the op's own block
    w, s = quantize_fp8_blocks(torch.randn(40, 72), (24, 24))
    op = quant_linear(40, 72, False, quant="fp8", block=32)
    op.load_fp8("weight", w, s, (24, 24))
    assert op.format.block == (32, 32) and rel(op.weight, dequantize_fp8_blocks(w, s, (24, 24))) < 0.05
    # INT4 from FP8: dequantized, then quantized
    op = quant_linear(40, 72, False, quant="int4", group_size=32)
    op.load_fp8("weight", w, s, (24, 24))
    packed, scales = op.format.packed.cpu(), op.format.scales.cpu()
    assert torch.equal(op.weight.cpu(), dequantize_int4(packed, scales, 32, 72))


def test_linear_kwargs_and_placement_are_checked(tiny, tmp_path) -> None:
    for bad, message in [
        ({"quant": "int3"}, "quant must be one of fp8, int4"),
        ({"block": 48}, "block must be a power of two"),
        ({"group_size": 16}, "group_size must be 32, 64 or 128"),
    ]:
        with pytest.raises(ValueError, match=message):
            LinearKwargs(**bad)
    if DEVICE.type == "cpu":
        rules = tmp_path / "r.yaml"
        rules.write_text(_rules("int4"))
        with pytest.raises(InjectError, match="op linear runs Triton kernels on a GPU, but the rule places it on cpu"):
            LLM(tiny("Qwen3MoeForCausalLM").path, rules=str(rules), dtype="float32")


def _rules(quant: str) -> str:
    """cpu-only.yaml (or gpu-exact.yaml on a GPU) with the attention and MLP projections quantized."""
    base = resources.files("hetero_moe.rules") / ("gpu-exact.yaml" if DEVICE.type == "cuda" else "cpu-only.yaml")
    linear = (
        "- match: {name: '^model\\.layers\\.\\d+\\.(self_attn\\.(q_a_proj|q_b_proj|q_proj|k_proj|v_proj|o_proj|"
        "kv_a_proj_with_mqa)|mlp(\\.shared_experts)?\\.(gate|up|down)_proj)$'}\n"
        f"  replace: {{op: linear, kwargs: {{quant: {quant}, group_size: 32}}}}\n"
    )
    return linear + base.read_text()


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM"])
def test_model_with_int4_linears_is_the_model_with_their_dequantized_weights(
    tiny, tmp_path, triton_on_cpu, arch: str
) -> None:
    """Through a whole model, prefill and decode: the Triton INT4 linears against `F.linear` with the very
    weights they hold, so only the kernels differ."""
    t = tiny(arch, fp8=arch.startswith("Deepseek"), shards=2, block_size=(32, 32))
    rules = tmp_path / "int4.yaml"
    rules.write_text(_rules("int4"))
    llm = LLM(t.path, rules=str(rules), dtype="float32")
    ops = [m for m in llm.placed.model.modules() if isinstance(m, QuantLinear)]
    assert len(ops) >= 4 * llm.placed.config.num_hidden_layers
    ours = _logits(llm)
    for op in ops:
        op._run = lambda x, w=op.weight: F.linear(x, w.to(x.dtype))
    assert rel(ours, _logits(llm)) < 1e-4


def _logits(llm: LLM) -> torch.Tensor:
    """Prefill logits, then those of three decode steps fed the greedy tokens."""
    cache = TeacherForced(llm.runner, len(PROMPT) + 3)
    out = [cache.feed(PROMPT)]
    for _ in range(3):
        out.append(cache.feed(out[-1].argmax()[None]))
    return torch.stack(out)


@pytest.mark.parametrize("rules", ["cpu-only.yaml", "cpu-only-int4.yaml"])
@pytest.mark.parametrize("arch", ["DeepseekV2ForCausalLM", "MixtralForCausalLM"])
def test_overlapped_moe_equals_sequential(tiny, arch: str, rules: str) -> None:
    """The worker-thread path with staging buffers (pinned on a GPU box, plain here) gives the very
    tokens of the sequential path, shared experts or not."""
    llm = LLM(tiny(arch).path, rules=rules, dtype="float32")
    blocks = [m for m in llm.placed.model.modules() if isinstance(m, MoEBlock)]
    assert blocks and not any(b.staging for b in blocks)  # all on the CPU: no overlap
    for b in blocks:  # routed by torch, as a block beside a GPU routes (not the quantized blocks' numpy lane)
        b._forward = b._sequential
    llm.runner.numpy_decode = False
    sequential = llm.generate(PROMPT, max_tokens=12, temperature=0, ignore_eos=True).token_ids
    staging = HostStaging(torch.device("cpu"))
    for b in blocks:  # what finalize does for a block on a GPU with its experts on the CPU
        b.staging, b._forward = staging, b._overlapped
    try:
        assert llm.generate(PROMPT, max_tokens=12, temperature=0, ignore_eos=True).token_ids == sequential
    finally:
        staging.close()
    assert staging.stats.calls == 12 * len(blocks) and staging.stats.experts_s > 0
    assert set(staging.buffers) == {"x", "index", "weights", "y"}
