"""Continuous batching: concurrent requests give exactly what each gives alone, through chunked
prefill, paged cache and preemption; the pool is bounded and always returns to empty; the server
serves 32 streaming clients at once."""

from __future__ import annotations

import random
import threading
from importlib import resources
from pathlib import Path

import httpx
import openai
import pytest
import torch
from test_server import MODEL, serving

from hetero_moe.engine.engine import Engine
from hetero_moe.engine.kv_cache import KVPool
from hetero_moe.engine.request import ContextLengthError
from hetero_moe.engine.sampler import SamplingParams
from hetero_moe.engine.scheduler import SchedulerConfig
from hetero_moe.llm import LLM
from hetero_moe.ops.moe import MoEBlock, router_logits

PROMPTS = [
    [0, 5, 17, 42, 99, 7, 3, 100, 200, 11, 64],
    list(range(3, 40)),
    [9, 8, 7],
    list(range(50, 120, 3)),
    [1, 1],
    list(range(100, 300, 7)),
]
GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


def run_all(engine: Engine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    outs: list[list[int]] = [[] for _ in prompts]
    for i, step in engine.stream(prompts, [params] * len(prompts)):
        outs[i].append(step.token_id)
    return outs


def idle(engine: Engine) -> bool:
    stats = engine.stats()
    return stats.kv_cache_used_tokens == 0 and stats.running == 0 and stats.waiting == 0 and not engine.has_work()


CONFIGS = {
    "roomy": SchedulerConfig(max_batch=8, kv_cache_tokens=4096, prefill_chunk=16, page_tokens=4),
    # 3 at a time, 12 pages of 8 tokens for six requests of up to 48 tokens: preemption and recompute
    "tight": SchedulerConfig(max_batch=3, kv_cache_tokens=96, prefill_chunk=7, page_tokens=8),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tokens_router_logits_do_not_depend_on_its_batch(dtype: torch.dtype) -> None:
    # torch's CPU GEMM sums one row differently from two or more (and from sixteen or more): routing on it
    # let int8 activations turn a last bit into another token when requests were batched
    g = torch.Generator().manual_seed(0)
    x, w, bias = (torch.randn(*shape, generator=g).to(dtype) for shape in ((40, 2048), (64, 2048), (64,)))
    every = router_logits(x, w, bias)
    for n in (1, 2, 3, 16, 17, 40):
        assert torch.equal(router_logits(x[:n], w, bias), every[:n])
        assert torch.equal(router_logits(x[n - 1 : n], w, bias), every[n - 1 : n])
    tol = 1e-4 if dtype == torch.float32 else 0.5
    torch.testing.assert_close(every, torch.nn.functional.linear(x, w, bias), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "arch", ["DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM"]
)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_batched_greedy_equals_alone(tiny, arch: str, config: str) -> None:
    llm = LLM(tiny(arch).path, dtype="float32")
    alone = [llm.generate(p, GREEDY).token_ids for p in PROMPTS]
    engine = llm.new_engine(CONFIGS[config])
    assert run_all(engine, PROMPTS) == alone
    assert idle(engine)
    assert (engine.stats().preempted_total > 0) == (config == "tight")


def test_int4_experts_batched_equal_alone_and_see_every_token_of_the_step(tiny) -> None:
    """The CPU experts get all tokens of a step in one call (grouped by expert inside, each selected
    expert streamed once), and the batch changes no request's tokens."""
    llm = LLM(tiny("DeepseekV2ForCausalLM").path, rules="cpu-only-int4.yaml", dtype="float32")
    alone = [llm.generate(p, GREEDY).token_ids for p in PROMPTS]
    block = next(m for m in llm.placed.model.modules() if isinstance(m, MoEBlock))
    assert block.numpy_lane  # the block's `run`, on numpy arrays
    llm.runner.one_call = False  # the calls of each layer, to count (the step in one call gives their bits)
    calls: list[int] = []
    run = block.run
    block.run = lambda x: calls.append(x.shape[0]) or run(x)
    try:
        engine = llm.new_engine(SchedulerConfig(max_batch=8, prefill_chunk=512, kv_cache_tokens=1024))
        assert run_all(engine, PROMPTS) == alone
    finally:
        del block.run
    # step 1 prefills all six prompts together, then every step decodes all six in one call
    assert calls[0] == sum(len(p) for p in PROMPTS) and calls[1:] == [len(PROMPTS)] * (GREEDY.max_tokens - 1)
    stats = engine.stats()
    assert stats.decode_steps_total == GREEDY.max_tokens - 1 == stats.steps_total - 1
    assert stats.decode_step_tokens_total == len(PROMPTS) * stats.decode_steps_total
    per_expert = block.experts.nbytes() // block.experts.num_experts
    decode_bytes = stats.decode_routed_expert_bytes_total
    layers = sum(isinstance(m, MoEBlock) for m in llm.placed.model.modules())
    # distinct experts per layer and step: at least top-k (six tokens), at most all of them
    loads = decode_bytes // per_expert
    assert decode_bytes % per_expert == 0
    assert block.gate.top_k * layers * stats.decode_steps_total <= loads
    assert loads <= block.experts.num_experts * layers * stats.decode_steps_total


# Layer 3's MoE block in INT8 where the others are INT4: runs of layers with the same formats, a call each
INT8_LAYER_3 = r"""- match: {name: '^model\.layers\.3\.mlp\.experts$'}
  replace: {op: cpu_experts, device: cpu, kwargs: {quant: int8, group_size: 32}}
  recursive: false
- match: {name: '^model\.layers\.3\.mlp\.shared_experts$'}
  replace: {op: mlp, kwargs: {quant: int8, group_size: 32}}
  recursive: false
"""


@pytest.mark.parametrize(
    ("arch", "overrides", "rules", "calls_a_step"),
    [
        ("DeepseekV2ForCausalLM", {}, "", 1),
        # layers 0-2, 3 and 4: runs without a dense layer, a low-rank query
        ("DeepseekV3ForCausalLM", {"num_hidden_layers": 5}, INT8_LAYER_3, 3),
    ],
    ids=["v2", "v3-int8-layer-3"],
)
def test_decode_step_in_one_call_equals_its_layers_called_one_by_one(
    tiny, tmp_path, monkeypatch: pytest.MonkeyPatch, arch: str, overrides: dict, rules: str, calls_a_step: int
) -> None:
    """A numpy decode step in one kernel call (`decoder.step`) gives the logits of its layers' calls one by one,
    bit for bit, alone and in a batch, with a low-rank query (V3) or not; it counts the same routed expert bytes.
    Layers whose formats differ go in one call per run of layers with the same (a run without a dense layer takes
    stand-in types for it)."""
    from hetero_moe.kernels.numba import decoder

    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules + (resources.files("hetero_moe.rules") / "cpu-only-int4.yaml").read_text())
    llm = LLM(tiny(arch, **overrides).path, rules=rules_file, dtype="float32")
    runner = llm.runner
    calls: dict[str, list] = {"step": [], "layers": [], "logits": []}

    def spy(name: str, fn):
        return lambda *args: calls[name].append(args[0].shape[0]) or fn(*args)

    monkeypatch.setattr(decoder, "step", spy("step", decoder.step))
    monkeypatch.setattr(runner, "_numpy_layers", spy("layers", runner._numpy_layers))
    forward = runner.forward
    monkeypatch.setattr(runner, "forward", lambda *args: calls["logits"].append(forward(*args)) or calls["logits"][-1])
    runs = {}
    for one_call in (True, False):
        runner.one_call = one_call
        engine = llm.new_engine(SchedulerConfig(max_batch=3, kv_cache_tokens=1024, prefill_chunk=512))
        tokens = run_all(engine, PROMPTS[:4])
        runs[one_call] = tokens, engine.stats().decode_routed_expert_bytes_total, dict(calls)
        calls = {name: [] for name in calls}
    (tokens, streamed, one), (tokens_apart, streamed_apart, apart) = runs[True], runs[False]
    assert tokens == tokens_apart and streamed == streamed_apart > 0
    assert len(one["logits"]) == len(apart["logits"]) and all(map(torch.equal, one["logits"], apart["logits"]))
    # every decode step in one call a run, three tokens at once and one alone
    assert one["step"] == [t for t in apart["layers"] for _ in range(calls_a_step)]
    assert not one["layers"] and not apart["step"] and {1, 3} <= set(one["step"])
    assert len(runner._one_call.runs) == calls_a_step


def test_pool_pages_and_rows() -> None:
    pool = KVPool([], pages=6, page_tokens=4)
    a, b = [], []
    assert pool.reserve(a, 5) and a == [0, 1]
    assert pool.reserve(b, 4) and b == [2]
    assert pool.rows(a, 0, 5) == slice(0, 5)  # contiguous pages: a view
    assert pool.reserve(a, 9) and a == [0, 1, 3]
    rows = pool.rows(a, 6, 10)  # crosses from page 1 into page 3: gathered
    assert rows.tolist() == [6, 7, 12, 13]
    assert not pool.reserve(b, 4 * 4) and b == [2]  # needs 3 more pages, 2 free: nothing taken
    pool.release(a)
    assert a == [] and pool.used_pages == 1


def test_admission_and_cancellation(tiny) -> None:
    llm = LLM(tiny("Qwen3MoeForCausalLM").path, dtype="float32")
    engine = llm.new_engine(SchedulerConfig(max_batch=4, kv_cache_tokens=64, page_tokens=16))
    with pytest.raises(ContextLengthError, match="needs up to 70 tokens of KV cache.*holds 64"):
        engine.add_request(list(range(10)), SamplingParams(max_tokens=60))
    request = engine.add_request(list(range(10)), SamplingParams(max_tokens=40, ignore_eos=True))
    seen = []
    while len(seen) < 3:  # the client goes away after three tokens
        seen += [e.output.token_id for e in engine.step() if e.request_id == request]
    assert engine.abort(request) and not engine.abort(request)
    assert engine.step() == [] and idle(engine) and engine.stats().cancelled_total == 1
    with pytest.raises(ValueError, match="max_batch must be a positive integer"):
        SchedulerConfig(max_batch=0)


def test_generate_a_list_of_prompts_equals_each_alone(tiny) -> None:
    """`LLM.generate` on prompts of different lengths runs them through the engine together, in input order."""
    for arch in ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM"):
        llm = LLM(tiny(arch).path, dtype="float32")
        prompts = [PROMPTS[i % len(PROMPTS)][: 3 + 5 * i] for i in range(8)]
        alone = [llm.generate(p, GREEDY) for p in prompts]
        together = llm.generate(prompts, GREEDY)
        assert [c.token_ids for c in together] == [c.token_ids for c in alone]
        assert [c.prompt_token_ids for c in together] == prompts
        streamed = [[] for _ in prompts]
        for i, step in llm.stream(prompts, GREEDY):
            streamed[i].append(step.token_id)
        assert streamed == [c.token_ids for c in alone] and idle(llm.engine)
    chats = [[{"role": "user", "content": t}] for t in ("hello", "tell me more about experts", "x")]
    assert [c.text for c in llm.chat(chats, max_tokens=5, temperature=0)] == [
        llm.chat(c, max_tokens=5, temperature=0).text for c in chats
    ]


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def test_32_streaming_clients(tiny) -> None:
    llm = LLM(tiny("DeepseekV3ForCausalLM").path, dtype="float32")
    llm.eos_ids = llm.engine.eos_ids = frozenset()  # every request runs to max_tokens
    prompts = [f"client {i} says {'hello ' * (i % 5)}" for i in range(32)]
    alone = [llm.generate(p, max_tokens=12, temperature=0).text for p in prompts]
    batching = SchedulerConfig(max_batch=16, kv_cache_tokens=2048, prefill_chunk=64, page_tokens=16)
    with serving(llm, batching=batching, max_queue=64) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

        def one(i: int, leave_after: int | None, results: dict) -> None:
            stream = client.completions.create(
                model=MODEL, prompt=prompts[i], max_tokens=12, temperature=0, stream=True
            )
            text = []
            for n, chunk in enumerate(stream):
                text.append(chunk.choices[0].text)
                if leave_after is not None and n + 1 >= leave_after:
                    stream.close()  # the client disconnects mid-stream
                    break
            results[i] = "".join(text)

        def round_of_clients(seed: int) -> dict[int, str]:
            rng = random.Random(seed)
            leaving = {i: rng.randint(1, 8) for i in rng.sample(range(32), 8)}
            results: dict[int, str] = {}
            threads = [threading.Thread(target=one, args=(i, leaving.get(i), results)) for i in range(32)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            assert len(results) == 32
            for i, text in results.items():
                if i in leaving:
                    assert alone[i].startswith(text)  # what it saw is its own, before it left
                else:
                    assert text == alone[i]  # nobody else's tokens, none missing
            return results

        round_of_clients(0)
        before = _rss()
        round_of_clients(1)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert "hetero_moe_kv_cache_used_tokens 0" in metrics and "hetero_moe_running_requests 0" in metrics
        assert "hetero_moe_kv_cache_capacity_tokens 2048" in metrics
        assert _rss() - before < 64 << 20  # flat: a second round of 32 clients leaves no memory behind


def test_bench_serve_against_a_running_server(tiny, capsys) -> None:
    from hetero_moe.bench import serve as bench_serve
    from hetero_moe.cli import main

    llm = LLM(tiny("DeepseekV2ForCausalLM").path, rules="cpu-only-int4.yaml", dtype="float32")
    with serving(llm, batching=SchedulerConfig(max_batch=4, kv_cache_tokens=1024)) as url:
        report = bench_serve.run(url, [1, 4], prompt_tokens=8, max_tokens=6)
        assert (
            main(["bench", "serve", "--url", url, "--concurrency", "2", "--prompt-tokens", "4", "--max-tokens", "3"])
            == 0
        )
    assert "roofline" in capsys.readouterr().out
    one, four = report["levels"]
    assert one["concurrency"] == 1 and four["concurrency"] == 4
    # one prefill step and five decode steps alone; the four share steps: fewer than four requests' one after
    # another (how many depends on when each arrives: on a busy machine the server steps between arrivals)
    assert one["steps"] == 6 and 6 <= four["steps"] < 4 * 6
    # decode-only steps: one token each alone; the four (mostly together) touch more distinct experts
    assert one["decode_steps"] == 5 and one["tokens_per_decode_step"] == 1
    assert 1 < four["tokens_per_decode_step"] <= 4
    assert one["routed_bytes_per_decode_step"] < four["routed_bytes_per_decode_step"]
    for level in report["levels"]:
        assert level["aggregate_tok_s"] > 0 and level["ttft_s"]["max"] >= level["ttft_s"]["mean"] > 0
        assert level["share_of_roofline"] == pytest.approx(
            level["aggregate_decode_tok_s"] / level["batched_roofline_tok_s"]
        )
    assert main(["bench", "serve", "--url", "http://127.0.0.1:9", "--concurrency", "1"]) == 2


def test_default_pool_fits_the_free_memory(tiny) -> None:
    from hetero_moe.engine.kv_cache import cache_bytes_per_token, default_pool_tokens
    from hetero_moe.settings import RESERVES, available_memory, total_memory

    llm = LLM(tiny("MixtralForCausalLM").path, dtype="float32")
    per_token = cache_bytes_per_token(llm.runner.layers, torch.float32)
    assert default_pool_tokens(per_token, 100) == 96  # whole pages
    huge = default_pool_tokens(per_token, 10**15)
    usable = RESERVES["cpu"].usable(available_memory(), total_memory())
    assert 0 < huge <= usable / per_token[torch.device("cpu")]
    assert default_pool_tokens(per_token, 10**15, mapped_cpu_bytes=10**9) < huge  # mapped weights count as taken
    assert llm.engine.pool.capacity == min(16 * llm.max_context, huge)


@pytest.mark.parametrize("arch", ["DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV32ForCausalLM"])
def test_absorbed_latent_decode_batched_in_one_kernel_launch_equals_alone(
    tiny, tmp_path, triton_on_cpu, arch: str
) -> None:
    """With `absorb`, the decode tokens of a step go through one launch of the latent kernel (Triton; its
    interpreter here) over their gathered cache rows, with a fixed number of rows per split, so each
    request's tokens are those it gets alone."""
    from hetero_moe.ops.attention import MLAAttention

    text = (resources.files("hetero_moe.rules") / "cpu-only.yaml").read_text()
    rules = tmp_path / "absorb.yaml"
    rules.write_text(text.replace("replace: {op: attention}", "replace: {op: attention, kwargs: {absorb: true}}"))
    llm = LLM(tiny(arch).path, rules=str(rules), dtype="float32")
    attn = next(m for m in llm.placed.model.modules() if isinstance(m, MLAAttention))
    assert attn.absorb and attn.kernel
    launches = []
    handle = attn.register_forward_hook(lambda m, args, out: launches.append(args[0].shape[0]))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = PROMPTS[:4]
    alone = [llm.generate(p, params).token_ids for p in prompts]
    launches.clear()
    engine = llm.new_engine(SchedulerConfig(max_batch=4, kv_cache_tokens=512, page_tokens=8))
    try:
        assert run_all(engine, prompts, params) == alone
    finally:
        handle.remove()
    assert launches.count(len(prompts)) == params.max_tokens - 1  # every decode step: all four together
