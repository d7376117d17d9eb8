"""OpenAI's response shapes: pure functions from a request's steps to the JSON objects the API returns
(chat completions, legacy completions, their streamed chunks, log-probabilities, usage)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from hetero_moe.engine.request import StepOutput

TokenText = Callable[[int], str]  # a token id -> its text, special tokens included


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def envelope(rid: str, kind: str, model: str) -> dict:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens read from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_logprob(step: StepOutput, token_text: TokenText) -> dict:
    def entry(t: int, lp: float) -> dict:
        text = token_text(t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {**entry(step.token_id, step.logprob), "top_logprobs": [entry(t, lp) for t, lp in step.top_logprobs]}


def split_reasoning(parser, text: str, final: bool) -> tuple[str, str]:
    """(reasoning, content) of new `text`, through a reasoning parser (or none: all content)."""
    if parser is None:
        return "", text
    reasoning, content = parser.feed(text)
    if final:
        r2, c2 = parser.flush()
        reasoning, content = reasoning + r2, content + c2
    return reasoning, content


async def chat_chunks(
    steps: AsyncIterator[StepOutput], base: dict, parser, token_text: TokenText, usage_of: Callable[[int], dict] | None
) -> AsyncIterator[dict]:
    """The `chat.completion.chunk` objects of a streamed chat; `usage_of(n)`, if given, adds the usage chunk."""
    extra = {"usage": None} if usage_of else {}
    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    yield {**base, "choices": [first], **extra}
    n = 0
    async for step in steps:
        n += 1
        reasoning, content = split_reasoning(parser, step.text, step.finish_reason is not None)
        delta = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content or not reasoning:
            delta["content"] = content
        lp = {"content": [chat_logprob(step, token_text)]} if step.logprob is not None else None
        choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": step.finish_reason}
        yield {**base, "choices": [choice], **extra}
    if usage_of:
        yield {**base, "choices": [], "usage": usage_of(n)}


def chat_response(steps: list[StepOutput], base: dict, parser, token_text: TokenText, usage_: dict) -> dict:
    reasoning, content = split_reasoning(parser, "".join(s.text for s in steps), True)
    message = {"role": "assistant", "content": content}
    if parser is not None:
        message["reasoning_content"] = reasoning
    lp = {"content": [chat_logprob(s, token_text) for s in steps]} if steps[0].logprob is not None else None
    return {
        **base,
        "choices": [{"index": 0, "message": message, "logprobs": lp, "finish_reason": steps[-1].finish_reason}],
        "usage": usage_,
    }


def completion_logprobs(steps: list[StepOutput], token_text: TokenText, offset: int = 0) -> dict:
    tokens, offsets = [], []
    for s in steps:
        tokens.append(token_text(s.token_id))
        offsets.append(offset)
        offset += len(s.text)
    return {
        "tokens": tokens,
        "token_logprobs": [s.logprob for s in steps],
        "top_logprobs": [{token_text(t): lp for t, lp in s.top_logprobs} for s in steps],
        "text_offset": offsets,
    }


async def completion_chunks(
    steps: AsyncIterator[StepOutput], base: dict, token_text: TokenText, usage_of: Callable[[int], dict] | None
) -> AsyncIterator[dict]:
    """The `text_completion` chunks of a streamed legacy completion."""
    extra = {"usage": None} if usage_of else {}
    n, offset = 0, 0
    async for step in steps:
        n += 1
        lp = completion_logprobs([step], token_text, offset) if step.logprob is not None else None
        offset += len(step.text)
        choice = {"index": 0, "text": step.text, "logprobs": lp, "finish_reason": step.finish_reason}
        yield {**base, "choices": [choice], **extra}
    if usage_of:
        yield {**base, "choices": [], "usage": usage_of(n)}


def completion_response(steps: list[StepOutput], base: dict, token_text: TokenText, usage_: dict) -> dict:
    lp = completion_logprobs(steps, token_text) if steps[0].logprob is not None else None
    text = "".join(s.text for s in steps)
    return {
        **base,
        "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": steps[-1].finish_reason}],
        "usage": usage_,
    }
