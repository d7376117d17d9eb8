"""OpenAI's response shapes: pure functions from a request's steps to the JSON objects the API returns
(chat completions, legacy completions, their streamed chunks, log-probabilities, usage)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from hetero_moe.engine.request import StepOutput
from hetero_moe.tools import CallArguments, CallStart, Event, Parsed, ToolParser

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


def split_tools(tools: ToolParser | None, content: str, final: bool) -> tuple[str, list[Event]]:
    """(content, call events) of new content, through a tool parser (or none: all content)."""
    if tools is None:
        return content, []
    content, events = tools.feed(content)
    if final:
        more, later = tools.finish()
        content, events = content + more, events + later
    return content, events


def tool_call_deltas(events: list[Event]) -> list[dict]:
    """OpenAI's streamed `tool_calls` entries: id, type and name first, then argument fragments."""
    deltas: list[dict] = []
    for e in events:
        if isinstance(e, CallStart):
            function = {"name": e.name, "arguments": ""}
            deltas.append({"index": e.index, "id": e.id, "type": "function", "function": function})
        elif isinstance(e, CallArguments):
            if deltas and deltas[-1]["index"] == e.index:  # one entry per call and chunk
                deltas[-1]["function"]["arguments"] += e.text
            else:
                deltas.append({"index": e.index, "function": {"arguments": e.text}})
    return deltas


def finish_reason(reason: str | None, called: bool) -> str | None:
    """ "tool_calls" for an answer that ended on its own after calling tools."""
    return "tool_calls" if called and reason == "stop" else reason


async def chat_chunks(
    steps: AsyncIterator[StepOutput],
    base: dict,
    parser,
    token_text: TokenText,
    usage_of: Callable[[int], dict] | None,
    tools: ToolParser | None = None,
) -> AsyncIterator[dict]:
    """The `chat.completion.chunk` objects of a streamed chat; `usage_of(n)`, if given, adds the usage chunk;
    `tools`, the parser of the model's tool calls, if the request has tools."""
    extra = {"usage": None} if usage_of else {}
    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    yield {**base, "choices": [first], **extra}
    n, called = 0, False
    async for step in steps:
        n += 1
        final = step.finish_reason is not None
        reasoning, content = split_reasoning(parser, step.text, final)
        content, events = split_tools(tools, content, final)
        delta = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content or not (reasoning or events):
            delta["content"] = content
        if events:
            delta["tool_calls"] = tool_call_deltas(events)
            called = called or any(isinstance(e, CallStart) for e in events)
        lp = {"content": [chat_logprob(step, token_text)]} if step.logprob is not None else None
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": lp,
            "finish_reason": finish_reason(step.finish_reason, called),
        }
        yield {**base, "choices": [choice], **extra}
    if usage_of:
        yield {**base, "choices": [], "usage": usage_of(n)}


def chat_response(
    steps: list[StepOutput], base: dict, parser, token_text: TokenText, usage_: dict, tools: ToolParser | None = None
) -> dict:
    reasoning, content = split_reasoning(parser, "".join(s.text for s in steps), True)
    message: dict = {"role": "assistant", "content": content}
    if parser is not None:
        message["reasoning_content"] = reasoning
    called = False
    if tools is not None:
        parsed = Parsed()
        parsed.add(*split_tools(tools, content, True))
        calls = parsed.tool_calls
        if calls:
            called = True
            message["content"] = parsed.text.strip() or None
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
            ]
        else:
            message["content"] = parsed.text
    lp = {"content": [chat_logprob(s, token_text) for s in steps]} if steps[0].logprob is not None else None
    reason = finish_reason(steps[-1].finish_reason, called)
    return {
        **base,
        "choices": [{"index": 0, "message": message, "logprobs": lp, "finish_reason": reason}],
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
