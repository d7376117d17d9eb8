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
    tool_calls: list[Any] | None = None
    tool_call_id: Text | None = None

    @field_validator("tool_calls", "tool_call_id")
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
    stop: Text | list[Text] | None = None
    presence_penalty: Float | None = Field(None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(None, ge=-2, le=2)
    n: Int | None = None
    stream: Bool | None = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    metadata: dict[Text, Text] | None = None  # accepted; nothing is stored
    store: Bool | None = None
    logit_bias: dict[Text, Float] | None = None
    ignore_eos: Bool | None = None  # an extension (as vLLM's): generate past EOS, for benchmarks

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
        return stop

    @field_validator("store")
    @classmethod
    def _no_store(cls, store: bool | None) -> bool | None:
        if store:
            raise ValueError("store is not supported: this server keeps no completions")
        return store

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, bias: dict | None) -> dict | None:
        if bias:
            raise ValueError("logit_bias is not supported yet")
        return bias

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
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: Bool | None = None  # accepted: without tools it changes nothing
    response_format: Any = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list | None) -> list | None:
        if tools is not None:
            raise ValueError("tools are not supported yet")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, choice: Any) -> Any:
        if choice not in (None, "none"):
            raise ValueError("tool_choice is not supported yet (tool calling is not implemented)")
        return choice

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, fmt: Any) -> Any:
        if fmt not in (None, {"type": "text"}):
            raise ValueError("response_format other than {'type': 'text'} is not supported yet")
        return fmt


class CompletionRequest(SamplingFields):
    prompt: Text | list[Int] | list[Text] | list[list[Int]]
    max_tokens: Int | None = Field(None, ge=1)  # None: 16, OpenAI's default for completions
    logprobs: Int | None = Field(None, ge=0, le=5)
    echo: Bool | None = False
    suffix: Text | None = None
    best_of: Int | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool | None) -> bool | None:
        if echo:
            raise ValueError("echo is not supported")
        return echo

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix (insertion) is not supported")
        return suffix

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return best_of

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise ValueError("only one prompt per request is supported")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt
