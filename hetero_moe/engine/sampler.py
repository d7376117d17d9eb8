"""Sampling parameters and the sampler: greedy at temperature 0 (and below `GREEDY_BELOW`), else
temperature, top-k, top-p (applied in that order, as transformers does) and a seeded generator per
request, over the tokens a grammar allows when the request has one. The parameters bound the work one request
may cost per token (stop strings, log-probabilities)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hetero_moe.engine.grammar import Grammar

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (vLLM's threshold): dividing by them overflows
MAX_STOPS = 16  # stop strings per request (OpenAI allows 4)
MAX_STOP_CHARS = 256  # characters per stop string
MAX_LOGPROBS = 20  # alternatives reported per token
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


class SamplingError(ValueError):
    """Logits that cannot be sampled from (NaN or infinite): a failure of the model, not of the request."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per earlier occurrence
    logprobs: int | None = None  # report the chosen token's log-probability and this many alternatives
    grammar: Grammar | None = None  # the output must match it (a JSON schema, ...): enforced by token masks
    skip_special_tokens: bool = True  # special tokens add no text (False: tool-call markers such as [TOOL_CALLS])

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not (
            isinstance(self.temperature, int | float) and self.temperature >= 0 and math.isfinite(self.temperature)
        ):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop must be a sequence of non-empty strings")
        if len(self.stop) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(self.stop)}")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and -2 <= value <= 2):
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.grammar is not None and not isinstance(self.grammar, Grammar):
            raise ValueError(f"grammar must be a Grammar, got {type(self.grammar).__name__}")
        if not isinstance(self.skip_special_tokens, bool):
            raise ValueError("skip_special_tokens must be a boolean")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class Sampler:
    """Chooses each next token of one sequence; remembers the chosen ones for the penalties."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        self.params = params
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)
        self.penalized = bool(params.presence_penalty or params.frequency_penalty)
        self.counts = torch.zeros(vocab_size) if self.penalized else None  # [V] times each token was chosen

    def __call__(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> int:
        """`logits [V]` float32 -> the next token id, one of `allowed [V]` (bool) if given; `SamplingError` if
        the logits hold NaN or +inf (or the allowed ones only -inf)."""
        if allowed is not None:
            _check_finite(float(logits.max()))  # before masking: the mask must not hide a NaN
            logits = torch.where(allowed, logits.detach().to("cpu", torch.float32), float("-inf"))
        if self.penalized:
            logits = logits.detach().to("cpu", torch.float32)
            logits = logits - self.params.frequency_penalty * self.counts
            logits = logits - self.params.presence_penalty * (self.counts > 0).float()
        token = self._choose(logits)
        if self.penalized:
            self.counts[token] += 1
        return token

    def _choose(self, logits: torch.Tensor) -> int:
        p = self.params
        if p.greedy:  # the first of the largest, in one pass
            top, token = logits.max(dim=-1)
            _check_finite(float(top))
            return int(token)
        best = float(logits.max())  # NaN anywhere makes the maximum NaN
        _check_finite(best)
        # shifted so the largest is 0: dividing by a small temperature can only push values towards -inf
        logits = (logits.detach().to("cpu", torch.float32) - best) / p.temperature
        if 0 < p.top_k < logits.shape[0]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            drop = torch.cumsum(probs, dim=-1) - probs > p.top_p  # keeps the smallest set reaching top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=self.generator))


def _check_finite(best: float) -> None:
    if not math.isfinite(best):
        raise SamplingError(f"the model's logits are not finite (maximum {best}); nothing to sample from")
