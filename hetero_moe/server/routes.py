"""The routes: `/health`, `/metrics`, and OpenAI's `/v1/models`, `/v1/chat/completions`,
`/v1/completions`. Each handler validates, turns the request into token ids and sampling parameters,
queues a job for the engine worker, and formats what comes back (`openai_format`)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from sse_starlette import EventSourceResponse

from hetero_moe.engine.request import Cancelled, ContextLengthError, StepOutput
from hetero_moe.engine.sampler import SamplingParams
from hetero_moe.llm import LLM
from hetero_moe.server import openai_format as fmt
from hetero_moe.server.config import ServerConfig
from hetero_moe.server.errors import APIError, ClientGone, authorized
from hetero_moe.server.metrics import Metrics
from hetero_moe.server.reasoning import REASONING_PARSERS
from hetero_moe.server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from hetero_moe.server.worker import EngineWorker, Job, QueueFullError

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """What every handler reads: the model, the settings, the engine worker and the metrics."""

    llm: LLM
    config: ServerConfig
    worker: EngineWorker
    metrics: Metrics
    card: dict  # /v1/models' entry for the served model

    def token_text(self, token_id: int) -> str:
        return self.llm.tokenizer.decode([token_id], skip_special_tokens=False)


def state(request: Request) -> ServerState:
    return request.app.state.server


router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/metrics")
async def prometheus(request: Request) -> PlainTextResponse:
    s = state(request)
    return PlainTextResponse(s.metrics.render(s.worker.stats, s.worker.queued), media_type="text/plain; version=0.0.4")


@v1.get("/models")
async def models(request: Request) -> dict:
    return {"object": "list", "data": [state(request).card]}


@v1.get("/models/{model_id:path}")
async def model(model_id: str, request: Request) -> dict:
    s = state(request)
    check_model(s, model_id)
    return s.card


@v1.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    s = state(request)
    check_model(s, body.model)
    try:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        prompt_ids = s.llm.chat_ids(messages)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from e
    top = (body.top_logprobs or 0) if body.logprobs else None
    job = submit(s, prompt_ids, body, body.max_completion_tokens or body.max_tokens, top)
    parser = None
    if s.config.reasoning_parser is not None:
        tail = s.llm.tokenizer.decode(prompt_ids[-16:], skip_special_tokens=False)  # the prompt's end
        parser = REASONING_PARSERS[s.config.reasoning_parser](tail)
    base = fmt.envelope(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", s.config.served_model_name)
    if body.stream:
        base = {**base, "object": "chat.completion.chunk"}
        chunks = fmt.chat_chunks(job.steps(), base, parser, s.token_text, usage_of(job, body))
        return stream_response(s, request, chunks)
    steps = await collect(job, request)
    s.metrics.request(request.url.path, 200)
    return fmt.chat_response(steps, base, parser, s.token_text, job.usage(len(steps)))


@v1.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    s = state(request)
    check_model(s, body.model)
    prompt_ids = s.llm.encode(body.prompt)
    job = submit(s, prompt_ids, body, body.max_tokens or 16, body.logprobs)
    base = fmt.envelope(f"cmpl-{uuid.uuid4().hex}", "text_completion", s.config.served_model_name)
    if body.stream:
        return stream_response(s, request, fmt.completion_chunks(job.steps(), base, s.token_text, usage_of(job, body)))
    steps = await collect(job, request)
    s.metrics.request(request.url.path, 200)
    return fmt.completion_response(steps, base, s.token_text, job.usage(len(steps)))


router.include_router(v1)


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


def submit(
    s: ServerState, prompt_ids: list[int], body: SamplingFields, max_tokens: int | None, logprobs: int | None
) -> Job:
    """Check the prompt against the engine's limits, build the sampling parameters and queue the job; the
    output may run to the end of the room the prompt leaves when `max_tokens` is not given."""
    engine = s.worker.engine
    try:
        engine.check_prompt(prompt_ids)
    except ContextLengthError as e:
        raise APIError(400, str(e), code="context_length_exceeded", param="messages") from e
    room = engine.max_sequence - len(prompt_ids)
    if room < 1:
        raise APIError(
            400,
            f"the prompt has {len(prompt_ids)} tokens; this server holds {engine.max_sequence} per request "
            "(the KV cache pool, --kv-cache-tokens), with room for at least one new token",
            code="context_length_exceeded",
            param="messages",
        )
    try:
        params = SamplingParams(
            max_tokens=min(max_tokens or room, room),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=body.top_p or 1.0,
            top_k=max(body.top_k or 0, 0),
            seed=body.seed,
            stop=body.stop_strings(),
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logprobs=logprobs,
            ignore_eos=bool(body.ignore_eos),
        )
    except ValueError as e:
        raise APIError(400, str(e)) from e
    job = Job(prompt_ids, params, asyncio.get_running_loop())
    try:
        s.worker.submit(job)
    except QueueFullError as e:
        raise APIError(429, str(e), type_="rate_limit_error", code="queue_full") from e
    return job


def stream_response(s: ServerState, request: Request, chunks: AsyncIterator[dict]) -> EventSourceResponse:
    s.metrics.request(request.url.path, 200)

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
