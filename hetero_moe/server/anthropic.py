"""Anthropic's Messages API on the same server: `/v1/messages` (system prompt, text, `tool_use` and
`tool_result` blocks, `stop_sequences`, streamed as Anthropic's server-sent events or not) and
`/v1/messages/count_tokens`, through the same tokenizer threads, worker and engine as the OpenAI routes.
Tools are rendered by the model's chat template and calls parsed from its output; `tool_choice` `any`
and `tool` are enforced by grammar masks. Errors are Anthropic's error JSON."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, model_validator
from sse_starlette import EventSourceResponse

from hetero_moe.engine.request import Cancelled, StepOutput
from hetero_moe.server import openai_format as fmt
from hetero_moe.server.errors import APIError
from hetero_moe.server.routes import (
    ChatPlan,
    ServerState,
    _errors,
    check_model,
    collect,
    plan_chat,
    reasoning_parser,
    state,
    submit,
    tool_request,
)
from hetero_moe.server.schemas import (
    MAX_TOOLS,
    STRICT,
    AnthropicErrorResponse,
    Bool,
    Float,
    FunctionName,
    Int,
    JsonSchema,
    Stop,
    Text,
)
from hetero_moe.server.worker import Job
from hetero_moe.tools import CallArguments, CallStart, Parsed

log = logging.getLogger(__name__)

CacheControl = dict[Text, Any] | None  # accepted: the prefix cache needs no hints


class TextBlock(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: Text
    cache_control: CacheControl = None


class ToolUseBlock(BaseModel):
    model_config = STRICT
    type: Literal["tool_use"]
    id: Annotated[Text, Field(min_length=1, max_length=256)]
    name: FunctionName
    input: dict[Text, Any]
    cache_control: CacheControl = None


class ToolResultBlock(BaseModel):
    model_config = STRICT
    type: Literal["tool_result"]
    tool_use_id: Annotated[Text, Field(min_length=1, max_length=256)]
    content: Text | list[TextBlock] | None = None
    is_error: Bool | None = None  # shown to the model as the result's text says
    cache_control: CacheControl = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(b.text for b in self.content)


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class Message(BaseModel):
    model_config = STRICT
    role: Literal["user", "assistant"]
    content: Text | list[Block]


class AnthropicTool(BaseModel):
    model_config = STRICT
    name: FunctionName
    description: Text | None = None
    input_schema: JsonSchema
    type: Literal["custom"] | None = None
    cache_control: CacheControl = None


class ToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["auto", "any", "tool", "none"]
    name: FunctionName | None = None
    disable_parallel_tool_use: Bool | None = None

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("a name goes with type 'tool', and only with it")
        return self


class Thinking(BaseModel):
    model_config = STRICT
    type: Literal["enabled", "disabled"]
    budget_tokens: Int | None = Field(None, ge=1)  # accepted; the model's reasoning is not cut short


class Metadata(BaseModel):
    model_config = STRICT
    user_id: Text | None = None  # accepted; nothing is stored


class CountTokensRequest(BaseModel):
    model_config = STRICT
    model: Text
    messages: list[Message] = Field(min_length=1)
    system: Text | list[TextBlock] | None = None
    tools: Annotated[list[AnthropicTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: Int = Field(ge=1)
    stop_sequences: Annotated[list[Stop], Field(max_length=16)] | None = None
    stream: Bool | None = False
    temperature: Float | None = Field(None, ge=0, le=1)
    top_p: Float | None = Field(None, gt=0, le=1)
    top_k: Int | None = Field(None, ge=0)
    metadata: Metadata | None = None


EVENTS = {
    200: {
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                    "required": ["data"],
                }
            },
        },
        "description": "The message, or its events while it streams",
    }
}
router = APIRouter(prefix="/v1/messages", responses=_errors(401, 403, 500, body=AnthropicErrorResponse))


def template_messages(body: CountTokensRequest) -> list[dict]:
    """Anthropic's turns as chat templates take them: the system prompt first, tool results as `tool`
    messages, tool uses as an assistant's calls."""
    out: list[dict] = []
    if body.system:
        system = body.system if isinstance(body.system, str) else "".join(b.text for b in body.system)
        out.append({"role": "system", "content": system})
    for m in body.messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        text = "".join(b.text for b in m.content if isinstance(b, TextBlock))
        results = [b for b in m.content if isinstance(b, ToolResultBlock)]
        uses = [b for b in m.content if isinstance(b, ToolUseBlock)]
        if m.role == "user" and uses:
            raise APIError(400, "tool_use blocks belong to assistant turns", param="messages")
        if m.role == "assistant" and results:
            raise APIError(400, "tool_result blocks belong to user turns", param="messages")
        out += [{"role": "tool", "tool_call_id": r.tool_use_id, "content": r.text()} for r in results]
        if m.role == "assistant":
            calls = [{"id": u.id, "type": "function", "function": {"name": u.name, "arguments": u.input}} for u in uses]
            out.append({"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})})
        elif text or not results:
            out.append({"role": "user", "content": text})
    return out


async def plan(s: ServerState, body: CountTokensRequest) -> ChatPlan:
    check_model(s, body.model)
    if body.thinking is not None and body.thinking.type == "enabled" and s.config.reasoning_parser is None:
        raise APIError(
            400, "thinking: this model's reasoning is not parsed (serve --reasoning-parser)", param="thinking"
        )
    tools = None
    choice = body.tool_choice
    if body.tools:
        mode = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type) if choice else "auto"
        parallel = not (choice and choice.disable_parallel_tool_use)
        functions = [_Function(t.name, t.description, t.input_schema) for t in body.tools]
        tools = tool_request(functions, mode or choice.name, parallel)
    elif choice is not None and choice.type in ("any", "tool"):
        raise APIError(400, f"tool_choice {choice.type!r} needs tools", param="tool_choice")
    return await plan_chat(s, template_messages(body), tools, None, "messages")


class _Function:
    def __init__(self, name: str, description: str | None, parameters: dict) -> None:
        self.name, self.description, self.parameters = name, description, parameters


@router.post("/count_tokens", responses=_errors(400, 404, 413, body=AnthropicErrorResponse))
async def count_tokens(body: CountTokensRequest, request: Request) -> dict:
    p = await plan(state(request), body)
    return {"input_tokens": len(p.prompt_ids)}


@router.post("", responses={**EVENTS, **_errors(400, 404, 413, 429, body=AnthropicErrorResponse)})
async def messages(body: MessagesRequest, request: Request):
    s = state(request)
    p = await plan(s, body)
    sampling = {
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": body.top_p or 1.0,
        "top_k": body.top_k or 0,
        "stop": tuple(body.stop_sequences or ()),
    }
    job = submit(s, p.prompt_ids, sampling | p.sampling, body.max_tokens, "messages")
    rid = f"msg_{uuid.uuid4().hex}"
    if body.stream:
        return stream_events(events(s, job, p, rid))
    steps = await collect(job, request)
    return whole(s, job, p, rid, steps)


def stop_reason(step: StepOutput | None, called: bool) -> tuple[str, str | None]:
    if step is None or step.finish_reason == "length":
        return "max_tokens", None
    if step.stop_string is not None:
        return "stop_sequence", step.stop_string
    return ("tool_use" if called else "end_turn"), None


def arguments(text: str) -> dict:
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def usage(job: Job, output_tokens: int) -> dict:
    return {
        "input_tokens": len(job.prompt_ids) - job.cached_tokens,
        "output_tokens": output_tokens,
        "cache_read_input_tokens": job.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def envelope(s: ServerState, rid: str) -> dict:
    return {"id": rid, "type": "message", "role": "assistant", "model": s.config.served_model_name}


def whole(s: ServerState, job: Job, p: ChatPlan, rid: str, steps: list[StepOutput]) -> dict:
    thinking, content = fmt.split_reasoning(reasoning_parser(s, p.prompt_ids), "".join(st.text for st in steps), True)
    parsed = Parsed()
    parsed.add(*fmt.split_tools(p.tool_parser(), content, True))
    blocks: list[dict] = []
    if thinking:
        blocks.append({"type": "thinking", "thinking": thinking, "signature": ""})
    text = parsed.text.strip() if parsed.tool_calls else parsed.text
    if text or not parsed.tool_calls:
        blocks.append({"type": "text", "text": text})
    for c in parsed.tool_calls:
        blocks.append({"type": "tool_use", "id": c.id, "name": c.name, "input": arguments(c.arguments)})
    reason, sequence = stop_reason(steps[-1] if steps else None, bool(parsed.tool_calls))
    return {
        **envelope(s, rid),
        "content": blocks,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(job, len(steps)),
    }


async def events(s: ServerState, job: Job, p: ChatPlan, rid: str) -> AsyncIterator[tuple[str, dict]]:
    """Anthropic's stream: message_start, content blocks (start, deltas, stop), message_delta, message_stop."""
    parser, tools = reasoning_parser(s, p.prompt_ids), p.tool_parser()
    start = {**envelope(s, rid), "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage(job, 0)}
    yield "message_start", {"type": "message_start", "message": start}
    index, open_kind = -1, None  # the block being written: its index and kind (text, thinking, tool_use)

    def open_block(kind: str, block: dict) -> list[tuple[str, dict]]:
        nonlocal index, open_kind
        out = close_block()
        index, open_kind = index + 1, kind
        out.append(("content_block_start", {"type": "content_block_start", "index": index, "content_block": block}))
        return out

    def close_block() -> list[tuple[str, dict]]:
        nonlocal open_kind
        if open_kind is None:
            return []
        open_kind = None
        return [("content_block_stop", {"type": "content_block_stop", "index": index})]

    def delta(d: dict) -> tuple[str, dict]:
        return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}

    n, last, called = 0, None, False
    async for step in job.steps():
        n, last = n + 1, step
        final = step.finish_reason is not None
        thinking, content = fmt.split_reasoning(parser, step.text, final)
        content, calls = fmt.split_tools(tools, content, final)
        out: list[tuple[str, dict]] = []
        if thinking:
            if open_kind != "thinking":
                out += open_block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(delta({"type": "thinking_delta", "thinking": thinking}))
        if content and not (called and not content.strip()):
            if open_kind != "text":
                out += open_block("text", {"type": "text", "text": ""})
            out.append(delta({"type": "text_delta", "text": content}))
        for e in calls:
            if isinstance(e, CallStart):
                called = True
                out += open_block("tool_use", {"type": "tool_use", "id": e.id, "name": e.name, "input": {}})
            elif isinstance(e, CallArguments):
                out.append(delta({"type": "input_json_delta", "partial_json": e.text}))
        for item in out:
            yield item
    if index < 0:  # nothing written: one empty text block
        for item in open_block("text", {"type": "text", "text": ""}):
            yield item
    for item in close_block():
        yield item
    reason, sequence = stop_reason(last, called)
    message_delta = {
        "type": "message_delta",
        "delta": {"stop_reason": reason, "stop_sequence": sequence},
        "usage": {"output_tokens": n},
    }
    yield "message_delta", message_delta
    yield "message_stop", {"type": "message_stop"}


def stream_events(items: AsyncIterator[tuple[str, dict]]) -> EventSourceResponse:
    async def sse() -> AsyncIterator[dict]:
        try:
            async for event, data in items:
                yield {"event": event, "data": json.dumps(data, ensure_ascii=False)}
        except Cancelled:  # the client has gone
            return
        except Exception as e:  # reported in the stream, as Anthropic does; the server goes on
            log.exception("request failed while streaming")
            error = {"type": "error", "error": {"type": "api_error", "message": f"internal error: {type(e).__name__}"}}
            yield {"event": "error", "data": json.dumps(error)}

    return EventSourceResponse(sse(), ping=15)
