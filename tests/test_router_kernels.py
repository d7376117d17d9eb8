"""Routers in Numba (`kernels/numba/router.py`) against float64 references of each router's math, and MoE blocks
on the quantized CPU kernels, which route with them, against the same blocks routed by torch."""

from __future__ import annotations

import numpy as np
import pytest
from hetero_moe.kernels.numba import router
from hetero_moe.kernels.numba.simd import choose_isa

from hetero_moe.llm import LLM
from hetero_moe.ops.moe import MoEBlock


def test_logits_are_each_tokens_dot_with_each_expert() -> None:
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((5, 67), np.float32), rng.standard_normal((9, 67), np.float32)
    out = np.empty((5, 9), np.float32)
    router.logits(x, w, out)
    np.testing.assert_allclose(out, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-5)
    alone = np.empty((1, 9), np.float32)
    router.logits(x[3:4], w, alone)
    assert np.array_equal(alone[0], out[3]), "a token's logits depend on the tokens beside it"


def reference(logits, bias, scoring, num_group, topk_group, group_score, renorm, eps, scaling, k):
    """float64, one token at a time, as the torch routers compute it (masked groups out of the choice)."""
    weights, index = [], []
    for row in logits.astype(np.float64):
        if scoring == router.SOFTMAX:
            scores = np.exp(row - row.max())
            scores /= scores.sum()
        else:
            scores = 1 / (1 + np.exp(-row))
        choice = scores + bias
        if topk_group < num_group:
            groups = choice.reshape(num_group, -1)
            best = np.sort(groups, axis=1)[:, ::-1]
            score = best[:, 0] if group_score == router.GROUP_MAX else best[:, 0] + best[:, 1]
            keep = np.argsort(-score, kind="stable")[:topk_group]
            mask = np.full(num_group, -np.inf)
            mask[keep] = 0
            choice = (groups + mask[:, None]).reshape(-1)
        chosen = np.argsort(-choice, kind="stable")[:k]
        w = scores[chosen]
        if renorm:
            w = w / (w.sum() + eps)
        weights.append(w * scaling)
        index.append(chosen)
    return np.array(weights), np.array(index)


ROUTERS = {  # (scoring, num_group, topk_group, group_score, renorm, eps, scaling) of each router class
    "deepseek-v2 greedy": (router.SOFTMAX, 1, 1, router.GROUP_MAX, False, 0.0, 16.0),
    "deepseek-v2 group_limited_greedy": (router.SOFTMAX, 8, 3, router.GROUP_MAX, False, 0.0, 1.0),
    "deepseek-v3": (router.SIGMOID, 8, 4, router.GROUP_TOP2, True, 1e-20, 2.5),
    "qwen3 (renormalised)": (router.SOFTMAX, 1, 1, router.GROUP_MAX, True, 0.0, 1.0),
    "mixtral": (router.SOFTMAX, 1, 1, router.GROUP_MAX, True, 0.0, 1.0),
}


@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("t", [1, 17])
def test_route_chooses_and_weights_as_each_router(name: str, t: int) -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((t, 64), np.float32) * 3
    bias = (rng.standard_normal(64) * 0.1).astype(np.float32) if "v3" in name else np.zeros(64, np.float32)
    spec, k = ROUTERS[name], 6
    weights, index = np.empty((t, k), np.float32), np.empty((t, k), np.int64)
    router.route(logits, bias, *spec, weights, index)
    ref_w, ref_i = reference(logits, bias, *spec, k)
    assert np.array_equal(index, ref_i)  # in descending order of the choice
    np.testing.assert_allclose(weights, ref_w, rtol=2e-6)


@pytest.mark.parametrize("name", list(ROUTERS))
def test_select_is_logits_then_route(name: str) -> None:
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((5, 200), np.float32), rng.standard_normal((64, 200), np.float32)
    bias = (rng.standard_normal(64) * 0.1).astype(np.float32)
    spec, k = ROUTERS[name], 6
    logits = np.empty((5, 64), np.float32)
    router.logits(x, w, logits)
    weights, index = np.empty((5, k), np.float32), np.empty((5, k), np.int64)
    router.route(logits, bias, *spec, weights, index)
    weights2, index2 = np.empty((5, k), np.float32), np.empty((5, k), np.int64)
    router.select(x, w, bias, *spec, weights2, index2)
    assert np.array_equal(index2, index) and np.array_equal(weights2, weights)


def test_route_keeps_only_the_best_groups_and_breaks_ties_by_the_lower_index() -> None:
    logits = np.zeros((1, 8), np.float32)
    logits[0, [1, 6]] = 5.0  # 4 groups of 2: groups 0 and 3 score best, and tie
    weights, index = np.empty((1, 3), np.float32), np.empty((1, 3), np.int64)
    spec = (router.SOFTMAX, 4, 2, router.GROUP_MAX, False, 0.0, 1.0)
    router.route(logits, np.zeros(8, np.float32), *spec, weights, index)
    assert index[0].tolist() == [1, 6, 0]  # groups 0 and 3 kept; the tie at 0 goes to expert 0, not 7


@pytest.mark.parametrize(
    "arch", ["DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM"]
)
def test_moe_blocks_on_the_quantized_cpu_kernels_route_in_numba(tiny, arch: str) -> None:
    """Under `cpu-only-int4.yaml` every MoE block runs on numpy arrays with the Numba router; teacher-forced, its
    logits stay those of the same model with its blocks routed by torch, within float32 rounding."""
    from hetero_moe.bench.teacher import TeacherForced

    t = tiny(arch)
    numba_lane, torch_lane = (LLM(t.path, rules="cpu-only-int4.yaml", dtype="float32") for _ in range(2))
    blocks = [m for m in torch_lane.placed.model.modules() if isinstance(m, MoEBlock)]
    assert blocks and all(b.numpy_lane for b in blocks)
    for b in blocks:
        b._forward = b._sequential
    ids = [0, 5, 17, 42, 99, 7, 3, 100, 200, 11, 64, 1, 2, 3, 250]
    caches = [TeacherForced(m.runner, len(ids)) for m in (torch_lane, numba_lane)]
    for chunk in (ids[:7], *[[tok] for tok in ids[7:]]):  # prefill, then decode
        a, b = (c.feed(chunk) for c in caches)
        assert (b - a).norm() / a.norm() < 1e-4
    exact = LLM(t.path, dtype="float32")  # float experts: transformers' bits, torch's routers
    assert not any(isinstance(m, MoEBlock) and m.numpy_lane for m in exact.placed.model.modules())
    for llm in (numba_lane, torch_lane, exact):
        llm.close()


def test_bfloat16_blocks_keep_torch_routing(tiny) -> None:
    llm = LLM(tiny("DeepseekV2ForCausalLM").path, rules="cpu-only-int4.yaml", dtype="bfloat16")
    blocks = [m for m in llm.placed.model.modules() if isinstance(m, MoEBlock)]
    assert blocks and not any(b.numpy_lane for b in blocks)
    llm.close()


@pytest.mark.skipif(choose_isa() == "float", reason="the integer kernels' bound arguments")
@pytest.mark.parametrize("arch", ["DeepseekV2ForCausalLM", "Qwen3MoeForCausalLM"], ids=["shared", "no-shared"])
def test_moe_block_in_one_call_is_its_kernels_called_one_by_one(tiny, arch: str) -> None:
    """A MoE block on numpy arrays runs in one kernel call (`kernels/numba/moe.py`): router, routed experts and
    shared experts with the bits of the same kernels called one after another from Python, and the same count of
    streamed bytes."""
    llm = LLM(tiny(arch).path, rules="cpu-only-int4.yaml", dtype="float32")
    blocks = [m for m in llm.placed.model.modules() if isinstance(m, MoEBlock)]
    assert blocks and all(b._block_args is not None for b in blocks)
    rng = np.random.default_rng(4)
    for b in blocks:
        for t in (1, 3):
            x = rng.standard_normal((t, b.experts.hidden), np.float32)
            before = b.experts.bytes_streamed
            one_call = b.run(x)
            streamed = b.experts.bytes_streamed - before
            bound = b._block_args
            b._block_args = None  # the kernels one by one
            assert np.array_equal(b.run(x), one_call)
            assert b.experts.bytes_streamed - before == 2 * streamed > 0
            b._block_args = bound
    llm.close()
