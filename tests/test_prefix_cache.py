"""Prefix caching: shared, reference-counted pages of identical prefixes; outputs identical with the cache
on and off, through preemption, eviction and the host tier; every count back to idle afterwards."""

from __future__ import annotations

import pytest

from hetero_moe.engine.engine import Engine
from hetero_moe.engine.sampler import SamplingParams
from hetero_moe.engine.scheduler import SchedulerConfig
from hetero_moe.llm import LLM

ARCHS = ["DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM"]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SYSTEM = list(range(7, 57))  # a 50-token shared beginning: three full pages of 16, and a part
PROMPTS = [
    [*SYSTEM, 3, 4, 5],
    SYSTEM + list(range(100, 130)),
    [*SYSTEM, 3, 4, 5],  # the same prompt again
    [*SYSTEM[:20], 9],
    list(range(200, 240)),
    [*SYSTEM, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
]


def run(engine: Engine, prompts: list[list[int]], together: bool) -> list[list[int]]:
    """Greedy tokens of each prompt: all at once, or one after another (later ones find earlier pages)."""
    outs: list[list[int]] = [[] for _ in prompts]
    batches = [list(range(len(prompts)))] if together else [[i] for i in range(len(prompts))]
    for batch in batches:
        for j, step in engine.stream([prompts[i] for i in batch], [GREEDY] * len(batch)):
            outs[batch[j]].append(step.token_id)
    return outs


def idle(engine: Engine) -> None:
    stats = engine.stats()
    assert stats.kv_cache_used_tokens == 0 and stats.running == 0 and stats.waiting == 0
    assert engine.pool.references() == [0] * engine.pool.pages


CONFIGS = {
    "roomy": SchedulerConfig(max_batch=8, kv_cache_tokens=2048, prefill_chunk=32, page_tokens=16),
    # 3 at a time in 10 pages of 16: preemption, and cached pages evicted for others and computed again
    "tight": SchedulerConfig(max_batch=3, kv_cache_tokens=160, prefill_chunk=24, page_tokens=16),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_greedy_outputs_are_identical_with_the_cache_on_and_off(tiny, arch: str, config: str) -> None:
    llm = LLM(tiny(arch).path, dtype="float32")
    off = llm.new_engine(SchedulerConfig(max_batch=1, kv_cache_tokens=256, prefix_cache=False))
    alone = run(off, PROMPTS, together=False)
    assert off.stats().prefix_hit_tokens_total == 0
    for together in (False, True):
        on = llm.new_engine(CONFIGS[config])
        assert run(on, PROMPTS, together) == alone
        stats = on.stats()
        assert stats.prefix_hit_tokens_total > 0 and stats.prefix_lookups_total >= len(PROMPTS)
        if config == "tight":
            assert stats.prefix_evictions_total > 0
        idle(on)
        assert run(on, PROMPTS, together) == alone  # again, over what the first round left cached
        idle(on)


def test_a_chats_next_turn_reads_only_its_new_tokens(tiny) -> None:
    llm = LLM(tiny("DeepseekV3ForCausalLM").path, dtype="float32")
    engine = llm.new_engine(SchedulerConfig(max_batch=2, kv_cache_tokens=1024, page_tokens=16))
    history = list(SYSTEM)
    for turn in range(4):
        before = engine.stats()
        answer = [s.token_id for _, s in engine.stream([history], [GREEDY])]
        hit = engine.stats().prefix_hit_tokens_total - before.prefix_hit_tokens_total
        # everything but the new user message was cached: the earlier prompt and the answer, to full pages
        assert hit == (0 if turn == 0 else (len(history) - 1 - 5) // 16 * 16)
        history = history + answer + [3, 4, 5, 6, 7]
    idle(engine)


def test_evicted_pages_come_back_from_the_host_tier(tiny) -> None:
    llm = LLM(tiny("Qwen3MoeForCausalLM").path, dtype="float32")
    off = llm.new_engine(SchedulerConfig(max_batch=1, kv_cache_tokens=256, prefix_cache=False))
    others = [list(range(250 + 45 * i, 290 + 45 * i)) for i in range(4)]
    expected = run(off, [PROMPTS[1], *others, PROMPTS[1]], together=False)
    # a pool of 6 pages: the other prompts evict the first one's pages, which the host tier keeps
    engine = llm.new_engine(SchedulerConfig(max_batch=1, kv_cache_tokens=96, page_tokens=16, host_cache_bytes=1 << 20))
    assert run(engine, [PROMPTS[1], *others, PROMPTS[1]], together=False) == expected
    stats = engine.stats()
    assert stats.prefix_evictions_total > 0 and stats.host_tier_pages_loaded_total == (len(PROMPTS[1]) - 1) // 16
    idle(engine)


def test_no_prefix_cache(tiny) -> None:
    llm = LLM(tiny("MixtralForCausalLM").path, dtype="float32")
    engine = llm.new_engine(SchedulerConfig(kv_cache_tokens=1024, prefix_cache=False))
    run(engine, PROMPTS, together=True)
    stats = engine.stats()
    assert stats.prefix_hit_tokens_total == stats.prefix_lookups_total == stats.prefix_cached_pages == 0
    with pytest.raises(ValueError, match="host_cache_bytes"):
        SchedulerConfig(host_cache_bytes=-1)


def test_32_clients_sharing_a_system_prompt_with_8_leaving(tiny) -> None:
    import random
    import threading

    import httpx
    import openai
    from test_server import MODEL, serving

    batching = SchedulerConfig(max_batch=16, kv_cache_tokens=2048, prefill_chunk=64, page_tokens=16)
    llm = LLM(tiny("DeepseekV2ForCausalLM").path, dtype="float32", batching=batching)
    llm.eos_ids = llm.engine.eos_ids = frozenset()  # every request runs to max_tokens
    system = "You are a careful assistant. " * 12
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}] for i in range(32)]
    alone = [llm.chat(c, max_tokens=10, temperature=0).text for c in chats]  # one at a time
    with serving(llm, max_queue=64) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        rng = random.Random(0)
        leaving = {i: rng.randint(1, 6) for i in rng.sample(range(32), 8)}
        results: dict[int, str] = {}

        def one(i: int) -> None:
            stream = client.chat.completions.create(
                model=MODEL, messages=chats[i], max_tokens=10, temperature=0, stream=True
            )
            text = []
            for n, chunk in enumerate(stream):
                text.append(chunk.choices[0].delta.content or "")
                if i in leaving and n >= leaving[i]:
                    stream.close()  # the client disconnects mid-stream
                    break
            results[i] = "".join(text)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(results) == 32
        for i, text in results.items():
            assert alone[i].startswith(text) if i in leaving else text == alone[i]
        usage = client.chat.completions.create(model=MODEL, messages=chats[0], max_tokens=2, temperature=0).usage
        assert usage.prompt_tokens_details.cached_tokens >= len(llm.chat_ids(chats[0])) // 16 * 16 - 16
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert "hetero_moe_prefix_hit_tokens_total 0" not in metrics
        idle(llm.engine)


def test_bench_serve_multi_turn(tiny, capsys) -> None:
    from test_server import serving

    from hetero_moe.bench import serve as bench_serve
    from hetero_moe.cli import main

    llm = LLM(tiny("Qwen3MoeForCausalLM").path, dtype="float32")
    with serving(llm) as url:
        report = bench_serve.multi_turn(url, turns=3, history_tokens=80, max_tokens=4)
        assert main(["bench", "serve", "--url", url, "--multi-turn", "2", "--history", "20", "--max-tokens", "2"]) == 0
    assert "uncached" in capsys.readouterr().out
    first, *later = report["turns"]
    assert first["cached_tokens_cached"] == 0 and all(t["cached_tokens_uncached"] == 0 for t in report["turns"])
    for previous, t in zip(report["turns"], later, strict=False):
        assert t["prompt_tokens"] > previous["prompt_tokens"]
        assert previous["prompt_tokens"] - 16 <= t["cached_tokens_cached"] + 16 <= t["prompt_tokens"]
    assert report["last_turn_ttft_ratio"] > 0
