"""The OpenAI-compatible API: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, plus
`/health` and `/metrics`. Errors use OpenAI's error JSON; bad input is always a 4xx."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hetero_moe.engine.engine import ContextLengthError, StepOutput
from hetero_moe.engine.sampler import SamplingParams
from hetero_moe.engine.scheduler import Cancelled, SchedulerConfig
from hetero_moe.llm import LLM
from hetero_moe.server.metrics import Metrics
from hetero_moe.server.reasoning import REASONING_PARSERS
from hetero_moe.server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from hetero_moe.server.worker import EngineWorker, Job, QueueFullError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_queue: int = 64
    reasoning_parser: str | None = None
    allow_origins: tuple[str, ...] = ()  # browser front ends served from other origins (CORS)
    batching: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {self.max_queue}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(
                f"unknown reasoning parser {self.reasoning_parser!r}; known: {', '.join(REASONING_PARSERS)}"
            )


class ClientGone(Exception):
    """The client of a non-streamed request disconnected; its generation was dropped."""


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def create_app(llm: LLM, config: ServerConfig) -> FastAPI:
    metrics = Metrics()
    worker = EngineWorker(llm.engine, config.max_queue, metrics, config.batching)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="hetero-moe", lifespan=lifespan)
    if config.allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.state.metrics, app.state.worker = metrics, worker

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        metrics.request(request.url.path, e.status)
        return JSONResponse(error_body(e.message, e.type, e.code, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        metrics.request(request.url.path, 400)
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_value", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        metrics.request(request.url.path, e.status_code)
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: ClientGone) -> Response:
        metrics.request(request.url.path, 499)  # nginx's "client closed request"; nobody reads the body
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        metrics.request(request.url.path, 500)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    def authorized(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(
                401, "Incorrect or missing API key; send 'Authorization: Bearer KEY'.", code="invalid_api_key"
            )

    def check_model(name: str) -> None:
        if name != config.served_model_name:
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves '{config.served_model_name}'.",
                code="model_not_found",
                param="model",
            )

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    card = {
        "id": config.served_model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "hetero-moe",
        "max_model_len": worker.max_sequence,
    }

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    async def model(model_id: str) -> dict:
        check_model(model_id)
        return card

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        try:
            messages = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
            ]
            prompt_ids = llm.chat_ids(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        max_tokens = body.max_completion_tokens or body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        job = submit(prompt_ids, body, max_tokens, top)
        parser = None
        if config.reasoning_parser is not None:
            tail = llm.tokenizer.decode(prompt_ids[-16:], skip_special_tokens=False)  # the prompt's end
            parser = REASONING_PARSERS[config.reasoning_parser](tail)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return stream_response(request, chat_chunks(job, body, rid, parser))
        return await chat_response(job, rid, parser, request)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompt_ids = llm.encode(body.prompt)
        job = submit(prompt_ids, body, body.max_tokens or 16, body.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            return stream_response(request, completion_chunks(job, body, rid))
        return await completion_response(job, rid, request)

    def submit(prompt_ids: list[int], body: SamplingFields, max_tokens: int | None, logprobs: int | None) -> Job:
        try:
            llm.engine.check_prompt(prompt_ids)
            room = worker.max_sequence - len(prompt_ids)
            if room < 1:
                raise ContextLengthError(
                    f"the prompt has {len(prompt_ids)} tokens; this server holds {worker.max_sequence} per request "
                    "(the KV cache pool, --kv-cache-tokens), with room for at least one new token"
                )
        except ContextLengthError as e:
            raise APIError(400, str(e), code="context_length_exceeded", param="messages") from e
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
            worker.submit(job)
        except QueueFullError as e:
            raise APIError(429, str(e), type_="rate_limit_error", code="queue_full") from e
        return job

    def stream_response(request: Request, chunks: AsyncIterator[dict]) -> EventSourceResponse:
        metrics.request(request.url.path, 200)

        async def events() -> AsyncIterator[dict]:
            try:
                async for chunk in chunks:
                    yield {"data": json.dumps(chunk, ensure_ascii=False)}
            except Cancelled:  # the client has gone: nobody to tell
                return
            except Exception as e:  # reported to the client in the stream; the server goes on
                log.exception("request failed while streaming")
                yield {"data": json.dumps(error_body(f"internal error: {type(e).__name__}", "server_error"))}
            yield {"data": "[DONE]"}

        return EventSourceResponse(events(), ping=15)

    def envelope(rid: str, kind: str) -> dict:
        return {"id": rid, "object": kind, "created": int(time.time()), "model": config.served_model_name}

    def usage(job: Job, n: int) -> dict:
        p = len(job.prompt_ids)
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}

    def token_text(token_id: int) -> str:
        return llm.tokenizer.decode([token_id], skip_special_tokens=False)

    def chat_logprob(step: StepOutput) -> dict:
        def entry(t: int, lp: float) -> dict:
            text = token_text(t)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {**entry(step.token_id, step.logprob), "top_logprobs": [entry(t, lp) for t, lp in step.top_logprobs]}

    def split(parser, text: str, final: bool) -> tuple[str, str]:
        if parser is None:
            return "", text
        reasoning, content = parser.feed(text)
        if final:
            r2, c2 = parser.flush()
            reasoning, content = reasoning + r2, content + c2
        return reasoning, content

    async def chat_chunks(job: Job, body: ChatCompletionRequest, rid: str, parser) -> AsyncIterator[dict]:
        base = envelope(rid, "chat.completion.chunk")
        extra = {"usage": None} if body.include_usage else {}
        yield {
            **base,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ],
            **extra,
        }
        n = 0
        async for step in job.steps():
            n += 1
            reasoning, content = split(parser, step.text, step.finish_reason is not None)
            delta = {}
            if reasoning:
                delta["reasoning_content"] = reasoning
            if content or not reasoning:
                delta["content"] = content
            lp = {"content": [chat_logprob(step)]} if step.logprob is not None else None
            yield {
                **base,
                "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": step.finish_reason}],
                **extra,
            }
        if body.include_usage:
            yield {**base, "choices": [], "usage": usage(job, n)}

    async def chat_response(job: Job, rid: str, parser, request: Request) -> dict:
        steps = await collect(job, request)
        text = "".join(s.text for s in steps)
        reasoning, content = split(parser, text, True)
        message = {"role": "assistant", "content": content}
        if parser is not None:
            message["reasoning_content"] = reasoning
        lp = {"content": [chat_logprob(s) for s in steps]} if steps and steps[0].logprob is not None else None
        metrics.request(request.url.path, 200)
        return {
            **envelope(rid, "chat.completion"),
            "choices": [{"index": 0, "message": message, "logprobs": lp, "finish_reason": steps[-1].finish_reason}],
            "usage": usage(job, len(steps)),
        }

    def completion_logprobs(steps: list[StepOutput], offset: int = 0) -> dict:
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

    async def completion_chunks(job: Job, body: CompletionRequest, rid: str) -> AsyncIterator[dict]:
        base = envelope(rid, "text_completion")
        extra = {"usage": None} if body.include_usage else {}
        n, offset = 0, 0
        async for step in job.steps():
            n += 1
            lp = completion_logprobs([step], offset) if step.logprob is not None else None
            offset += len(step.text)
            yield {
                **base,
                "choices": [{"index": 0, "text": step.text, "logprobs": lp, "finish_reason": step.finish_reason}],
                **extra,
            }
        if body.include_usage:
            yield {**base, "choices": [], "usage": usage(job, n)}

    async def completion_response(job: Job, rid: str, request: Request) -> dict:
        steps = await collect(job, request)
        lp = completion_logprobs(steps) if steps[0].logprob is not None else None
        metrics.request(request.url.path, 200)
        return {
            **envelope(rid, "text_completion"),
            "choices": [
                {
                    "index": 0,
                    "text": "".join(s.text for s in steps),
                    "logprobs": lp,
                    "finish_reason": steps[-1].finish_reason,
                }
            ],
            "usage": usage(job, len(steps)),
        }

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

    return app
