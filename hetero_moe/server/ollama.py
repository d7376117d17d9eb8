"""Ollama's API on the same server: `/api/version`, `/api/tags`, `/api/show`, `/api/ps`, `/api/chat` and
`/api/generate` (NDJSON streaming, the default), through the same tokenizer threads, worker and engine
as the OpenAI routes. `options` map to sampling; `format` is "json" or a JSON schema (grammar masks);
tools are rendered by the model's template and calls parsed from its output. Errors are Ollama's
`{"error": message}`. Options this server cannot honour are refused with a 400 naming them; `keep_alive`
is accepted and changes nothing (the model stays loaded)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from hetero_moe.engine.grammar import Grammar
from hetero_moe.engine.request import Cancelled, StepOutput
from hetero_moe.server import openai_format as fmt
from hetero_moe.server.errors import APIError
from hetero_moe.server.routes import (
    ChatPlan,
    ServerState,
    _errors,
    check_model,
    check_prompt_bytes,
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
    Bool,
    Float,
    FunctionName,
    Int,
    JsonSchema,
    OllamaErrorResponse,
    Stop,
    Text,
)
from hetero_moe.server.worker import Job
from hetero_moe.tools import CallArguments, CallStart, Event, ToolParser

log = logging.getLogger(__name__)

OLLAMA_VERSION = "0.12.0"  # the Ollama API whose routes this server follows
NDJSON = "application/x-ndjson"
KEEP_ALIVE_UNTIL = "2100-01-01T00:00:00Z"  # /api/ps: the model is never unloaded


class Options(BaseModel):
    """The model options this server honours; any other is refused, naming it."""

    model_config = STRICT
    num_predict: Int | None = Field(None, ge=-2)  # tokens to generate; -1 or -2: as many as fit
    num_ctx: Int | None = Field(None, ge=1)  # the context of this request: the prompt and its answer
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, gt=0, le=1)
    top_k: Int | None = Field(None, ge=0)
    seed: Int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Annotated[list[Stop], Field(max_length=16)] | None = None
    presence_penalty: Float | None = Field(None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(None, ge=-2, le=2)


class OllamaFunctionCall(BaseModel):
    model_config = STRICT
    name: FunctionName
    arguments: dict[Text, Any]
    index: Int | None = None  # accepted: calls keep their order


class OllamaToolCall(BaseModel):
    model_config = STRICT
    function: OllamaFunctionCall


class OllamaMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant", "tool"]
    content: Text = ""
    thinking: Text | None = None  # an earlier answer's reasoning: dropped, as chat templates do
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: Text | None = None  # the tool a result comes from: calls are matched by order


class OllamaFunction(BaseModel):
    model_config = STRICT
    name: FunctionName
    description: Text | None = None
    parameters: JsonSchema | None = None


class OllamaTool(BaseModel):
    model_config = STRICT
    type: Literal["function"] = "function"
    function: OllamaFunction


Format = Literal["", "json"] | JsonSchema


class OllamaBase(BaseModel):
    model_config = STRICT
    model: Text
    stream: Bool | None = True  # Ollama streams unless told not to
    format: Format | None = None
    options: Options | None = None
    keep_alive: Float | Text | None = None  # accepted: the model stays loaded
    think: Literal[False] | None = None  # thinking cannot be turned on or off here
    logprobs: Bool | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=20)


class ChatRequest(OllamaBase):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: Annotated[list[OllamaTool], Field(max_length=MAX_TOOLS)] | None = None


class GenerateRequest(OllamaBase):
    prompt: Text = ""
    system: Text | None = None
    raw: Bool | None = None  # the prompt as it is, without the chat template
    suffix: Annotated[Text, Field(max_length=0)] | None = None  # insertion is not supported


class ModelRequest(BaseModel):
    model_config = STRICT
    model: Text
    verbose: Bool | None = None  # accepted: the answer is the same


NDJSON_STREAM = {
    200: {
        "content": {NDJSON: {"schema": {"type": "object"}}, "application/json": {"schema": {"type": "object"}}},
        "description": "One JSON object per line while it streams (the default), or one object",
    }
}

router = APIRouter(prefix="/api", responses=_errors(401, 403, 500, body=OllamaErrorResponse))


def ollama_time() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def model_details(s: ServerState) -> dict:
    config = s.llm.placed.config
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    params = sum(math.prod(shape) for *_, shape in s.llm.placed.owned_keys().values())
    return {
        "parent_model": "",
        "format": "safetensors",
        "family": config.model_type,
        "families": [config.model_type],
        "parameter_size": f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M",
        "quantization_level": str(s.llm.placed.dtype).removeprefix("torch.").upper(),
        "_architecture": arch,
        "_parameters": params,
    }


def model_entry(s: ServerState) -> dict:
    details = model_details(s)
    source = s.llm.model_dir  # a GGUF file (identified by name, size and time: it may be hundreds of GB)
    stat = source.stat()
    identity = f"{source.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    if source.is_dir():
        source = source / "config.json"
        stat, identity = source.stat(), source.read_bytes()
    modified = datetime.fromtimestamp(stat.st_mtime, UTC).isoformat().replace("+00:00", "Z")
    digest = hashlib.sha256(identity + s.config.served_model_name.encode()).hexdigest()
    name = s.config.served_model_name
    public = {k: v for k, v in details.items() if not k.startswith("_")}
    size = sum(s.llm.placed.bytes_per_device().values())
    return {"name": name, "model": name, "modified_at": modified, "size": size, "digest": digest, "details": public}


@router.get("/version")
async def version() -> dict:
    return {"version": OLLAMA_VERSION}


@router.get("/tags")
async def tags(request: Request) -> dict:
    return {"models": [model_entry(state(request))]}


@router.get("/ps")
async def ps(request: Request) -> dict:
    s = state(request)
    entry = model_entry(s)
    gpu = sum(n for device, n in s.llm.placed.bytes_per_device().items() if device.startswith("cuda"))
    return {
        "models": [
            {**entry, "expires_at": KEEP_ALIVE_UNTIL, "size_vram": gpu, "context_length": s.worker.engine.max_sequence}
        ]
    }


@router.post("/show", responses=_errors(400, 404, body=OllamaErrorResponse))
async def show(body: ModelRequest, request: Request) -> dict:
    s = state(request)
    check(s, body.model)
    details = model_details(s)
    arch = details["_architecture"]
    capabilities = ["completion"] + (["tools"] if s.llm.prompts.tool_format is not None else [])
    template = s.llm.tokenizer.chat_template if isinstance(s.llm.tokenizer.chat_template, str) else ""
    return {
        "license": "",
        "modelfile": f"# served by hetero-moe from {s.llm.model_dir.name}\nFROM {s.config.served_model_name}\n",
        "parameters": "",
        "template": template or "",
        "details": {k: v for k, v in details.items() if not k.startswith("_")},
        "model_info": {
            "general.architecture": arch,
            "general.parameter_count": details["_parameters"],
            f"{arch}.context_length": s.worker.engine.max_sequence,
        },
        "capabilities": capabilities,
        "modified_at": model_entry(s)["modified_at"],
    }


def check(s: ServerState, name: str) -> None:
    """Ollama names carry a tag (`name:latest`); the served name matches with or without it."""
    if name.removesuffix(":latest") != s.config.served_model_name.removesuffix(":latest"):
        check_model(s, name)


def format_grammar(value: str | dict | None) -> Grammar | None:
    if value is None or value == "":
        return None
    if value == "json":
        return Grammar.json_object()
    return Grammar.json_schema(value)


def sampling(body: OllamaBase) -> dict:
    o = body.options or Options()
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs", param="top_logprobs")
    return {
        "temperature": 0.8 if o.temperature is None else o.temperature,  # Ollama's defaults
        "top_p": 0.9 if o.top_p is None else o.top_p,
        "top_k": 40 if o.top_k is None else o.top_k,
        "seed": o.seed,
        "stop": tuple(o.stop or ()),
        "presence_penalty": o.presence_penalty or 0.0,
        "frequency_penalty": o.frequency_penalty or 0.0,
        "logprobs": (body.top_logprobs or 0) if body.logprobs else None,
    }


def max_tokens(body: OllamaBase, prompt_len: int) -> int | None:
    """`num_predict` (none, -1 or -2: as many as fit), within `num_ctx` when given."""
    o = body.options or Options()
    room = None
    if o.num_ctx is not None:
        if prompt_len >= o.num_ctx:
            raise APIError(400, f"the prompt has {prompt_len} tokens; num_ctx is {o.num_ctx}", param="options")
        room = o.num_ctx - prompt_len
    wanted = o.num_predict if o.num_predict is not None and o.num_predict > 0 else None
    if o.num_predict == 0:
        raise APIError(400, "num_predict must not be 0", param="options")
    return min(x for x in (wanted, room) if x is not None) if wanted or room else None


def template_messages(messages: list[OllamaMessage]) -> list[dict]:
    """Ollama's messages as chat templates take them; calls get ids (9 letters and digits, which every
    template accepts), and each tool result the id of the next call not yet answered."""
    out, ids, n = [], [], 0
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = []
            for c in m.tool_calls:
                n += 1
                ids.append(f"call{n:05d}")
                call = {"name": c.function.name, "arguments": c.function.arguments}
                message["tool_calls"].append({"id": ids[-1], "type": "function", "function": call})
        if m.role == "tool":
            message["tool_call_id"] = ids.pop(0) if ids else f"call{n + 1:05d}"
        out.append(message)
    return out


@router.post("/chat", responses={**NDJSON_STREAM, **_errors(400, 404, 413, 429, body=OllamaErrorResponse)})
async def chat(body: ChatRequest, request: Request):
    s = state(request)
    check(s, body.model)
    check_thinking(s, body)
    if not body.messages:  # Ollama's way of loading a model
        return {**base(s), "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"}
    tools = None
    if body.tools:
        tools = tool_request([t.function for t in body.tools], "auto", True)
    plan = await plan_chat(s, template_messages(body.messages), tools, format_grammar(body.format), "format")
    job = submit(s, plan.prompt_ids, sampling(body) | plan.sampling, max_tokens(body, len(plan.prompt_ids)), "messages")
    lines = chat_lines(s, job, plan)
    if body.stream is not False:
        return ndjson(lines)
    steps = await collect(job, request)
    return whole_chat(s, job, plan, steps)


@router.post("/generate", responses={**NDJSON_STREAM, **_errors(400, 404, 413, 429, body=OllamaErrorResponse)})
async def generate(body: GenerateRequest, request: Request):
    s = state(request)
    check(s, body.model)
    check_thinking(s, body)
    if not body.prompt:  # Ollama's way of loading a model
        return {**base(s), "response": "", "done": True, "done_reason": "load"}
    output = format_grammar(body.format)
    if body.raw:
        if body.system:
            raise APIError(400, "system is not used with raw prompts", param="system")
        check_prompt_bytes(s, len(body.prompt.encode()), "prompt")
        prompt_ids = await s.tokenize(s.llm.encode, body.prompt)
        plan = ChatPlan(prompt_ids, output)
        if output is not None:
            await plan_chat_grammar(s, output)
    else:
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
            {"role": "user", "content": body.prompt}
        ]
        plan = await plan_chat(s, messages, None, output, "format")
    job = submit(s, plan.prompt_ids, sampling(body) | plan.sampling, max_tokens(body, len(plan.prompt_ids)), "prompt")
    lines = generate_lines(s, job)
    if body.stream is not False:
        return ndjson(lines)
    steps = await collect(job, request)
    text = "".join(st.text for st in steps)
    return {**base(s), "response": text, **logprobs_field(s, steps), **final(job, steps)}


async def plan_chat_grammar(s: ServerState, grammar: Grammar) -> None:
    from hetero_moe.engine.grammar import GrammarError, constraints_for

    engine = s.worker.engine

    def work() -> None:
        try:
            constraints_for(s.llm.tokenizer, engine.runner.vocab_size, engine.eos_ids).check(grammar)
        except GrammarError as e:
            raise APIError(400, f"the schema cannot be enforced: {e}", param="format") from e

    await s.tokenize(work)


def check_thinking(s: ServerState, body: OllamaBase) -> None:
    if body.think is not None and s.config.reasoning_parser is None:
        raise APIError(400, "think: this model's reasoning is not parsed (serve --reasoning-parser)", param="think")


def base(s: ServerState) -> dict:
    return {"model": s.config.served_model_name, "created_at": ollama_time()}


def final(job: Job, steps: list[StepOutput]) -> dict:
    """The closing fields: why it stopped, token counts and durations in nanoseconds."""
    now = time.monotonic()
    first = job.first or now
    reason = steps[-1].finish_reason if steps else "stop"
    return {
        "done": True,
        "done_reason": "length" if reason == "length" else "stop",
        "total_duration": int((now - job.arrived) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": len(job.prompt_ids) - job.cached_tokens,
        "prompt_eval_duration": int((first - job.arrived) * 1e9),
        "eval_count": len(steps),
        "eval_duration": int((now - first) * 1e9),
    }


def logprobs_field(s: ServerState, steps: list[StepOutput]) -> dict:
    if not steps or steps[0].logprob is None:
        return {}

    def entry(step: StepOutput) -> dict:
        top = [{"token": s.token_text(t), "logprob": lp} for t, lp in step.top_logprobs]
        return {"token": s.token_text(step.token_id), "logprob": step.logprob, "top_logprobs": top}

    return {"logprobs": [entry(st) for st in steps]}


def ollama_calls(calls: dict[int, list[str]]) -> list[dict]:
    """Finished calls as Ollama writes them: arguments as a JSON object."""
    out = []
    for index, (name, arguments) in sorted(calls.items()):
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            args = {"arguments": arguments}  # not JSON (the answer was cut): kept whole
        out.append({"function": {"index": index, "name": name, "arguments": args if isinstance(args, dict) else {}}})
    return out


class CallCollector:
    """Gathers streamed call events; Ollama sends each call whole, once its arguments are complete."""

    def __init__(self) -> None:
        self.calls: dict[int, list[str]] = {}
        self.open: int | None = None

    def add(self, events: list[Event]) -> dict[int, list[str]]:
        """Calls finished by these events (a call ends when the next one starts)."""
        done: dict[int, list[str]] = {}
        for e in events:
            if isinstance(e, CallStart):
                if self.open is not None:
                    done[self.open] = self.calls[self.open]
                self.calls[e.index] = [e.name, ""]
                self.open = e.index
            elif isinstance(e, CallArguments):
                self.calls[e.index][1] += e.text
        return done

    def rest(self) -> dict[int, list[str]]:
        return {self.open: self.calls[self.open]} if self.open is not None else {}


async def chat_lines(s: ServerState, job: Job, plan: ChatPlan) -> AsyncIterator[dict]:
    parser = reasoning_parser(s, plan.prompt_ids)
    tools: ToolParser | None = plan.tool_parser()
    collector = CallCollector()
    steps: list[StepOutput] = []
    async for step in job.steps():
        steps.append(step)
        last = step.finish_reason is not None
        thinking, content = fmt.split_reasoning(parser, step.text, last)
        content, events = fmt.split_tools(tools, content, last)
        done = collector.add(events)
        if last:
            done |= collector.rest()
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        if done:
            message["tool_calls"] = ollama_calls(done)
        if content or thinking or done:
            yield {**base(s), "message": message, "done": False, **logprobs_field(s, [step])}
    yield {**base(s), "message": {"role": "assistant", "content": ""}, **final(job, steps)}


def whole_chat(s: ServerState, job: Job, plan: ChatPlan, steps: list[StepOutput]) -> dict:
    parser = reasoning_parser(s, plan.prompt_ids)
    thinking, content = fmt.split_reasoning(parser, "".join(st.text for st in steps), True)
    content, events = fmt.split_tools(plan.tool_parser(), content, True)
    collector = CallCollector()
    calls = collector.add(events) | collector.rest()
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if thinking:
        message["thinking"] = thinking
    if calls:
        message["tool_calls"] = ollama_calls(calls)
    return {**base(s), "message": message, **logprobs_field(s, steps), **final(job, steps)}


async def generate_lines(s: ServerState, job: Job) -> AsyncIterator[dict]:
    steps: list[StepOutput] = []
    async for step in job.steps():
        steps.append(step)
        if step.text:
            yield {**base(s), "response": step.text, "done": False, **logprobs_field(s, [step])}
    yield {**base(s), "response": "", **final(job, steps)}


def ndjson(lines: AsyncIterator[dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for line in lines:
                yield (json.dumps(line, ensure_ascii=False) + "\n").encode()
        except Cancelled:  # the client has gone
            return
        except Exception as e:  # reported in the stream, as Ollama does; the server goes on
            log.exception("request failed while streaming")
            yield (json.dumps({"error": f"internal error: {type(e).__name__}"}) + "\n").encode()

    return StreamingResponse(body(), media_type=NDJSON)
