"""Request bodies of the OpenAI API we serve, validated strictly, and the error body.

A number must be a JSON number (`true` or `"5"` are refused), a flag a JSON boolean, and text valid
Unicode (no lone surrogate escapes). A field this server does not honour is refused with a 400 naming
it, rather than silently ignored. Accepted and harmless: `user`, `metadata`, `n: 1`, `stream_options`,
and the defaults `logit_bias: {}`, `store: false`; a null means "not set". The OpenAPI document is
generated from these same classes.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from hetero_moe.engine.sampler import MAX_STOP_CHARS, MAX_STOPS, SEED_RANGE

STRICT = ConfigDict(extra="forbid")
MAX_TOOLS = 128  # tools per request (OpenAI's limit)


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(r"holds a lone surrogate (an unpaired \ud800-\udfff escape): not valid Unicode text") from None
    return text


Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # a JSON integer is a number too
Bool = Annotated[bool, Strict()]
Text = Annotated[str, Strict(), AfterValidator(_unicode)]
One = Annotated[int, Strict(), Field(ge=1, le=1)]
Stop = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Empty = Annotated[dict[Text, Float], Field(max_length=0)]


def _only(allowed: tuple, message: str):
    """A validator that refuses, with `message`, any value but `allowed` (null among them), before the
    value's type is checked; the field's type documents what is allowed."""

    def check(cls, value: Any) -> Any:
        if value is not None and (isinstance(value, bool) is not isinstance(allowed[0], bool) or value not in allowed):
            raise ValueError(message)
        return value

    return classmethod(check)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, for every 4xx and 5xx."""

    error: ErrorDetail


class OllamaErrorResponse(BaseModel):
    """Ollama's error body, under /api."""

    error: str


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """Anthropic's error body, under /v1/messages."""

    type: Literal["error"]
    error: AnthropicErrorDetail


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: Bool | None = None


class ContentPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: Text | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "text":
            raise ValueError(f"message content of type {data.get('type')!r} is not supported; only text")
        return data


FunctionName = Annotated[str, Strict(), Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
JsonSchema = dict[Text, Any]


class FunctionCall(BaseModel):
    model_config = STRICT
    name: FunctionName
    arguments: Text  # JSON text


class ToolCallItem(BaseModel):
    """A call an earlier answer made, sent back in the conversation."""

    model_config = STRICT
    id: Annotated[Text, Field(min_length=1, max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None  # accepted; chat templates do not use it
    reasoning_content: Text | None = None  # an earlier answer's reasoning, sent back by clients: dropped
    tool_calls: list[ToolCallItem] | None = None  # an assistant's calls
    tool_call_id: Annotated[Text, Field(min_length=1, max_length=256)] | None = None  # a tool result's call

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only tool messages have a tool_call_id")
        return self

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text or "" for part in self.content)

    def for_template(self) -> dict:
        """The message as chat templates take it: arguments as a mapping when they are a JSON object."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": arguments(c)}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def arguments(call: ToolCallItem) -> dict | str:
    try:
        value = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments
    return value if isinstance(value, dict) else call.function.arguments


class FunctionDefinition(BaseModel):
    model_config = STRICT
    name: FunctionName
    description: Text | None = None
    parameters: JsonSchema | None = None  # a JSON schema of the arguments; none: no arguments
    strict: Bool | None = None  # calls that tool_choice forces always follow the schema


class ToolDefinition(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = STRICT
    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: NamedFunction


class TextFormat(BaseModel):
    model_config = STRICT
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = STRICT
    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: FunctionName
    description: Text | None = None
    schema_: JsonSchema | None = Field(None, alias="schema")  # none: any JSON object
    strict: Bool | None = None  # the schema is always enforced


class JsonSchemaFormat(BaseModel):
    model_config = STRICT
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class SamplingFields(BaseModel):
    model_config = STRICT
    model: Text
    # Clients send null for "not set": every optional field takes None and means the default.
    max_tokens: Int | None = Field(None, ge=1)
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, gt=0, le=1)
    top_k: Int | None = Field(None, ge=-1)  # 0 or -1: off
    seed: Int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    presence_penalty: Float | None = Field(None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(None, ge=-2, le=2)
    n: One | None = None
    stream: Bool | None = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    metadata: dict[Text, Text] | None = None  # accepted; nothing is stored
    store: Literal[False] | None = None
    logit_bias: Empty | None = None
    ignore_eos: Bool | None = None  # an extension (as vLLM's): generate past EOS, for benchmarks

    _one_choice = field_validator("n", mode="before")(_only((1,), "only n=1 is supported"))
    _no_store = field_validator("store", mode="before")(
        _only((False,), "store is not supported: this server keeps no completions")
    )
    _no_logit_bias = field_validator("logit_bias", mode="before")(_only(({},), "logit_bias is not supported yet"))

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, stop: Any) -> Any:
        stops = stop if isinstance(stop, list) else [stop] if isinstance(stop, str) else []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        if any(isinstance(s, str) and not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(isinstance(s, str) and len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
        return stop

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: Bool | None = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    tools: Annotated[list[ToolDefinition], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: Bool | None = None  # default true
    response_format: ResponseFormat | None = None


class CompletionRequest(SamplingFields):
    prompt: (
        Annotated[Text, Field(min_length=1)]
        | Annotated[list[Int], Field(min_length=1)]
        | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1, max_length=1)]
        | Annotated[list[Annotated[list[Int], Field(min_length=1)]], Field(min_length=1, max_length=1)]
    )
    max_tokens: Int | None = Field(None, ge=1)  # None: 16, OpenAI's default for completions
    logprobs: Int | None = Field(None, ge=0, le=5)
    echo: Literal[False] | None = False
    suffix: Annotated[Text, Field(max_length=0)] | None = None
    best_of: One | None = None

    _no_echo = field_validator("echo", mode="before")(_only((False,), "echo is not supported"))
    _no_suffix = field_validator("suffix", mode="before")(_only(("",), "suffix (insertion) is not supported"))
    _one_best = field_validator("best_of", mode="before")(_only((1,), "only best_of=1 is supported"))

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if not prompt and isinstance(prompt, str | list):
            raise ValueError("the prompt is empty")
        if isinstance(prompt, list) and isinstance(prompt[0], str | list) and len(prompt) != 1:
            raise ValueError("only one prompt per request is supported")
        return prompt

    @field_validator("prompt")
    @classmethod
    def _unwrap(cls, prompt: str | list) -> str | list[int]:
        return prompt[0] if isinstance(prompt, list) and isinstance(prompt[0], str | list) else prompt
