"""Qwen3.5-MoE and Qwen3-Next (issue 17, part 5): linear-attention layers (Gated DeltaNet) with a conv and a
recurrent state per sequence in engine slots, beside the paged KV cache of the gated full-attention
layers. Against transformers' own implementation: greedy output token for token on tiny sharded
checkpoints (cpu-only.yaml, float32), prompts prefilled whole and in chunks; per-position logits through
prefill, a chunk over the state and decode; batched = alone through the server; preempted requests
resumed by recomputation; the shipped GPU rules on the real-size configs."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hetero_moe.kernels import gated_delta as gd
from test_new_archs import assert_batched_equals_alone, int4_expert_bytes, real_config_report

from hetero_moe.engine.sampler import SamplingParams
from hetero_moe.engine.scheduler import SchedulerConfig
from hetero_moe.engine.state import StateSlots
from hetero_moe.llm import LLM
from hetero_moe.ops.linear_attention import GatedDeltaNet, RecurrentState
from hetero_moe.synth import tiny as synth

QWEN35, NEXT = "Qwen3_5MoeForCausalLM", "Qwen3NextForCausalLM"
PROMPT = [0, 5, 17, 42, 99, 7, 3, 100, 200, 11, 64]
LONG = [(7 * i + 3) % 400 + 3 for i in range(150)]  # more than two of the delta rule's 64-token chunks


@pytest.fixture(scope="module")
def models(tiny) -> dict:
    """Tiny checkpoints in three shards, and an engine over each with a small prefill chunk."""
    built = {}
    for arch in (QWEN35, NEXT):
        t = tiny(arch, shards=3)
        llm = LLM(t.path, rules="cpu-only.yaml", dtype="float32", batching=SchedulerConfig(prefill_chunk=48))
        built[arch] = (t, llm)
    return built


@pytest.mark.parametrize("arch", [QWEN35, NEXT])
def test_greedy_matches_transformers(models, hf_greedy, arch: str) -> None:
    """The short prompt in one step; the long one in chunks of 48 tokens (cut inside the delta rule's chunks
    of 64), each continuing from the conv and recurrent state the last one left."""
    t, llm = models[arch]
    for prompt in (PROMPT, LONG):
        ours = llm.generate(prompt, max_tokens=40, temperature=0, ignore_eos=True).token_ids
        assert ours == hf_greedy(t.reference, prompt, 40)
        assert len(set(ours)) > 10
    assert llm.engine.stats().steps_total > 80  # the long prompt took 4 prefill steps


def test_logits_per_position_match_transformers(models) -> None:
    """Prefill, a chunk over the state (shorter than the conv kernel too), then decode: each position's logits
    equal those of transformers' forward over the whole sequence."""
    from hetero_moe.bench.teacher import TeacherForced

    t, llm = models[QWEN35]
    ids = PROMPT + list(range(120, 150))
    with torch.no_grad():
        ref = t.reference(torch.tensor([ids])).logits[0]
    cache = TeacherForced(llm.runner, len(ids))
    end = 0
    for chunk in (ids[:6], ids[6:8], ids[8:20], *[[tok] for tok in ids[20:]]):
        end += len(chunk)
        torch.testing.assert_close(cache.feed(chunk), ref[end - 1], rtol=1e-4, atol=1e-4)


def test_delta_rule_forms_agree_with_the_token_by_token_recurrence() -> None:
    """Awkward shapes (3 key heads of 5 dims, 2 value heads each of 7 dims, 70 tokens): the chunked form,
    whole or split at 37 tokens with the state carried over, equals the plain recurrence, and the conv
    continued from its state equals one convolution over all tokens."""
    g = torch.Generator().manual_seed(0)
    b, t, hk, hv, dk, dv = 2, 70, 3, 6, 5, 7
    q, k = torch.randn(b, t, hk, dk, generator=g), torch.randn(b, t, hk, dk, generator=g)
    v = torch.randn(b, t, hv, dv, generator=g)
    decay, beta = -torch.rand(b, t, hv, generator=g), torch.rand(b, t, hv, generator=g)
    ref, ref_state = gd.recurrent_gated_delta(q, k, v, decay, beta, torch.zeros(b, hv, dk, dv))
    whole, state = gd.chunk_gated_delta(q, k, v, decay, beta, None)
    torch.testing.assert_close(whole, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state, ref_state, rtol=1e-4, atol=1e-5)
    first, mid = gd.chunk_gated_delta(*(x[:, :37] for x in (q, k, v, decay, beta)), None)
    rest, end = gd.chunk_gated_delta(*(x[:, 37:] for x in (q, k, v, decay, beta)), mid)
    torch.testing.assert_close(torch.cat((first, rest), dim=1), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(end, ref_state, rtol=1e-4, atol=1e-5)

    x, weight = torch.randn(b, 9, t, generator=g), torch.randn(9, 4, generator=g)
    full = torch.nn.functional.silu(torch.nn.functional.conv1d(x, weight[:, None], padding=3, groups=9)[..., :t])
    a, conv = gd.causal_conv(x[..., :37], torch.zeros(b, 9, 3), weight)
    c, conv = gd.causal_conv(x[..., 37:38], conv, weight)
    d, conv = gd.causal_conv(x[..., 38:], conv, weight)
    torch.testing.assert_close(torch.cat((a, c, d), dim=-1), full)
    assert torch.equal(conv, x[..., -3:])
    with pytest.raises(ValueError, match="does not fit"):
        gd.causal_conv(x, torch.zeros(b, 9, 4), weight)


def test_state_lives_in_slots_beside_the_kv_cache(models) -> None:
    _, llm = models[QWEN35]
    engine = llm.engine
    assert engine.config.prefix_cache is False and engine.pool.prefix_cache is False
    mixers = llm.runner.mixers
    assert [type(m).__name__ for m in mixers] == ["GatedDeltaNet", "GQAAttention", "GatedDeltaNet"]
    state = engine.pool.buffers[0]
    assert isinstance(state, RecurrentState)
    slots = engine.config.max_batch
    assert tuple(state.conv.shape) == (slots, 2 * 2 * 12 + 6 * 10, 3) and tuple(state.ssm.shape) == (slots, 6, 12, 10)
    assert mixers[0].cache_bytes(100, torch.float32) == 0
    assert mixers[0].state_bytes(2, torch.float32) == 2 * (108 * 3 + 6 * 12 * 10) * 4
    # a request holds a slot while it runs; abort and finish give it back
    request_id = engine.add_request(PROMPT, SamplingParams(max_tokens=5, temperature=0))
    engine.step()
    assert engine.scheduler.slots.used == 1
    assert engine.abort(request_id) and engine.scheduler.slots.used == 0
    llm.generate(PROMPT, max_tokens=3, temperature=0)
    assert engine.scheduler.slots.used == 0


def test_state_slots_refuse_misuse() -> None:
    slots = StateSlots(2)
    assert [slots.take(), slots.take()] == [0, 1]
    with pytest.raises(RuntimeError, match="all 2 recurrent-state slots are taken"):
        slots.take()
    slots.release(1)
    with pytest.raises(ValueError, match="slot 1 is not taken"):
        slots.release(1)
    with pytest.raises(ValueError, match="at least 1"):
        StateSlots(0)


def test_prefix_cache_is_off_with_a_log_line(tiny, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="hetero_moe.engine.engine"):
        llm = LLM(tiny(QWEN35, shards=3).path, rules="cpu-only.yaml", dtype="float32")
    assert llm.engine.config.prefix_cache is False
    assert any("prefix cache off" in r.getMessage() for r in caplog.records)
    first = llm.generate(LONG[:40], max_tokens=4, temperature=0)
    again = llm.generate(LONG[:40], max_tokens=4, temperature=0)
    assert first.token_ids == again.token_ids and llm.engine.stats().prefix_hit_tokens_total == 0


def test_preempted_requests_resume_with_identical_output(models) -> None:
    """A pool of 48 tokens for three requests of up to 34: the youngest are preempted (their slot and pages
    freed) and recompute their state from their tokens when they come back."""
    t, alone_llm = models[QWEN35]
    prompts = [PROMPT, LONG[:14], LONG[20:32]]
    alone = [alone_llm.generate(p, max_tokens=20, temperature=0, ignore_eos=True).token_ids for p in prompts]
    tight = SchedulerConfig(max_batch=3, kv_cache_tokens=48, page_tokens=4, prefill_chunk=16)
    llm = LLM(t.path, rules="cpu-only.yaml", dtype="float32", batching=tight)
    together = llm.generate(prompts, max_tokens=20, temperature=0, ignore_eos=True)
    assert [c.token_ids for c in together] == alone
    assert llm.engine.stats().preempted_total > 0
    assert llm.engine.scheduler.slots.used == 0 and llm.engine.pool.used_pages == 0


def test_batched_equals_alone_through_the_server(models) -> None:
    """Four concurrent clients per architecture, through 4-token pages and 7-token prefill chunks: prompts
    prefilled in pieces beside other requests' decode steps, decodes of several sequences in one step."""
    for arch, (_, llm) in models.items():
        assert_batched_equals_alone(llm, arch)


def test_op_refuses_what_it_cannot_run(tiny) -> None:
    from hetero_moe.ops.base import BuildContext

    model = synth.random_model(synth.tiny_config(QWEN35))
    hf = model.model.layers[0].linear_attn
    ctx = BuildContext(model.config, torch.float32, torch.device("cpu"))
    hf.activation = "gelu"
    with pytest.raises(ValueError, match="takes silu, got 'gelu'"):
        GatedDeltaNet(hf, ctx)


@pytest.mark.parametrize(
    ("model", "layers", "experts", "hidden", "inter", "gpu", "cache"),
    [
        # 45 linear-attention layers' state per sequence: 64 heads of 128 x 128 float32, conv 12288 x 3 bf16
        ("qwen3.5-moe", 60, 512, 4096, 1024, 11987784192, 15 * 8192 * 2048 + 45 * (64 * 128 * 128 * 4 + 12288 * 6)),
        ("qwen3-next", 48, 512, 2048, 512, 3044261376, 12 * 8192 * 2048 + 36 * (32 * 128 * 128 * 4 + 8192 * 6)),
    ],
)
def test_real_configs_on_the_shipped_rules(capsys, model, layers, experts, hidden, inter, gpu, cache) -> None:
    from hetero_moe.cli import main

    report = real_config_report(capsys, model, "qwen3.5-moe.yaml")
    assert report["devices"] == {"cpu": layers * experts * int4_expert_bytes(hidden, inter), "cuda:0": gpu}
    ops = {m["name"]: m["op"] for m in report["modules"]}
    assert ops["model.layers.0.linear_attn"] == "linear_attention" and ops["model.layers.3.self_attn"] == "attention"
    assert main(["rules", "check", "--model", model, "--rules", "qwen3.5-moe.yaml", "--json",
                 "--max-context", "8192"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["kv_cache"] == {"cuda:0": cache}


@pytest.mark.parametrize(("model", "gpu"), [("qwen3.5-moe", "16"), ("qwen3-next", "5")])
def test_plan_writes_rules_for_the_real_configs(capsys, tmp_path, model: str, gpu: str) -> None:
    """GPUs too small for bf16 linears: FP8 ones, the linear-attention layers' projections among them."""
    from hetero_moe.cli import main

    out = tmp_path / "plan.yaml"
    argv = ["plan", "--model", model, "--gpu-memory", gpu, "--cpu-memory", "400", "--gpu-fp8", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    report = real_config_report(capsys, model, str(out))
    ops = {m["name"]: m["op"] for m in report["modules"]}
    assert ops["model.layers.0.linear_attn"] == "linear_attention"
    assert ops["model.layers.0.linear_attn.out_proj"] == "linear" and ops["model.layers.0.mlp.shared_expert"] == "mlp"
    assert [op for name, op in ops.items() if name.endswith(".mlp.experts")].count("cpu_experts") > 40
