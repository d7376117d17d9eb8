"""The routes: `/health`, `/metrics`, and OpenAI's `/v1/models`, `/v1/chat/completions`,
`/v1/completions`. Each handler validates, turns the request into token ids (on the tokenizer
threads, never on the event loop, after a byte limit) and sampling parameters, queues a job for the
engine worker, and formats what comes back (`openai_format`). The guard in front of them has checked
the Host, the key and the body's size already."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse

from hetero_moe.engine.grammar import Grammar, GrammarError, constraints_for
from hetero_moe.engine.request import Cancelled, ContextLengthError, StepOutput
from hetero_moe.engine.sampler import SamplingParams
from hetero_moe.llm import LLM
from hetero_moe.server import openai_format as fmt
from hetero_moe.server.config import ServerConfig
from hetero_moe.server.errors import APIError, ClientGone
from hetero_moe.server.metrics import MEDIA_TYPE, Metrics
from hetero_moe.server.reasoning import REASONING_PARSERS
from hetero_moe.server.schemas import ChatCompletionRequest, CompletionRequest, ErrorResponse, SamplingFields
from hetero_moe.server.worker import EngineWorker, Job, QueueFullError
from hetero_moe.tools import Tool, ToolFormat, ToolParser, ToolRequest

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ServerState:
    """What every handler reads: the model, the settings, the engine worker, the metrics, and the threads
    that tokenize."""

    llm: LLM
    config: ServerConfig
    worker: EngineWorker
    metrics: Metrics
    card: dict  # /v1/models' entry for the served model
    tokenizers: ThreadPoolExecutor
    max_prompt_bytes: int  # prompt text beyond this is refused before tokenizing

    def token_text(self, token_id: int) -> str:
        return self.llm.tokenizer.decode([token_id], skip_special_tokens=False)

    async def tokenize(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` (tokenizing, a chat template) on the tokenizer threads: the event loop keeps serving."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizers, fn, *args)


def state(request: Request) -> ServerState:
    return request.app.state.server


def _errors(*statuses: int, body: type = ErrorResponse) -> dict:
    """OpenAPI entries for the errors a route answers, all in its API's error body (OpenAI's by default)."""
    reasons = {
        400: "Invalid request: a bad or unsupported field, malformed JSON, a prompt that cannot fit",
        401: "Missing or wrong API key (with --api-key)",
        403: "Host or Origin not allowed",
        404: "Unknown model",
        413: "Request body too large (--max-request-bytes)",
        429: "The queue of waiting requests is full",
        500: "Internal error",
    }
    return {status: {"model": body, "description": reasons[status]} for status in statuses}


# a streamed answer: each server-sent event's data is a JSON chunk, then "[DONE]" (OpenAPI 3.1 describes
# an event stream by the schema of one event)
EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "required": ["data"],
}
STREAMED = {200: {"content": {"text/event-stream": {"schema": EVENT}}, "description": "The completion"}}
router = APIRouter(responses=_errors(403, 500))
v1 = APIRouter(prefix="/v1", responses=_errors(401))


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {MEDIA_TYPE: {"schema": {"type": "string"}}}}, **_errors(401)},
)
async def prometheus(request: Request) -> Response:
    s = state(request)
    return Response(s.metrics.render(s.worker.stats, s.worker.queued), media_type=MEDIA_TYPE)


@v1.get("/models")
async def models(request: Request) -> dict:
    return {"object": "list", "data": [state(request).card]}


@v1.get("/models/{model_id:path}", responses=_errors(404))
async def model(model_id: str, request: Request) -> dict:
    s = state(request)
    check_model(s, model_id)
    return s.card


@v1.post("/chat/completions", responses={**STREAMED, **_errors(400, 404, 413, 429)})
async def chat_completions(body: ChatCompletionRequest, request: Request):
    s = state(request)
    check_model(s, body.model)
    tools = None
    if body.tools:
        choice = body.tool_choice or "auto"
        name = choice if isinstance(choice, str) else choice.function.name
        tools = tool_request([t.function for t in body.tools], name, body.parallel_tool_calls is not False)
    elif body.tool_choice not in (None, "none", "auto"):
        raise APIError(400, "tool_choice 'required' or a named function needs tools", param="tool_choice")
    output = response_grammar(body.response_format)
    messages = [m.for_template() for m in body.messages]
    plan = await plan_chat(s, messages, tools, output, "response_format")
    top = (body.top_logprobs or 0) if body.logprobs else None
    sampling = openai_sampling(body, top) | plan.sampling
    job = submit(s, plan.prompt_ids, sampling, body.max_completion_tokens or body.max_tokens, "messages")
    parser = reasoning_parser(s, plan.prompt_ids)
    base = fmt.envelope(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", s.config.served_model_name)
    if body.stream:
        base = {**base, "object": "chat.completion.chunk"}
        chunks = fmt.chat_chunks(job.steps(), base, parser, s.token_text, usage_of(job, body), plan.tool_parser())
        return stream_response(chunks)
    steps = await collect(job, request)
    return fmt.chat_response(steps, base, parser, s.token_text, job.usage(len(steps)), plan.tool_parser())


@v1.post("/completions", responses={**STREAMED, **_errors(400, 404, 413, 429)})
async def completions(body: CompletionRequest, request: Request):
    s = state(request)
    check_model(s, body.model)
    if isinstance(body.prompt, str):
        check_prompt_bytes(s, len(body.prompt.encode()), "prompt")
        prompt_ids = await s.tokenize(s.llm.encode, body.prompt)
    else:
        prompt_ids = list(body.prompt)
        check_vocabulary(s, prompt_ids)
    job = submit(s, prompt_ids, openai_sampling(body, body.logprobs), body.max_tokens or 16, "prompt")
    base = fmt.envelope(f"cmpl-{uuid.uuid4().hex}", "text_completion", s.config.served_model_name)
    if body.stream:
        return stream_response(fmt.completion_chunks(job.steps(), base, s.token_text, usage_of(job, body)))
    steps = await collect(job, request)
    return fmt.completion_response(steps, base, s.token_text, job.usage(len(steps)))


router.include_router(v1)


def check_prompt_bytes(s: ServerState, size: int, param: str) -> None:
    """Refuse prompt text too long to fit, before any tokenizing."""
    if size > s.max_prompt_bytes:
        raise APIError(
            400,
            f"the prompt has {size} bytes of text; at most {s.max_prompt_bytes} can fit this server's "
            f"{s.worker.engine.max_sequence} tokens per request (--max-prompt-bytes)",
            code="context_length_exceeded",
            param=param,
        )


def check_vocabulary(s: ServerState, prompt_ids: Sequence[int]) -> None:
    """Token ids given as the prompt must be in the vocabulary (checked after the length: one that is too
    long is refused for that, without looking at a million ids)."""
    if len(prompt_ids) >= s.worker.engine.max_sequence:
        return
    vocab = s.worker.engine.runner.vocab_size
    bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(
            400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", code="invalid_value", param="prompt"
        )


def check_model(s: ServerState, name: str) -> None:
    if name != s.config.served_model_name:
        raise APIError(
            404,
            f"The model '{name}' does not exist; this server serves '{s.config.served_model_name}'.",
            code="model_not_found",
            param="model",
        )


def usage_of(job: Job, body: SamplingFields):
    return job.usage if body.include_usage else None


def openai_sampling(body: SamplingFields, logprobs: int | None) -> dict:
    """SamplingParams' fields (but max_tokens) from an OpenAI request."""
    return {
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": body.top_p or 1.0,
        "top_k": max(body.top_k or 0, 0),
        "seed": body.seed,
        "stop": body.stop_strings(),
        "presence_penalty": body.presence_penalty or 0.0,
        "frequency_penalty": body.frequency_penalty or 0.0,
        "logprobs": logprobs,
        "ignore_eos": bool(body.ignore_eos),
    }


def reasoning_parser(s: ServerState, prompt_ids: list[int]):
    """A new reasoning parser for an answer to `prompt_ids`, if the server has one."""
    if s.config.reasoning_parser is None:
        return None
    tail = s.llm.tokenizer.decode(prompt_ids[-16:], skip_special_tokens=False)  # the prompt's end
    return REASONING_PARSERS[s.config.reasoning_parser](tail)


def tool_request(functions: Sequence, choice: str, parallel: bool) -> ToolRequest:
    """A request's tools (objects with `name`, `description`, `parameters`), as the engine takes them."""
    try:
        tools = tuple(
            Tool(f.name, f.description or "", f.parameters or {"type": "object", "properties": {}}) for f in functions
        )
        return ToolRequest(tools, choice, parallel)
    except ValueError as e:
        raise APIError(400, str(e), param="tool_choice" if "tool_choice" in str(e) else "tools") from e


def response_grammar(response_format) -> Grammar | None:
    """The grammar of OpenAI's `response_format` (None for text)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object" or response_format.json_schema.schema_ is None:
        return Grammar.json_object()
    return Grammar.json_schema(response_format.json_schema.schema_)


@dataclass(frozen=True)
class ChatPlan:
    """A chat request made ready for the engine: its prompt, the grammar its answer must match, and the
    format of the tool calls to read out of the answer."""

    prompt_ids: list[int]
    grammar: Grammar | None = None
    tool_format: ToolFormat | None = None
    parallel: bool = True

    @property
    def sampling(self) -> dict:
        """SamplingParams' fields this plan sets."""
        fields: dict = {"grammar": self.grammar}
        if self.tool_format is not None and self.tool_format.special_markers:
            fields["skip_special_tokens"] = False  # the call markers are control tokens
        return fields

    def tool_parser(self) -> ToolParser | None:
        return self.tool_format.new_parser(self.parallel) if self.tool_format is not None else None


async def plan_chat(
    s: ServerState,
    messages: list[dict],
    tools: ToolRequest | None,
    output: Grammar | None,
    output_param: str,
    tools_param: str = "tools",
) -> ChatPlan:
    """Render and tokenize a chat (with its tools), and compile the grammar its answer must match, on the
    tokenizer threads; every refusal is a 400 naming the field at fault."""
    rendered = tools.rendered if tools is not None else None
    size = sum(len(str(m.get("content") or "").encode()) for m in messages)
    size += len(json.dumps([m.get("tool_calls") for m in messages] + [rendered]).encode())
    check_prompt_bytes(s, size, "messages")

    def work() -> ChatPlan:
        try:
            fmt, forced = s.llm.prompts.tool_setup(tools) if tools is not None else (None, None)
        except ValueError as e:
            raise APIError(400, str(e), param=tools_param) from e
        try:
            prompt_ids = s.llm.chat_ids(messages, rendered)
        except ValueError as e:
            raise APIError(400, str(e), param=tools_param if "tool" in str(e) else "messages") from e
        if forced is not None and output is not None:
            raise APIError(400, f"{output_param} cannot be combined with a forced tool_choice", param=output_param)
        grammar = forced or output
        if grammar is not None:
            engine = s.worker.engine
            try:
                constraints_for(s.llm.tokenizer, engine.runner.vocab_size, engine.eos_ids).check(grammar)
            except GrammarError as e:
                what = "the tools' parameters" if forced is not None else "the schema"
                raise APIError(
                    400,
                    f"{what} cannot be enforced: {e}",
                    param=tools_param if forced is not None else output_param,
                ) from e
        parallel = tools.parallel if tools is not None else True
        return ChatPlan(prompt_ids, grammar, fmt, parallel)

    return await s.tokenize(work)


def submit(s: ServerState, prompt_ids: list[int], sampling: dict, max_tokens: int | None, param: str) -> Job:
    """Check the prompt against the engine's limits, build the sampling parameters (`sampling`: all fields
    but max_tokens) and queue the job; the output may run to the end of the room the prompt leaves when
    `max_tokens` is not given."""
    engine = s.worker.engine
    try:
        engine.check_prompt(prompt_ids)
    except ContextLengthError as e:
        raise APIError(400, str(e), code="context_length_exceeded", param=param) from e
    room = engine.max_sequence - len(prompt_ids)
    if room < 1:
        raise APIError(
            400,
            f"the prompt has {len(prompt_ids)} tokens; this server holds {engine.max_sequence} per request "
            "(the KV cache pool, --kv-cache-tokens), with room for at least one new token",
            code="context_length_exceeded",
            param=param,
        )
    try:
        params = SamplingParams(max_tokens=min(max_tokens or room, room), **sampling)
    except ValueError as e:
        raise APIError(400, str(e)) from e
    job = Job(prompt_ids, params, asyncio.get_running_loop())
    try:
        s.worker.submit(job)
    except QueueFullError as e:
        raise APIError(429, str(e), type_="rate_limit_error", code="queue_full") from e
    return job


def stream_response(chunks: AsyncIterator[dict]) -> EventSourceResponse:
    async def events() -> AsyncIterator[dict]:
        try:
            async for chunk in chunks:
                yield {"data": json.dumps(chunk, ensure_ascii=False)}
        except Cancelled:  # the client has gone: nobody to tell
            return
        except Exception as e:  # reported to the client in the stream; the server goes on
            log.exception("request failed while streaming")
            yield {"data": json.dumps(fmt.error_body(f"internal error: {type(e).__name__}", "server_error"))}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), ping=15)


async def collect(job: Job, request: Request) -> list[StepOutput]:
    """All steps of a non-streamed request; cancels the job if the client goes away meanwhile."""

    async def watch() -> None:
        while not job.cancelled.is_set():
            if await request.is_disconnected():
                job.cancelled.set()
                return
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    try:
        return [step async for step in job.steps()]
    except Cancelled:
        raise ClientGone from None
    finally:
        watcher.cancel()
