"""Generation for one sequence: prefill the prompt, then decode token by token until EOS, a stop
string, `max_tokens` or the end of the context."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from hetero_moe.engine.runner import ModelRunner
from hetero_moe.engine.sampler import Sampler, SamplingParams
from hetero_moe.engine.text import Detokenizer, StopChecker


class ContextLengthError(ValueError):
    """A prompt that does not fit the context."""


@dataclass(frozen=True)
class StepOutput:
    token_id: int
    text: str  # new text, safe to show (never part of a stop string)
    finish_reason: str | None = None  # "stop" or "length" on the last step
    logprob: float | None = None  # of token_id, when SamplingParams.logprobs is set
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the most likely tokens, best first


@dataclass(frozen=True)
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str


class Engine:
    def __init__(
        self, runner: ModelRunner, tokenizer: PreTrainedTokenizerBase, eos_ids: frozenset[int], max_context: int
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_context = max_context

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ContextLengthError("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_context}, "
                "with room for at least one new token"
            )
        bad = [t for t in prompt_ids if not 0 <= t < self.runner.vocab_size]
        if bad:
            raise ContextLengthError(f"token id {bad[0]} is outside the vocabulary of {self.runner.vocab_size}")

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[StepOutput]:
        self.check_prompt(prompt_ids)
        decoding = Decoding(self, prompt_ids, params)
        cache = self.runner.new_cache(decoding.limit)
        logits = self.runner.forward(torch.tensor(prompt_ids), cache)
        while True:
            step = decoding.step(logits)
            yield step
            if step.finish_reason is not None:
                return
            logits = self.runner.forward(torch.tensor([step.token_id]), cache)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        tokens, parts, reason = [], [], "length"
        for step in self.stream(prompt_ids, params):
            tokens.append(step.token_id)
            parts.append(step.text)
            reason = step.finish_reason or reason
        return Completion(list(prompt_ids), tokens, "".join(parts), reason)


class Decoding:
    """What happens to each new token of one sequence: sampling, log-probabilities, incremental text,
    stop strings, and the EOS, `max_tokens` and context limits."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams) -> None:
        self.params = params
        self.eos_ids = frozenset() if params.ignore_eos else engine.eos_ids
        self.prompt_len = len(prompt_ids)
        self.limit = min(len(prompt_ids) + params.max_tokens, engine.max_context)  # tokens in the cache at most
        self.sampler = Sampler(params, engine.runner.vocab_size)
        self.detok = Detokenizer(engine.tokenizer, prompt_ids)
        self.stops = StopChecker(params.stop)
        self.text, self.emitted, self.generated = "", 0, 0

    def step(self, logits: torch.Tensor) -> StepOutput:
        """Sample the next token from `logits [V]`; the step says its new text and whether it ends."""
        token = self.sampler(logits)
        self.generated += 1
        lp = _logprobs(logits, token, self.params.logprobs) if self.params.logprobs is not None else {}
        if token in self.eos_ids:
            return StepOutput(token, self.detok.full_text()[self.emitted :], "stop", **lp)
        delta = self.detok.add(token)
        self.text += delta
        hit = self.stops.find(self.text, len(self.text) - len(delta)) if delta and self.stops.stops else None
        if hit is not None:
            return StepOutput(token, self.text[self.emitted : hit] if hit > self.emitted else "", "stop", **lp)
        if self.prompt_len + self.generated >= self.limit:
            return StepOutput(token, self.detok.full_text()[self.emitted :], "length", **lp)
        safe = self.stops.safe_end(self.text)
        out = StepOutput(token, self.text[self.emitted : safe], **lp)
        self.emitted = max(self.emitted, safe)
        return out


def _logprobs(logits: torch.Tensor, token: int, top: int) -> dict:
    """The model's log-probability of `token` and of its `top` most likely tokens (before sampling)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(lp, top) if top else (lp[:0], lp[:0].long())
    return {"logprob": float(lp[token]), "top_logprobs": tuple(zip(ids.tolist(), values.tolist(), strict=True))}
