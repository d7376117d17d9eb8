"""Quantized dense layers on the CPU (`cpu_linear`, `mlp` with quant): their output is the math of their
stored weights with int8 activations; whole models on `cpu-only-int4.yaml` / `cpu-only-int8.yaml` stay
close to the exact model and give the same tokens batched as alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hetero_moe.kernels.numba.simd import choose_isa
from torch import nn

from hetero_moe.engine.sampler import SamplingParams
from hetero_moe.engine.scheduler import SchedulerConfig
from hetero_moe.llm import LLM
from hetero_moe.ops.base import BuildContext
from hetero_moe.ops.cpu_linear import CPULinear, CPUQuantKwargs, stacked
from hetero_moe.ops.mlp import MLPKwargs, QuantGatedMLP

ARCHS = ["DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM"]
CTX = BuildContext(config=None, dtype=torch.float32, device=torch.device("cpu"), cpu_threads=2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def int8_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """`x [T, I]` as the kernels see it: per block of `group` inputs, `a = amax / 127`, `round(x / a) * a`."""
    t, n = x.shape
    blocks = F.pad(x.double(), (0, -n % group)).view(t, -1, group)
    a = (blocks.abs().amax(dim=-1, keepdim=True).float() / 127.0).double()
    q = torch.where(a > 0, torch.round(blocks / a.clamp_min(1e-300)).clamp(-127, 127), 0.0)
    return (q * a).view(t, -1)[:, :n]


@pytest.mark.parametrize(("out_dim", "in_dim"), [(40, 72), (130, 300), (1, 33), (257, 64), (48, 200)])
@pytest.mark.parametrize("quant", ["int4", "int8"])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_cpu_linear_is_its_stored_weights(out_dim: int, in_dim: int, quant: str, group: int) -> None:
    """Whole blocks of 16 rows are stored as rows across lanes (on the integer kernels), the others row by row."""
    torch.manual_seed(out_dim + in_dim + group)
    with torch.device("meta"):
        hf = nn.Linear(in_dim, out_dim, bias=True)
    op = CPULinear.from_hf(hf, CTX, CPUQuantKwargs(quant, group))
    w, b = torch.randn(out_dim, in_dim), torch.randn(out_dim)
    op.load_weight("weight", w)
    op.load_weight("bias", b)
    op.finalize()
    assert op.matrix.lanes == (out_dim % 16 == 0 and choose_isa() != "float")
    assert rel(op.weight, w) < (0.15 if quant == "int4" else 0.01)  # what it stores is the format's rounding
    for tokens in (1, 3, 17):
        x = torch.randn(tokens, in_dim)
        ours = op(x)
        assert ours.shape == (tokens, out_dim)
        # the stored weights times int8 activations per block of the group, up to float rounding
        expected = F.linear(int8_activations(x, group), op.weight.double()) + b
        torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)
        assert rel(ours - b, F.linear(x, op.weight)) < 0.05  # and the int8 activations cost a few percent
        assert torch.equal(op(x[:1]), ours[:1])  # a token's result does not depend on the others
    assert (
        op.nbytes()
        == out_dim * (-(-in_dim // group) * group) // (2 if quant == "int4" else 1)
        + 2 * out_dim * (-(-in_dim // group))
        + 4 * out_dim
    )


def cpu_linear(out_dim: int, in_dim: int, kw: CPUQuantKwargs, bias: bool = False, seed: int = 0) -> CPULinear:
    torch.manual_seed(seed)
    with torch.device("meta"):
        hf = nn.Linear(in_dim, out_dim, bias=bias)
    op = CPULinear.from_hf(hf, CTX, kw)
    op.load_weight("weight", torch.randn(out_dim, in_dim))
    if bias:
        op.load_weight("bias", torch.randn(out_dim))
    op.finalize()
    return op


@pytest.mark.parametrize("quant", ["int4", "int8"])
@pytest.mark.parametrize("rows", [(130, 40), (48, 64), (48, 40)], ids=["by-row", "across-lanes", "mixed"])
def test_linears_of_one_input_run_stacked_as_each_alone(quant: str, rows: tuple[int, int]) -> None:
    """Attention's projections of x in one call: the same bits as each linear alone, its weights a view of
    the stack; linears that differ (a bias, another format) are not stacked. Rows across lanes stay so when all
    are; with others they are stored row by row first (the same weights)."""
    kw = CPUQuantKwargs(quant, 64)
    a, b = cpu_linear(rows[0], 300, kw, seed=1), cpu_linear(rows[1], 300, kw, seed=2)
    lanes = a.matrix.lanes and b.matrix.lanes
    weights = [a.weight, b.weight]
    x = torch.randn(3, 300)
    run = stacked([a, b])
    assert a.matrix.lanes == b.matrix.lanes == lanes
    assert torch.equal(a.weight, weights[0]) and torch.equal(b.weight, weights[1])
    alone = [a(x), b(x)]
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(run(x), alone, strict=True))
    assert all(torch.equal(m(x), y) for m, y in zip((a, b), alone, strict=True))  # each still runs alone
    assert np.shares_memory(a.matrix.codes, b.matrix.codes) is False and a.matrix.codes.base is b.matrix.codes.base
    assert stacked([a, cpu_linear(40, 300, kw, bias=True)]) is None
    assert stacked([a, cpu_linear(40, 300, CPUQuantKwargs(quant, 32))]) is None


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_quantized_mlp_is_one_expert_of_its_stored_weights(quant: str) -> None:
    hidden, inter = 72, 97
    with torch.device("meta"):
        hf = nn.Module()
        hf.gate_proj, hf.up_proj = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
        hf.down_proj = nn.Linear(inter, hidden, bias=False)
    op = QuantGatedMLP.from_hf(hf, CTX, MLPKwargs(quant=quant).cpu)
    weights = {p: torch.randn(m.out_features, m.in_features) * 0.2 for p, m in hf.named_children()}
    for p, w in weights.items():
        op.load_weight(f"{p}.weight", w)
    stored = {p: m.dequantize() for p, m in op.parts.items()}
    op.finalize()
    x = torch.randn(5, hidden)
    xq = int8_activations(x, 64)
    h = F.silu(F.linear(xq, stored["gate_proj"].double())) * F.linear(xq, stored["up_proj"].double())
    ref = F.linear(int8_activations(h.float(), 64), stored["down_proj"].double())
    torch.testing.assert_close(op(x).double(), ref, rtol=1e-4, atol=1e-5)
    assert op.nbytes() == sum(m.nbytes() for m in op.parts.values())
    with pytest.raises(ValueError, match="quant must be int4 or int8"):
        MLPKwargs(quant="int3")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rules", ["cpu-only-int4.yaml", "cpu-only-int8.yaml"])
def test_whole_model_quantized_on_the_cpu(tiny, arch: str, rules: str) -> None:
    from hetero_moe.bench.teacher import TeacherForced

    t = tiny(arch)
    exact, quant = LLM(t.path, dtype="float32"), LLM(t.path, rules=rules, dtype="float32")
    ops = {type(m).__name__ for m in quant.placed.model.modules()}
    assert {"CPULinear", "CPUExperts"} <= ops
    prompt = [0, 5, 17, 42, 99, 7, 3, 100]
    ref = TeacherForced(exact.runner, len(prompt)).feed(prompt)
    ours = TeacherForced(quant.runner, len(prompt)).feed(prompt)
    # tiny random models amplify quantization (the note has the figures); unrelated logits would be ~1.4 off
    assert rel(ours, ref) < (1.0 if rules == "cpu-only-int4.yaml" else 0.2)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [prompt, list(range(3, 30)), [9, 8, 7]]
    alone = [quant.generate(p, params).token_ids for p in prompts]
    engine = quant.new_engine(SchedulerConfig(max_batch=3, kv_cache_tokens=256, prefill_chunk=16))
    outs = [[] for _ in prompts]
    for i, step in engine.stream(prompts, [params] * len(prompts)):
        outs[i].append(step.token_id)
    assert outs == alone


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("DeepseekV2ForCausalLM", {}),  # rotary pairs as complex numbers, no low-rank query
        ("DeepseekV3ForCausalLM", {}),  # interleaved pairs, low-rank query
        ("DeepseekV3ForCausalLM", {"rope_interleave": False}),  # halves
    ],
    ids=["v2", "v3", "v3-halves"],
)
def test_latent_decode_fused_on_the_cpu_is_its_per_op_path(tiny, arch: str, overrides: dict) -> None:
    """Decode tokens of absorbed latent attention quantized on the CPU run from projections to o_proj on numpy
    arrays (`decode`), and the layers' residual adds and norms in Numba; teacher-forced, every step's
    logits stay those of the per-op path (torch's modules) within float32 rounding, but for a step or two where
    that rounding moved an int8 activation by one step (the v3-halves model has two such steps, 0.011 and 0.020
    off, since W_UK and W_UV are quantized from the float weight; every other step 1e-7 to 3e-7)."""
    from hetero_moe.bench.teacher import TeacherForced
    from hetero_moe.engine.runner import AddNorm
    from hetero_moe.ops.attention import MLAAttention

    t = tiny(arch, **overrides)
    fused, per_op = (LLM(t.path, rules="cpu-only-int4.yaml", dtype="float32") for _ in range(2))
    attns = [m for m in per_op.placed.model.modules() if isinstance(m, MLAAttention)]
    assert attns and all(m.fused for m in attns)
    assert all(n.fast for pair in fused.runner.add_norms for n in pair)
    for m in attns:
        m.fused = False
    per_op.runner.add_norms = [tuple(AddNorm(n.norm, fast=False) for n in pair) for pair in per_op.runner.add_norms]
    fused.runner.one_call = False  # each layer's calls (the step in one call gives their bits: test_batching)
    calls = []
    for m in fused.placed.model.modules():
        if isinstance(m, MLAAttention):
            m.decode = lambda *args, run=m.decode: calls.append(1) or run(*args)
    ids = [0, 5, 17, 42, 99, 7, 3, 100, 200, 11, 64, 1, 2, 3, 250, 251, 9, 8, 30, 31]
    caches = [TeacherForced(m.runner, len(ids)) for m in (per_op, fused)]
    errors = []
    for chunk in (ids[:7], *[[tok] for tok in ids[7:]]):  # prefill, then decode
        a, b = (c.feed(chunk) for c in caches)
        errors.append(rel(b, a))
        assert a.argmax() == b.argmax()
    assert len(calls) == len(attns) * (len(ids) - 7)  # every decode token, every layer
    assert sorted(errors)[len(errors) // 2] < 1e-6, errors  # float32 rounding
    assert sum(e > 1e-4 for e in errors) <= 2 and max(errors) < 0.05, errors  # an int8 activation moved a step
