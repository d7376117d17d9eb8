"""One generation request and what happens to each of its new tokens: the grammar's mask, sampling,
log-probabilities, incremental text, stop strings, and the EOS, grammar, `max_tokens` and context limits."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from hetero_moe.engine.grammar import Matcher, constraints_for
from hetero_moe.engine.sampler import Sampler, SamplingParams
from hetero_moe.engine.text import Detokenizer, StopMatcher


class ContextLengthError(ValueError):
    """A prompt that does not fit the context or the KV cache."""


class Cancelled(Exception):
    """The request was aborted before it finished (its client went away)."""


@dataclass(frozen=True)
class StepOutput:
    token_id: int
    text: str  # new text, safe to show (never part of a stop string)
    finish_reason: str | None = None  # "stop" or "length" on the last step
    logprob: float | None = None  # of token_id, when SamplingParams.logprobs is set
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the most likely tokens, best first
    stop_string: str | None = None  # the stop string that ended the output (cut from the text)


@dataclass(frozen=True)
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    stop_string: str | None = None  # the stop string that ended it

    @classmethod
    def of(cls, prompt_ids: list[int], steps: list[StepOutput]) -> Completion:
        text = "".join(s.text for s in steps)
        last = steps[-1]
        return cls(list(prompt_ids), [s.token_id for s in steps], text, last.finish_reason, last.stop_string)


@dataclass(frozen=True)
class Event:
    """What `Engine.step` reports for one request: its new token, or the error that ended it."""

    request_id: int
    output: StepOutput | BaseException
    cached_tokens: int = 0  # prompt tokens the request took from the prefix cache instead of computing

    @property
    def finished(self) -> bool:
        return isinstance(self.output, BaseException) or self.output.finish_reason is not None


class Decoding:
    """Turns each sampled token of one request into a `StepOutput`."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        vocab_size: int,
        limit: int,
        prompt_ids: list[int],
        params: SamplingParams,
    ) -> None:
        self.params = params
        self.eos_ids = frozenset() if params.ignore_eos else eos_ids
        self.prompt_len = len(prompt_ids)
        self.limit = limit  # tokens in the cache at most: prompt and generated
        self.sampler = Sampler(params, vocab_size)
        self.detok = Detokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self.stops = StopMatcher(params.stop)
        self.generated = 0
        self.matcher: Matcher | None = None
        if params.grammar is not None:  # compiled already when the server checked it: a copy
            self.matcher = constraints_for(tokenizer, vocab_size, eos_ids).matcher(params.grammar)

    def step(self, logits: torch.Tensor) -> StepOutput:
        """Sample the next token from `logits [V]` (among those the grammar allows); the step says its new
        text and whether it ends. The work per token does not grow with the text: the stop matcher sees each
        new character once, the grammar's matcher each token."""
        token = self.sampler(logits, self.matcher.allowed() if self.matcher is not None else None)
        self.generated += 1
        if self.matcher is not None:
            self.matcher.advance(token)
        lp = _logprobs(logits, token, self.params.logprobs) if self.params.logprobs is not None else {}
        if token in self.eos_ids:
            return StepOutput(token, self._rest("")[0], "stop", **lp)
        text, stopped = self.stops.feed(self.detok.add(token))
        if stopped:
            return StepOutput(token, text, "stop", stop_string=self.stops.matched, **lp)
        if self.prompt_len + self.generated >= self.limit or (self.matcher is not None and self.matcher.done):
            text, stopped = self._rest(text)
            length = not stopped and (self.matcher is None or not self.matcher.done)
            return StepOutput(token, text, "length" if length else "stop", stop_string=self.stops.matched, **lp)
        return StepOutput(token, text, **lp)

    def _rest(self, text: str) -> tuple[str, bool]:
        """`text` and all that is still held back, at the end; whether a stop string ends in the
        held-back bytes (it still cuts there)."""
        tail, stopped = self.stops.feed(self.detok.flush())
        return text + tail + ("" if stopped else self.stops.flush()), stopped


@dataclass(eq=False)
class Request:
    """A request inside the engine: its tokens (prompt and generated, all bound for the cache), how many
    of them the cache holds, the pool pages holding them, and its decoding state."""

    id: int
    prompt_ids: list[int]
    decoding: Decoding
    tokens: list[int] = field(default_factory=list)
    computed: int = 0  # leading tokens already in the cache
    pages: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full pages so far
    cached_tokens: int = 0  # of its prompt, taken from the prefix cache when it was (last) admitted
    slot: int | None = None  # its slot in the linear-attention layers' state, while it runs (`engine/state.py`)

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt_ids)

    @property
    def pending(self) -> int:
        """Tokens not yet in the cache: the prompt's rest while prefilling, one while decoding."""
        return len(self.tokens) - self.computed


def _logprobs(logits: torch.Tensor, token: int, top: int) -> dict:
    """The model's log-probability of `token` and of its `top` most likely tokens (before sampling)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(lp, top) if top else (lp[:0], lp[:0].long())
    return {"logprob": float(lp[token]), "top_logprobs": tuple(zip(ids.tolist(), values.tolist(), strict=True))}
