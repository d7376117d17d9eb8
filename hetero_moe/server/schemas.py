"""Request bodies of the OpenAI API we serve, validated strictly, and the error body.

A number must be a JSON number (`true` or `"5"` are refused), a flag a JSON boolean, and text valid
Unicode (no lone surrogate escapes). A field this server does not honour is refused with a 400 naming
it, rather than silently ignored. Accepted and harmless: `user`, `metadata`, `n: 1`, `stream_options`,
`parallel_tool_calls`, and the defaults `tool_choice: "none"`, `response_format: {"type": "text"}`,
`logit_bias: {}`, `store: false`; a null means "not set". Tool calling and structured output are
refused as not supported yet. The OpenAPI document is generated from these same classes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from hetero_moe.engine.sampler import MAX_STOP_CHARS, MAX_STOPS, SEED_RANGE

STRICT = ConfigDict(extra="forbid")


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


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None  # accepted; chat templates do not use it
    reasoning_content: Text | None = None  # an earlier answer's reasoning, sent back by clients: dropped
    tool_calls: Annotated[list[Any], Field(max_length=0)] | None = None
    tool_call_id: None = None

    @field_validator("tool_calls", "tool_call_id", mode="before")
    @classmethod
    def _no_tools(cls, value: Any) -> Any:
        if value:
            raise ValueError("tool calls are not supported yet")
        return value

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text or "" for part in self.content)


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


class TextFormat(BaseModel):
    model_config = STRICT
    type: Literal["text"]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: Bool | None = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    tools: None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: Bool | None = None  # accepted: without tools it changes nothing
    response_format: TextFormat | None = None

    _no_tools = field_validator("tools", mode="before")(_only((None,), "tools are not supported yet"))
    _no_tool_choice = field_validator("tool_choice", mode="before")(
        _only(("none",), "tool_choice is not supported yet (tool calling is not implemented)")
    )
    _text_format = field_validator("response_format", mode="before")(
        _only(({"type": "text"},), "response_format other than {'type': 'text'} is not supported yet")
    )


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
