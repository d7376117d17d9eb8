"""The sampler against plain torch, and incremental text with stop strings."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from hetero_moe.engine.request import Decoding
from hetero_moe.engine.sampler import GREEDY_BELOW, Sampler, SamplingError, SamplingParams
from hetero_moe.engine.text import MAX_HELD_TOKENS, Detokenizer, StopMatcher


def draws(params: SamplingParams, logits: torch.Tensor, n: int = 2000) -> torch.Tensor:
    sampler = Sampler(params, logits.shape[0])
    return torch.bincount(torch.tensor([sampler(logits) for _ in range(n)]), minlength=logits.shape[0])


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert Sampler(SamplingParams(temperature=0), 4)(logits) == 1


def test_top_k_keeps_only_the_k_best() -> None:
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0, 0.0])
    counts = draws(SamplingParams(temperature=5.0, top_k=2, seed=0), logits)
    assert counts[[0, 3, 4]].sum() == 0 and counts[1] > 0 and counts[2] > 0


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    counts = draws(SamplingParams(temperature=1.0, top_p=0.75, seed=1), probs.log())
    assert counts[2] == 0 and counts[3] == 0  # 0.5 + 0.3 >= 0.75: tokens 0 and 1 only
    assert abs(counts[0] / counts.sum() - 0.5 / 0.8) < 0.05
    counts = draws(SamplingParams(temperature=1.0, top_p=0.1, seed=1), probs.log(), 50)
    assert counts[0] == 50  # the top token always survives


def test_temperature_matches_softmax() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0])
    counts = draws(SamplingParams(temperature=2.0, seed=3), logits, 6000)
    expected = torch.softmax(logits / 2.0, dim=-1)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.03)


def test_seed_reproducible() -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    a = [Sampler(SamplingParams(seed=5), 100)(logits) for _ in range(3)]
    assert len(set(a)) == 1
    s = Sampler(SamplingParams(seed=5), 100)
    seq = [s(logits) for _ in range(20)]
    s2 = Sampler(SamplingParams(seed=5), 100)
    assert seq == [s2(logits) for _ in range(20)]


def test_penalties_follow_openai() -> None:
    logits = torch.tensor([2.0, 1.9, 0.0])
    s = Sampler(SamplingParams(temperature=0, frequency_penalty=0.11), 3)
    assert [s(logits) for _ in range(4)] == [0, 1, 0, 1]  # 1.89 < 1.9, then 1.79 < 1.89, ...
    s = Sampler(SamplingParams(temperature=0, presence_penalty=0.2), 3)
    assert [s(logits) for _ in range(3)] == [0, 1, 0]  # both penalised once: 1.8 vs 1.7
    s = Sampler(SamplingParams(temperature=0, presence_penalty=-1.0), 3)
    assert [s(logits) for _ in range(3)] == [0, 0, 0]  # a negative penalty favours repeats


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"temperature": -1},
        {"temperature": float("nan")},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"seed": "x"},
        {"stop": "abc"},
        {"stop": ("",)},
    ],
)
def test_invalid_params(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_tiny_temperatures_are_greedy_and_never_overflow() -> None:
    logits = torch.tensor([1e36, -3e38, 0.5, 1e36 - 1e31])  # divided by 1e-5 they overflow float32
    for t in (1e-300, 1e-40, GREEDY_BELOW / 2):  # greedy
        assert Sampler(SamplingParams(temperature=t, seed=0), 4)(logits) == 0
    s = Sampler(SamplingParams(temperature=GREEDY_BELOW, seed=0), 4)  # sampled, shifted first: no inf - inf
    assert {s(logits) for _ in range(50)} == {0}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_non_finite_logits_are_a_clear_error(bad: float, temperature: float) -> None:
    logits = torch.tensor([0.0, bad, 1.0])
    with pytest.raises(SamplingError, match="not finite"):
        Sampler(SamplingParams(temperature=temperature), 3)(logits)
    with pytest.raises(SamplingError):
        Sampler(SamplingParams(temperature=temperature), 3)(torch.full((3,), float("-inf")))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stop": tuple(f"s{i}" for i in range(17))}, "at most 16 stop strings"),
        ({"stop": ("x" * 257,)}, "at most 256 characters"),
        ({"seed": 2**64}, "seed must be an integer in"),
        ({"seed": -(2**63) - 1}, "seed must be an integer in"),
        ({"logprobs": 21}, "logprobs must be"),
    ],
)
def test_bounded_params(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
    SamplingParams(stop=tuple(f"s{i}" for i in range(16)), seed=2**64 - 1, logprobs=20)


def feed_all(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, stopped = m.feed(piece)
        out.append(text)
        assert m.held <= max((len(s) for s in stops), default=0)
        if stopped:
            return "".join(out), True
    return "".join(out) + m.flush(), False


def reference(stops: tuple[str, ...], text: str) -> tuple[str, bool]:
    """The text before the stop string that ends first (the longest of those ending there), by brute force."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            return text[: end - max(map(len, hits))], True
    return text, False


def test_stop_matcher() -> None:
    assert feed_all(("END", "\n\n"), ["abc EN", "D more"]) == ("abc ", True)
    m = StopMatcher(("END", "\n\n"))
    assert m.feed("abc EN") == ("abc ", False)  # "EN" may become "END"
    assert m.feed("x\n") == ("ENx", False)
    assert m.feed("y") == ("\ny", False)
    assert m.flush() == ""
    assert feed_all((), ["abc"]) == ("abc", False)
    assert feed_all(("bc", "abcd"), ["abcd"]) == ("a", True)  # "bc" ends first
    assert feed_all(("abcd", "bcd", "cd"), ["ab", "cd"]) == ("", True)  # three end together: the longest
    assert feed_all(("aab",), ["a", "a", "a", "a", "b"]) == ("aa", True)  # suffix links across pieces


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text("abc", min_size=1, max_size=5), max_size=4),
    st.text("abcd", max_size=40),
    st.lists(st.integers(0, 40), max_size=6),
)
def test_stop_matcher_against_brute_force(stops: list[str], text: str, cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert feed_all(tuple(stops), pieces) == reference(tuple(stops), text)


def test_stop_matcher_holds_a_bounded_tail_of_long_text() -> None:
    """16 stop strings of 256 characters, all near-misses of a long text: the matcher never holds more
    than the longest stop string, however long the text (the old check rescanned that much per stop)."""
    stops = tuple("a" * 255 + chr(ord("b") + i) for i in range(16))
    m = StopMatcher(stops)
    released = 0
    for _ in range(2000):
        text, stopped = m.feed("a" * 50)
        released += len(text)
        assert not stopped and m.held <= 255
    assert released + m.held == 100_000


def test_detokenizer_deltas_add_up(tiny) -> None:
    tok = AutoTokenizer.from_pretrained(tiny("DeepseekV3ForCausalLM").path, trust_remote_code=False)
    text = "Héllo wörld — naïve café ☕ 42"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prompt = tok("The start")["input_ids"]
    d = Detokenizer(tok, prompt)
    deltas = [d.add(i) for i in ids]
    assert "".join(deltas) == text and d.flush() == ""
    assert all("\ufffd" not in x for x in deltas)  # multi-byte characters never split
    assert len(d.ids) <= MAX_HELD_TOKENS + 8  # it keeps only the last delta's tokens and those held back


def test_detokenizer_lets_invalid_utf8_through_after_a_while(tiny) -> None:
    tok = AutoTokenizer.from_pretrained(tiny("DeepseekV3ForCausalLM").path, trust_remote_code=False)
    lead = tok.convert_tokens_to_ids("\u00e2")  # byte 0xE2 alone: the first byte of a 3-byte character
    d = Detokenizer(tok, [])
    deltas = [d.add(lead) for _ in range(3 * MAX_HELD_TOKENS)]
    assert sum(1 for x in deltas if x) >= 2  # not held back forever
    assert len(d.ids) <= MAX_HELD_TOKENS


def test_decoding_stops_and_limits(tiny) -> None:
    tok = AutoTokenizer.from_pretrained(tiny("DeepseekV3ForCausalLM").path, trust_remote_code=False)
    ids = tok("hello world, hello there", add_special_tokens=False)["input_ids"]

    def run(limit: int, **params) -> list:
        d = Decoding(tok, frozenset({1}), len(tok), limit, [0], SamplingParams(temperature=0, **params))
        out = []
        for t in ids:
            step = d.step(torch.nn.functional.one_hot(torch.tensor(t), len(tok)).float())
            out.append(step)
            if step.finish_reason:
                break
        return out

    steps = run(100, stop=("o th",))
    assert "".join(s.text for s in steps) == "hello world, hell" and steps[-1].finish_reason == "stop"
    steps = run(1 + 3, stop=("zzz",))
    assert len(steps) == 3 and steps[-1].finish_reason == "length"
    assert "".join(s.text for s in steps) == tok.decode(ids[:3])
