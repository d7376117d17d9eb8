"""The whole model on the CPU rules against transformers' own implementation, token for token."""

from __future__ import annotations

import pytest
import torch

from hetero_moe.bench.teacher import TeacherForced
from hetero_moe.engine.sampler import SamplingParams
from hetero_moe.llm import LLM

ARCHS = ["DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM"]
PROMPT = [0, 5, 17, 42, 99, 7, 3, 100, 200, 11, 64]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("fp8", "shards"), [(False, 1), (True, 3)], ids=["bf16-single", "fp8-sharded"])
def test_greedy_matches_transformers(tiny, hf_greedy, arch: str, fp8: bool, shards: int) -> None:
    # FP8 with 32x32 blocks: every tiny weight has ragged edge blocks (72, 40, 48, ... are not multiples).
    t = tiny(arch, fp8=fp8, shards=shards, block_size=(32, 32))
    llm = LLM(t.path, rules="cpu-only.yaml", dtype="float32")
    ours = llm.generate(PROMPT, max_tokens=40, temperature=0, ignore_eos=True).token_ids
    assert ours == hf_greedy(t.reference, PROMPT, 40)
    assert len(set(ours)) > 10  # a varied continuation, not one repeated token


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_transformers(tiny, arch: str) -> None:
    t = tiny(arch)
    llm = LLM(t.path, dtype="float32")
    cache = TeacherForced(llm.runner, len(PROMPT))
    ours = cache.feed(PROMPT)
    with torch.no_grad():
        ref = t.reference(torch.tensor([PROMPT])).logits[0, -1]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_is_as_close_to_float32_as_transformers_bfloat16(tiny, bf16_accuracy, arch: str) -> None:
    """Teacher-forced over 256 positions (conftest's `bf16_accuracy` says why the measure is the distance
    to float32, not agreement with transformers' bf16)."""
    t = tiny(arch)
    llm = LLM(t.path, dtype="bfloat16")
    bf16_accuracy([(t, llm)], PROMPT, "cpu")
    assert len(llm.generate(PROMPT, max_tokens=5, temperature=0, ignore_eos=True).token_ids) == 5


def test_chunked_prefill_equals_whole_prefill(tiny) -> None:
    """Tokens fed in pieces over the cache give the same logits as one prefill (masked attention path)."""
    for arch in ("DeepseekV3ForCausalLM", "Qwen3MoeForCausalLM"):
        llm = LLM(tiny(arch).path, dtype="float32")
        whole = TeacherForced(llm.runner, len(PROMPT)).feed(PROMPT)
        cache = TeacherForced(llm.runner, len(PROMPT))
        cache.feed(PROMPT[:4])
        pieces = cache.feed(PROMPT[4:])
        torch.testing.assert_close(pieces, whole, rtol=1e-4, atol=1e-4)


def test_sliding_window_matches_transformers(tiny, hf_greedy) -> None:
    t = tiny("MixtralForCausalLM", sliding_window=6)
    llm = LLM(t.path, dtype="float32")
    ours = llm.generate(PROMPT, max_tokens=12, temperature=0, ignore_eos=True).token_ids
    assert ours == hf_greedy(t.reference, PROMPT, 12)


def test_sampling_is_reproducible_with_a_seed(tiny) -> None:
    llm = LLM(tiny("Qwen3MoeForCausalLM").path, dtype="float32")
    params = {"max_tokens": 20, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "ignore_eos": True}
    a = llm.generate(PROMPT, seed=7, **params).token_ids
    assert a == llm.generate(PROMPT, seed=7, **params).token_ids
    assert a != llm.generate(PROMPT, seed=8, **params).token_ids


def test_stops_at_eos_and_reports_it(tiny) -> None:
    llm = LLM(tiny("DeepseekV3ForCausalLM").path, dtype="float32")
    free = llm.generate(PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
    # Declare the 4th greedy token an end-of-sequence token: generation ends there, including it.
    llm.engine.eos_ids = frozenset({free.token_ids[3]})
    c = llm.generate(PROMPT, max_tokens=8, temperature=0)
    assert c.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[3]) + 1]
    assert c.finish_reason == "stop"
    assert free.finish_reason == "length"


def test_stop_string_truncates_text(tiny) -> None:
    llm = LLM(tiny("DeepseekV3ForCausalLM").path, dtype="float32")
    free = llm.generate("The experts", max_tokens=30, temperature=0, ignore_eos=True)
    stop = free.text[5:8]
    assert stop, free.text
    c = llm.generate("The experts", max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    assert c.finish_reason == "stop"
    assert c.text == free.text[: free.text.index(stop)]
    streamed = "".join(
        s.text for s in llm.stream("The experts", max_tokens=30, temperature=0, ignore_eos=True, stop=stop)
    )
    assert streamed == c.text


def test_stream_text_equals_generate_text(tiny) -> None:
    llm = LLM(tiny("MixtralForCausalLM").path, dtype="float32")
    steps = list(llm.stream("hello world", max_tokens=25, temperature=0, ignore_eos=True))
    c = llm.generate("hello world", max_tokens=25, temperature=0, ignore_eos=True)
    assert "".join(s.text for s in steps) == c.text
    assert [s.token_id for s in steps] == c.token_ids
    assert steps[-1].finish_reason == "length" and all(s.finish_reason is None for s in steps[:-1])


def test_text_prompt_is_tokenized_like_the_tokenizer(tiny) -> None:
    llm = LLM(tiny("DeepseekV3ForCausalLM").path, dtype="float32")
    c = llm.generate("Hello, world", max_tokens=2, temperature=0)
    assert c.prompt_token_ids == llm.tokenizer("Hello, world")["input_ids"]
    assert c.prompt_token_ids[0] == llm.tokenizer.bos_token_id


def test_chat_uses_the_template(tiny) -> None:
    llm = LLM(tiny("DeepseekV3ForCausalLM").path, dtype="float32")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    ids = llm.chat_ids(messages)
    assert ids == list(
        llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    assert llm.chat(messages, max_tokens=3, temperature=0).prompt_token_ids == ids


def test_prompt_too_long_and_bad_ids_are_clear_errors(tiny) -> None:
    from hetero_moe.engine.request import ContextLengthError

    llm = LLM(tiny("DeepseekV3ForCausalLM").path, dtype="float32", max_context=16)
    with pytest.raises(ContextLengthError, match="context holds 16"):
        llm.generate(list(range(3, 20)), max_tokens=2)
    with pytest.raises(ContextLengthError, match="empty"):
        llm.generate([], max_tokens=2)
    with pytest.raises(ContextLengthError, match="outside the vocabulary"):
        llm.generate([0, 10**6], max_tokens=2)
    # A prompt that fits ends with "length" when the context fills up.
    c = llm.generate(list(range(3, 14)), max_tokens=50, temperature=0, ignore_eos=True)
    assert len(c.token_ids) == 16 - 11 and c.finish_reason == "length"
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_logprobs_are_the_models_distribution(tiny) -> None:
    llm = LLM(tiny("Qwen3MoeForCausalLM").path, dtype="float32")
    steps = list(llm.stream(PROMPT, max_tokens=3, temperature=0, ignore_eos=True, logprobs=4))
    cache = TeacherForced(llm.runner, len(PROMPT))
    first = torch.log_softmax(cache.feed(PROMPT), dim=-1)
    assert steps[0].logprob == pytest.approx(float(first.max()), abs=1e-5)
    assert [t for t, _ in steps[0].top_logprobs] == torch.topk(first, 4).indices.tolist()
    assert steps[0].top_logprobs[0][0] == steps[0].token_id  # greedy picks the most likely
    assert all(s.logprob is None for s in llm.stream(PROMPT, max_tokens=2, temperature=0))


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("Qwen3MoeForCausalLM", {"tie_word_embeddings": True}),
        ("Qwen3MoeForCausalLM", {"decoder_sparse_step": 2, "mlp_only_layers": [], "attention_bias": True}),
        (
            "DeepseekV2ForCausalLM",
            {"topk_method": "group_limited_greedy", "n_group": 5, "topk_group": 2, "q_lora_rank": 24},
        ),
        (
            "DeepseekV3ForCausalLM",
            {"rope_interleave": False, "q_lora_rank": None, "n_group": 1, "topk_group": 1, "norm_topk_prob": False},
        ),
        (
            "DeepseekV3ForCausalLM",
            {
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                "first_k_dense_replace": 0,
                "n_shared_experts": 2,
            },
        ),
    ],
    ids=["qwen3-tied", "qwen3-sparse-step-2", "v2-group-limited", "v3-no-interleave", "v3-default-rope"],
)
def test_config_variants_match_transformers(tiny, hf_greedy, arch: str, overrides: dict) -> None:
    t = tiny(arch, **overrides)
    llm = LLM(t.path, dtype="float32")
    assert llm.generate(PROMPT, max_tokens=24, temperature=0, ignore_eos=True).token_ids == hf_greedy(
        t.reference, PROMPT, 24
    )


@pytest.mark.parametrize("arch", ["DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM"])
def test_absorbed_latent_attention_equals_the_expanded_form(tiny, tmp_path, arch: str) -> None:
    from importlib import resources

    rules = tmp_path / "absorb.yaml"
    text = (resources.files("hetero_moe.rules") / "cpu-only.yaml").read_text()
    rules.write_text(text.replace("replace: {op: attention}", "replace: {op: attention, kwargs: {absorb: true}}"))
    t = tiny(arch)
    exact, absorbed = LLM(t.path, dtype="float32"), LLM(t.path, rules=str(rules), dtype="float32")
    assert absorbed.placed.model.model.layers[0].self_attn.absorb
    seq = exact.generate(PROMPT, max_tokens=30, temperature=0, ignore_eos=True).token_ids
    ids = PROMPT + seq
    caches = [TeacherForced(m.runner, len(ids)) for m in (exact, absorbed)]
    for chunk in (ids[:7], ids[7:11], *[[tok] for tok in ids[11:]]):  # prefill, chunked prefill, decode
        a, b = (c.feed(chunk) for c in caches)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert absorbed.generate(PROMPT, max_tokens=30, temperature=0, ignore_eos=True).token_ids == seq


def test_absorb_is_for_latent_attention_only(tiny, tmp_path) -> None:
    from importlib import resources

    from hetero_moe.inject.injector import InjectError

    rules = tmp_path / "absorb.yaml"
    text = (resources.files("hetero_moe.rules") / "cpu-only.yaml").read_text()
    rules.write_text(text.replace("replace: {op: attention}", "replace: {op: attention, kwargs: {absorb: true}}"))
    with pytest.raises(InjectError, match="absorb applies to latent attention"):
        LLM(tiny("Qwen3MoeForCausalLM").path, rules=str(rules), dtype="float32")


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoints_written_by_transformers_itself(tmp_path, hf_greedy, arch: str) -> None:
    """`save_pretrained` output (its own key names, float32, its own sharding) loads and matches."""
    from hetero_moe.synth import tiny as synth

    model = synth.random_model(synth.tiny_config(arch), seed=3)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    synth.build_tokenizer(tmp_path, model.config.vocab_size)
    llm = LLM(tmp_path, dtype="float32")
    assert llm.generate(PROMPT, max_tokens=20, temperature=0, ignore_eos=True).token_ids == hf_greedy(model, PROMPT, 20)
