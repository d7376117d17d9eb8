"""The sampler against plain torch, and incremental text with stop strings."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from hetero_moe.engine.sampler import Sampler, SamplingParams
from hetero_moe.engine.text import Detokenizer, StopChecker


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


def test_stop_checker() -> None:
    s = StopChecker(("END", "\n\n"))
    assert s.find("abc EN", 4) is None
    assert s.find("abc END more", 5) == 4
    assert s.safe_end("abc EN") == 4  # "EN" may become "END"
    assert s.safe_end("abc\n") == 3
    assert s.safe_end("abc") == 3
    assert StopChecker(()).safe_end("abc") == 3


def test_detokenizer_deltas_add_up(tiny) -> None:
    tok = AutoTokenizer.from_pretrained(tiny("DeepseekV3ForCausalLM").path)
    text = "Héllo wörld — naïve café ☕ 42"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prompt = tok("The start")["input_ids"]
    d = Detokenizer(tok, prompt)
    deltas = [d.add(i) for i in ids]
    assert "".join(deltas) == text == d.full_text()
    assert all("\ufffd" not in x for x in deltas)  # multi-byte characters never split
