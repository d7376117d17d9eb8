"""Prompts to token ids: the model's tokenizer (never its Python code) and chat template.

Text that comes from users is encoded as plain text: a special token typed into a message (say
`<｜Assistant｜>`) stays those characters and never becomes the control token, so nobody forges a turn;
the chat template's own markers remain special. Safe to call from several threads at once: nothing
here changes a tokenizer's settings after it is built.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import jinja2
from jinja2 import meta
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from hetero_moe.arch import ModelError
from hetero_moe.engine.grammar import Grammar
from hetero_moe.tools import TOOL_FORMATS, ToolFormat, ToolRequest, detect_format


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of `model_dir` from transformers' own classes; one that needs the folder's Python code
    (`auto_map`) is a `ModelError`, never a question on the terminal, and nothing of the folder is run."""
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(
                f"{model_dir}: the tokenizer asks to run Python code from the model directory (auto_map in "
                "tokenizer_config.json or config.json); hetero-moe never runs a model's own code: use a tokenizer "
                "transformers provides (e.g. tokenizer_class PreTrainedTokenizerFast with tokenizer.json)"
            ) from e
        raise ModelError(f"{model_dir}: cannot load the tokenizer: {_one_line(e)}") from e
    except (OSError, TypeError, KeyError, json.JSONDecodeError) as e:
        raise ModelError(f"{model_dir}: cannot load the tokenizer: {_one_line(e)}") from e


class PromptEncoder:
    """Raw prompts and chats to token ids for one tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model_dir: Path) -> None:
        self.tokenizer, self.model_dir = tokenizer, model_dir
        added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.content]
        self._added = re.compile(_trie_pattern(added)) if added else None  # finds any added token's text
        self._plain = _plain_backend(tokenizer) if added else None
        # the most UTF-8 bytes of text one token stands for, at most: vocabulary strings spell each byte with
        # one character or more (byte-level BPE, SentencePiece's '▁' and <0x..> pieces)
        self.max_token_bytes = max((len(t.encode("utf-8")) for t in [*tokenizer.get_vocab(), *added]), default=1)
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
        self.supports_tools = template is not None and "tools" in _template_variables(template)
        self.tool_format: ToolFormat | None = detect_format(template) if self.supports_tools else None

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """A raw prompt: text as the tokenizer encodes it (special tokens included), or token ids as they are."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        return list(prompt)

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """A chat through the model's template, ready for the assistant's answer; `tools` (OpenAI's function
        tools) and messages with tool calls or results need a template that supports tools."""
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{self.model_dir}: the tokenizer has no chat template")
        tooled = tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
        if tooled and not self.supports_tools:
            raise ValueError("this model's chat template does not support tools (tool definitions, calls or results)")
        if tooled and self._added is not None:
            self._check_tool_text(messages, tools or [])
        contents = [m.get("content") or "" for m in messages]
        if self._added is None or not any(self._added.search(c) for c in contents):
            return self._tokens(self._render(messages, tools))
        # some message holds an added token's text: render with a unique mark in place of each message's
        # content, then encode the template's text as usual and each content as plain text between them
        nonce = uuid.uuid4().hex
        marks = [f"\x00{nonce}:{i}\x00" for i in range(len(messages))]
        rendered = self._render([{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)], tools)
        pieces = re.split(f"\x00{nonce}:(\\d+)\x00", rendered)
        used = pieces[1::2]
        if len(used) != len(set(used)):
            raise ValueError(
                "a message holds a special token's text, and this model's chat template repeats message "
                "contents, so it cannot be kept as plain text"
            )
        if any(str(i) not in used for i, c in enumerate(contents) if self._added.search(c)):
            raise ValueError(
                "a message holds a special token's text, and this model's chat template transforms message "
                "contents, so it cannot be kept as plain text"
            )
        ids: list[int] = []
        for n, piece in enumerate(pieces):
            ids += self._tokens(piece) if n % 2 == 0 else self._plain_tokens(contents[int(piece)])
        return ids

    def tool_setup(self, request: ToolRequest) -> tuple[ToolFormat | None, Grammar | None]:
        """The format this model writes calls in and the grammar a forced reply must match (None when the
        reply is free), for a request's tools; a ValueError for tools this model cannot take."""
        if request.rendered is None:
            return None, None
        if not self.supports_tools:
            raise ValueError("this model's chat template does not support tools (tool definitions, calls or results)")
        if self.tool_format is None:
            raise ValueError(
                "this model's chat template takes tools, but writes calls in a format hetero-moe cannot read "
                f"(known: {', '.join(TOOL_FORMATS)})"
            )
        return self.tool_format, request.grammar(self.tool_format, self.token_marker)

    def token_marker(self, text: str) -> str:
        """`text` for a Lark grammar: the token itself (`<[id]>`) if one added token is exactly that text,
        else the text quoted."""
        ids = self.tokenizer.convert_tokens_to_ids([text])
        added = {t.content for t in self.tokenizer.added_tokens_decoder.values()}
        if text in added and ids and ids[0] is not None:
            return f"<[{ids[0]}]>"
        return json.dumps(text, ensure_ascii=False)

    def _check_tool_text(self, messages: list[dict], tools: list[dict]) -> None:
        """Tool definitions and calls are rendered as they are: an added token's text in them would become
        that token, so it is refused."""
        calls = [c for m in messages for c in m.get("tool_calls") or []]
        for what, value in (("a tool definition", tools), ("a tool call", calls)):
            if self._added.search(json.dumps(value, ensure_ascii=False)):
                raise ValueError(
                    f"{what} holds a special token's text; this model's chat template cannot keep it as text"
                )

    def _render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools or None, add_generation_prompt=True, tokenize=False
        )

    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _plain_tokens(self, text: str) -> list[int]:
        if not text:
            return []
        if self._plain is not None:
            return self._plain.encode(text, add_special_tokens=False).ids
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _plain_backend(tokenizer: PreTrainedTokenizerBase) -> Tokenizer | None:
    """A copy of a fast tokenizer's backend that encodes every added token's text as ordinary text (all
    marked special, and special ones split); None for a tokenizer without a backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    for token in spec.get("added_tokens") or []:
        token["special"] = True
    plain = Tokenizer.from_str(json.dumps(spec))
    plain.encode_special_tokens = True
    return plain


def _trie_pattern(words: Iterable[str]) -> str:
    """A regex matching any of `words`, nested by common prefix, so a search costs O(length of the
    longest word) per position whatever the number of words."""
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        if "" in node:
            return ""  # a word ends here: for finding any of them, the shorter one is enough
        alternatives = [re.escape(ch) + build(child) for ch, child in node.items()]
        return alternatives[0] if len(alternatives) == 1 else f"(?:{'|'.join(alternatives)})"

    return build(trie)


def _template_variables(template: str) -> set[str]:
    """The variables a chat template reads from its context (`messages`, `tools`, ...)."""
    try:
        return meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return set()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
