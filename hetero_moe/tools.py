"""Tool calls in each model family's own format: how to find a chat template's format, how to read the
model's calls out of its text as it streams (names first, then argument fragments), and the grammar that
makes the model write a call (`tool_choice` "required" or a named function), arguments valid against
the function's parameters.

Formats, one row each in `TOOL_FORMATS`:

- `deepseek-v3`: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS
  \\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>` (DeepSeek-V3 and R1).
- `qwen3`: `<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>`, one block per call (Qwen3,
  Hermes).
- `mistral`: `[TOOL_CALLS] [{"name": NAME, "arguments": ARGS}, ...]`, after a control token (Mixtral,
  Mistral); its call ids are 9 letters and digits, as Mistral's templates demand.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hetero_moe.engine.grammar import Grammar, with_json_options

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
MAX_FORCED_CALLS = 8  # calls in one reply whose tool_choice forces parallel calls


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it does, and its arguments' JSON schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise ValueError(f"a function name has 1 to 64 letters, digits, '_' or '-', got {self.name!r}")

    def openai(self) -> dict:
        """The tool as chat templates take it (OpenAI's shape)."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass(frozen=True)
class CallStart:
    """A new call: its index among the calls, id and name (streamed before its arguments)."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    """More of the arguments' JSON text of call `index`."""

    index: int
    text: str


Event = CallStart | CallArguments


class Parsed:
    """What a parser has read so far: the content (text outside calls) and the calls, accumulated from
    the deltas."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.calls: list[list[str]] = []  # [id, name, arguments]

    def add(self, content: str, events: Sequence[Event]) -> None:
        self.content.append(content)
        for e in events:
            if isinstance(e, CallStart):
                self.calls.append([e.id, e.name, ""])
            else:
                self.calls[e.index][2] += e.text

    @property
    def text(self) -> str:
        return "".join(self.content)

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [ToolCall(i, n, a) for i, n, a in self.calls]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _held(text: str, markers: Sequence[str]) -> int:
    return max((_partial_suffix(text, m) for m in markers), default=0)


def openai_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def mistral_id() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(9))


class _Value:
    """One JSON value read a character at a time: whether it is complete."""

    def __init__(self, first: str) -> None:
        self.kind = "string" if first == '"' else "nested" if first in "{[" else "scalar"
        self.depth = 1 if self.kind == "nested" else 0
        self.in_string = self.kind == "string"
        self.escaped = False

    def take(self, ch: str) -> bool | None:
        """Feed the next character after the first: True if it completes the value (and belongs to it),
        None if the value ended before it (a scalar's terminator), False to go on."""
        if self.kind == "scalar":
            return None if ch in ",}] \t\r\n" else False
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
                return self.kind == "string"
            return False
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            return self.depth == 0
        return False


class CallObject:
    """A call written as a JSON object, `{"name": ..., "arguments": {...}}` in any key order, read a
    character at a time: the name once known, then the arguments' text as it comes (held until the name
    is known; a string value, stringified arguments, is decoded once complete)."""

    ARGUMENT_KEYS = ("arguments", "parameters")

    def __init__(self) -> None:
        self.state = "start"  # start, key_or_end, key, colon, value_start, value, comma_or_end, closed
        self.raw: list[str] = []
        self.key_text: list[str] = []
        self.key: str | None = None
        self.value: _Value | None = None
        self.value_text: list[str] = []
        self.name: str | None = None
        self.named = False  # the name has been reported
        self.pending_args: list[str] = []  # arguments read before the name was known
        self.args_seen = False
        self.escaped = False

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    def feed(self, text: str) -> tuple[list[tuple[str, str]], str]:
        """-> ([("name", name) | ("args", fragment)], the text after the object's closing brace)."""
        out: list[tuple[str, str]] = []
        i = 0
        while i < len(text):
            if self.state == "closed":
                return out, text[i:]
            ch = text[i]
            if not self._step(ch, out):
                continue  # the character ended a scalar value: read it again in the object's state
            self.raw.append(ch)
            i += 1
        return out, ""

    def _step(self, ch: str, out: list[tuple[str, str]]) -> bool:
        """One character; False if it must be read again (it ended a scalar value)."""
        state = self.state
        if state == "start":
            if ch == "{":
                self.state = "key_or_end"
            elif not ch.isspace():
                raise ValueError("not a JSON object")
        elif state in ("key_or_end", "comma_or_end"):
            if ch == "}":
                self.state = "closed"
            elif ch == "," and state == "comma_or_end":
                self.state = "key_or_end"
            elif ch == '"' and state == "key_or_end":
                self.state, self.key_text, self.escaped = "key", ['"'], False
            elif not ch.isspace():
                raise ValueError("not a JSON object")
        elif state == "key":
            self.key_text.append(ch)
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.key = json.loads("".join(self.key_text))
                self.state = "colon"
        elif state == "colon":
            if ch == ":":
                self.state = "value_start"
            elif not ch.isspace():
                raise ValueError("not a JSON object")
        elif state == "value_start":
            if not ch.isspace():
                self.value, self.value_text, self.state = _Value(ch), [ch], "value"
                self._value_text(ch, out)
        elif state == "value":
            done = self.value.take(ch)
            if done is None:
                self._value_done(out)
                self.state = "comma_or_end"
                return False
            self.value_text.append(ch)
            self._value_text(ch, out)
            if done:
                self._value_done(out)
                self.state = "comma_or_end"
        return True

    def _streams_args(self) -> bool:
        return self.key in self.ARGUMENT_KEYS and self.value is not None and self.value.kind != "string"

    def _value_text(self, ch: str, out: list[tuple[str, str]]) -> None:
        if self._streams_args():
            self.args_seen = True
            if self.named:
                out.append(("args", ch))
            else:
                self.pending_args.append(ch)

    def _value_done(self, out: list[tuple[str, str]]) -> None:
        text = "".join(self.value_text)
        if self.key == "name" and self.value.kind == "string" and self.name is None:
            self.name = json.loads(text)
            self.named = True
            out.append(("name", self.name))
            if self.pending_args:
                out.append(("args", "".join(self.pending_args)))
                self.pending_args = []
        elif self.key in self.ARGUMENT_KEYS and self.value.kind == "string" and not self.args_seen:
            self.args_seen = True
            decoded = json.loads(text)
            if self.named:
                out.append(("args", decoded))
            else:
                self.pending_args.append(decoded)


class ToolParser:
    """Reads one output's text as it streams: `feed(delta)` -> (content delta, call events), `finish()`
    at the end. At most `max_calls` calls are reported (1 when parallel calls are off); later ones are
    dropped. A call the model left without a name comes back as content."""

    markers: tuple[str, ...] = ()  # what starts calls: text that may be one is held back from content

    def __init__(self, new_id: Callable[[], str], max_calls: int | None = None) -> None:
        self.new_id, self.max_calls = new_id, max_calls
        self.buffer = ""  # text not yet handed out
        self.calls = 0  # calls started
        self.dropping = False  # past max_calls: the rest is dropped

    def feed(self, text: str) -> tuple[str, list[Event]]:
        self.buffer += text
        return self._run(final=False)

    def finish(self) -> tuple[str, list[Event]]:
        return self._run(final=True)

    def _run(self, final: bool) -> tuple[str, list[Event]]:
        raise NotImplementedError

    def _start(self, name: str, events: list[Event]) -> bool:
        """Report a new call; False (and drop the rest) past `max_calls`."""
        if self.dropping or (self.max_calls is not None and self.calls >= self.max_calls):
            self.dropping = True
            return False
        events.append(CallStart(self.calls, self.new_id(), name))
        self.calls += 1
        return True


class JsonCallsParser(ToolParser):
    """Calls as JSON objects between markers: Qwen3's `<tool_call>{...}</tool_call>` blocks, or
    Mistral's `[TOOL_CALLS] [{...}, {...}]` list."""

    def __init__(self, new_id: Callable[[], str], max_calls: int | None, open_: str, close: str, listed: bool) -> None:
        super().__init__(new_id, max_calls)
        self.open, self.close, self.listed = open_, close, listed
        self.markers = (open_,)
        self.state = "content"  # content, between (in a block or list, outside an object), object
        self.call: CallObject | None = None
        self.raw = ""  # the text of the call being read, for a call without a name

    def _run(self, final: bool) -> tuple[str, list[Event]]:
        content: list[str] = []
        events: list[Event] = []
        while True:
            if self.state == "content":
                at = self.buffer.find(self.open)
                if at < 0:
                    keep = 0 if final else _held(self.buffer, self.markers)
                    content.append(self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    break
                content.append(self.buffer[:at])
                self.raw = self.open
                self.buffer, self.state = self.buffer[at + len(self.open) :], "between"
                if self.listed:
                    self.state = "list_start"
            elif self.state == "list_start":
                stripped = self.buffer.lstrip()
                if not stripped:
                    self.buffer = ""
                    break
                if stripped[0] != "[":
                    self.state, self.buffer = "content", stripped  # a marker with no list after it
                    continue
                self.raw += self.buffer[: len(self.buffer) - len(stripped) + 1]
                self.buffer, self.state = stripped[1:], "between"
            elif self.state == "between":
                stripped = self.buffer.lstrip(" \t\r\n,")
                if not stripped:
                    if not final:
                        self.buffer = ""
                        break
                    self.state = "content"
                    continue
                if stripped[0] == "{":
                    self.raw += self.buffer[: len(self.buffer) - len(stripped)]
                    self.call, self.buffer, self.state = CallObject(), stripped, "object"
                elif self.listed and stripped[0] == "]":
                    self.buffer, self.state = stripped[1:], "content"
                elif not self.listed and stripped.startswith(self.close):
                    self.buffer, self.state = stripped[len(self.close) :], "after"
                elif not self.listed and self.close.startswith(stripped) and not final:
                    self.buffer = stripped
                    break
                else:  # not a call after all: content again
                    self.buffer, self.state = stripped, "content"
            elif self.state == "after":  # blank lines between two blocks are no content
                stripped = self.buffer.lstrip()
                if stripped.startswith(self.open) or (not final and self.open.startswith(stripped)):
                    self.buffer = stripped
                    if not stripped.startswith(self.open):
                        break
                    self.state = "content"
                elif not stripped:
                    self.buffer = ""
                    break
                else:
                    self.state = "content"
            elif self.state == "object" and not self._read_object(final, content, events):
                break
        return "".join(content), events

    def _read_object(self, final: bool, content: list[str], events: list[Event]) -> bool:
        """Feed the buffer to the call being read; whether to go on (the object closed, or is not JSON)."""
        if not self.buffer:
            if final:
                self._unfinished(content)
            return False
        try:
            out, rest = self.call.feed(self.buffer)
        except ValueError:  # not JSON: what was read is content
            content.append(self.raw + self.buffer)
            self.buffer, self.state = "", "content"
            return True
        self.raw += self.buffer[: len(self.buffer) - len(rest)]
        self.buffer = rest
        self._emit(out, events)
        if self.call.closed:
            if not self.call.named and not self.dropping:
                content.append(self.raw)
            self.raw, self.state = "", "between"
            return True
        if final:
            self._unfinished(content)
        return False

    def _emit(self, out: list[tuple[str, str]], events: list[Event]) -> None:
        for kind, value in out:
            if kind == "name":
                self._start(value, events)
            elif not self.dropping:
                events.append(CallArguments(self.calls - 1, value))

    def _unfinished(self, content: list[str]) -> None:
        if self.call is not None and not self.call.named and not self.dropping:
            content.append(self.raw)
        self.state = "content"


class DeepseekV3Parser(ToolParser):
    """`<｜tool▁calls▁begin｜>` then calls `<｜tool▁call▁begin｜>TYPE<｜tool▁sep｜>NAME\\n```json\\nARGS
    \\n```<｜tool▁call▁end｜>`, then `<｜tool▁calls▁end｜>`."""

    CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
    CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
    FENCE_OPEN, FENCE_CLOSE = "\n```json\n", "\n```"
    markers = (CALLS_BEGIN, CALL_BEGIN)

    def __init__(self, new_id: Callable[[], str], max_calls: int | None = None) -> None:
        super().__init__(new_id, max_calls)
        self.state = "content"  # content, calls, type, name, args

    def _run(self, final: bool) -> tuple[str, list[Event]]:
        content: list[str] = []
        events: list[Event] = []
        while True:
            buf = self.buffer
            if self.state == "content":
                at = min((i for i in (buf.find(m) for m in self.markers) if i >= 0), default=-1)
                if at < 0:
                    keep = 0 if final else _held(buf, self.markers)
                    content.append(buf[: len(buf) - keep])
                    self.buffer = buf[len(buf) - keep :]
                    break
                content.append(buf[:at])
                self.buffer, self.state = buf[at:], "calls"
                if self.buffer.startswith(self.CALLS_BEGIN):
                    self.buffer = self.buffer[len(self.CALLS_BEGIN) :]
            elif self.state == "calls":
                stripped = buf.lstrip()
                if stripped.startswith(self.CALL_BEGIN):
                    self.buffer, self.state = stripped[len(self.CALL_BEGIN) :], "type"
                elif stripped.startswith(self.CALLS_END):
                    self.buffer, self.state = stripped[len(self.CALLS_END) :], "content"
                elif not final and (not stripped or _held(stripped, (self.CALL_BEGIN, self.CALLS_END))):
                    self.buffer = stripped
                    break
                else:
                    self.buffer, self.state = stripped, "content"
                    if final and not stripped:
                        break
            elif self.state == "type":
                at = buf.find(self.SEP)
                if at < 0:
                    if final:
                        self.buffer, self.state = "", "content"
                    break
                self.buffer, self.state = buf[at + len(self.SEP) :], "name"
            elif self.state == "name":
                at = buf.find(self.FENCE_OPEN)
                if at < 0:
                    if final:
                        self.buffer, self.state = "", "content"
                    break
                name = buf[:at].strip()
                self.buffer, self.state = buf[at + len(self.FENCE_OPEN) :], "args"
                self._start(name, events)
            elif self.state == "args":
                at = buf.find(self.CALL_END)
                if at >= 0:
                    args = buf[:at].rstrip()
                    args = args.removesuffix(self.FENCE_CLOSE.strip()).rstrip() if args.endswith("```") else args
                    self._args(args, events)
                    self.buffer, self.state = buf[at + len(self.CALL_END) :], "calls"
                    continue
                keep = 0 if final else _held(buf, (self.FENCE_CLOSE + self.CALL_END, self.CALL_END))
                if not final and buf.endswith(self.FENCE_CLOSE):
                    keep = max(keep, len(self.FENCE_CLOSE))
                self._args(buf[: len(buf) - keep], events)
                self.buffer = buf[len(buf) - keep :]
                if final:
                    self.state = "content"
                break
        return "".join(content), events

    def _args(self, text: str, events: list[Event]) -> None:
        if text and not self.dropping:
            events.append(CallArguments(self.calls - 1, text))


# Grammars: the call (or calls) the model must write, in its format, arguments valid for their function.


def _json_rule(schema: dict) -> str:
    return "%json " + json.dumps(with_json_options(schema), ensure_ascii=False)


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _call_object_schema(tool: Tool) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _choices(tools: Sequence[Tool], rule: Callable[[int, Tool], str]) -> tuple[str, list[str]]:
    """`call: a0 | a1 ...` and each alternative's rules."""
    rules = [rule(i, t) for i, t in enumerate(tools)]
    return "call: " + " | ".join(f"call{i}" for i in range(len(tools))), rules


def deepseek_grammar(tools: Sequence[Tool], parallel: bool, token: Callable[[str], str]) -> str:
    p = DeepseekV3Parser
    head, rules = _choices(
        tools,
        lambda i, t: (
            f'call{i}: {token(p.CALL_BEGIN)} "function" {token(p.SEP)} {_lark_string(t.name + p.FENCE_OPEN)} '
            f"args{i} {_lark_string(p.FENCE_CLOSE)} {token(p.CALL_END)}\nargs{i}: {_json_rule(t.parameters)}"
        ),
    )
    calls = f"call{{1,{MAX_FORCED_CALLS}}}" if parallel else "call"
    return "\n".join([f"start: {token(p.CALLS_BEGIN)} {calls} {token(p.CALLS_END)}", head, *rules])


def qwen3_grammar(tools: Sequence[Tool], parallel: bool, token: Callable[[str], str]) -> str:
    head, rules = _choices(tools, lambda i, t: f"call{i}: {_json_rule(_call_object_schema(t))}")
    block = f'{token("<tool_call>")} "\\n" call "\\n" {token("</tool_call>")}'
    more = f'("\\n" block){{0,{MAX_FORCED_CALLS - 1}}}'
    start = f"start: block {more}\nblock: {block}" if parallel else f"start: {block}"
    return "\n".join([start, head, *rules])


def mistral_grammar(tools: Sequence[Tool], parallel: bool, token: Callable[[str], str]) -> str:
    head, rules = _choices(tools, lambda i, t: f"call{i}: {_json_rule(_call_object_schema(t))}")
    more = f' (", " call){{0,{MAX_FORCED_CALLS - 1}}}' if parallel else ""
    return "\n".join([f'start: {token("[TOOL_CALLS]")} " [" call{more} "]"', head, *rules])


@dataclass(frozen=True)
class ToolFormat:
    """One model family's tool calls: a marker its chat template holds, its parser, its ids and its grammar.
    `special_markers`: its call markers are control tokens, decoded only when special tokens are kept."""

    name: str
    template_marker: str
    parser: Callable[[Callable[[], str], int | None], ToolParser]
    new_id: Callable[[], str]
    grammar: Callable[[Sequence[Tool], bool, Callable[[str], str]], str]
    special_markers: bool = False

    def new_parser(self, parallel: bool = True) -> ToolParser:
        return self.parser(self.new_id, None if parallel else 1)

    def constraint(self, tools: Sequence[Tool], parallel: bool, token: Callable[[str], str]) -> Grammar:
        """The grammar of a reply that is nothing but calls of `tools` (one, unless `parallel`). `token(text)`
        writes a marker for Lark: the token itself if it is one, else the quoted text."""
        if not tools:
            raise ValueError("no tools to call")
        return Grammar.lark(self.grammar(tools, parallel, token))


TOOL_FORMATS: dict[str, ToolFormat] = {
    f.name: f
    for f in (
        ToolFormat("deepseek-v3", DeepseekV3Parser.CALLS_BEGIN, DeepseekV3Parser, openai_id, deepseek_grammar),
        ToolFormat(
            "qwen3",
            "<tool_call>",
            lambda new_id, n: JsonCallsParser(new_id, n, "<tool_call>", "</tool_call>", listed=False),
            openai_id,
            qwen3_grammar,
        ),
        ToolFormat(
            "mistral",
            "[TOOL_CALLS]",
            lambda new_id, n: JsonCallsParser(new_id, n, "[TOOL_CALLS]", "]", listed=True),
            mistral_id,
            mistral_grammar,
            special_markers=True,
        ),
    )
}


def detect_format(chat_template: str | None) -> ToolFormat | None:
    """The tool format a chat template writes calls in, by the marker it holds; None if none is known."""
    if not chat_template:
        return None
    return next((f for f in TOOL_FORMATS.values() if f.template_marker in chat_template), None)


def parse(fmt: ToolFormat, text: str, parallel: bool = True) -> Parsed:
    """A whole output: its content and calls."""
    parser = fmt.new_parser(parallel)
    parsed = Parsed()
    parsed.add(*parser.feed(text))
    parsed.add(*parser.finish())
    return parsed


@dataclass(frozen=True)
class ToolRequest:
    """The tools of one chat request and how they may be used: `choice` "none" (the tools are not shown to
    the model), "auto" (it may call them), "required" (it must call one or more) or a function's name (it
    must call that one); `parallel`: more than one call per reply."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    parallel: bool = True

    def __post_init__(self) -> None:
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError("two tools have the same name")
        if self.choice not in ("none", "auto"):
            if not self.tools:
                raise ValueError(f"tool_choice {self.choice!r} needs tools")
            if self.choice != "required" and self.choice not in names:
                raise ValueError(f"tool_choice names the function {self.choice!r}, which is not among the tools")

    @property
    def rendered(self) -> list[dict] | None:
        """The tools for the chat template: none when the model must not call them."""
        return [t.openai() for t in self.tools] if self.tools and self.choice != "none" else None

    @property
    def forced(self) -> tuple[Tool, ...]:
        """The tools the reply must call (one of), or () when it is free."""
        if self.choice in ("none", "auto"):
            return ()
        return self.tools if self.choice == "required" else tuple(t for t in self.tools if t.name == self.choice)

    def grammar(self, fmt: ToolFormat, token: Callable[[str], str]) -> Grammar | None:
        """The grammar a forced reply must match, in `fmt`; None when the reply is free."""
        forced = self.forced
        return fmt.constraint(forced, self.parallel and self.choice == "required", token) if forced else None
