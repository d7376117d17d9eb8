"""Grammar constraints: what a request's output must match (a JSON schema, any JSON object, a Lark
grammar), enforced by a token mask before each sampling step.

The masks come from llguidance (chosen by measuring, at a 128k vocabulary, the time to compile a schema
and to compute one mask: llguidance 2-17 ms and about 40-60 µs per token; xgrammar 16-160 ms and
100 µs, 560 µs for any JSON object; outlines-core 0.7-30 s to compile). A request's `Matcher` computes
its next mask on a worker thread right after a token is accepted (llguidance releases the GIL), so the
mask is ready, overlapped with the next forward, when the sampler needs it.

Compiled grammars are cached per tokenizer (least recently used first out), so the server's check of a
request compiles the grammar once, on its own threads, and the engine's request gets a copy.
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

GrammarKind = Literal["json_schema", "json_object", "lark"]
KINDS = ("json_schema", "json_object", "lark")
# JSON is written with one space after ':' and ',' (as json.dumps writes it, and as models mostly do) and
# no other whitespace: flexible whitespace lets a sampled model wander in blanks without end
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}
CACHED_GRAMMARS = 64  # compiled grammars kept per tokenizer
MASK_THREADS = 2  # threads computing the next masks of all constrained requests


class GrammarError(ValueError):
    """A grammar that cannot be enforced (the message names what), or output that left it."""


def with_json_options(schema: dict) -> dict:
    """`schema` with the JSON layout options for llguidance (`x-guidance`), overriding the schema's own."""
    return {**schema, "x-guidance": {**(schema.get("x-guidance") or {}), **JSON_OPTIONS}}


@dataclass(frozen=True)
class Grammar:
    """What a request's output must match. `kind`: "json_schema" (`spec` the schema, as JSON text),
    "json_object" (any JSON object; no spec) or "lark" (an llguidance Lark grammar, which may embed JSON
    schemas with `%json {...}`). Frozen and hashable: compiled grammars are cached by it."""

    kind: GrammarKind
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"grammar kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise ValueError("a grammar's spec must be a string")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
            if not isinstance(schema, dict | bool):
                raise ValueError("a JSON schema must be an object (or a boolean)")
        elif self.kind == "lark" and not self.spec.strip():
            raise ValueError("the Lark grammar is empty")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | str) -> Grammar:
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def json_object(cls) -> Grammar:
        return cls("json_object")

    @classmethod
    def lark(cls, text: str) -> Grammar:
        return cls("lark", text)

    def source(self) -> str:
        """The grammar in llguidance's own format."""
        from llguidance import LLMatcher

        if self.kind == "lark":
            return LLMatcher.grammar_from_lark(self.spec)
        schema = {"type": "object"} if self.kind == "json_object" else json.loads(self.spec)
        if schema is True:
            schema = {}
        if schema is False:
            raise GrammarError("the JSON schema is `false`: nothing matches it")
        return LLMatcher.grammar_from_json_schema(with_json_options(schema))


class Constraints:
    """Grammars compiled for one tokenizer and vocabulary, and the matchers of requests."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_ids: frozenset[int]) -> None:
        try:
            import llguidance.hf
        except ImportError as e:  # a declared dependency; only constrained requests need it
            raise GrammarError("structured output needs the llguidance package (pip install llguidance)") from e
        self.vocab_size = vocab_size
        eos = sorted(eos_ids) or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None)
        # about a second for a 100k+ vocabulary: built once per tokenizer
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.limits = llguidance.LLParserLimits(verbose_errors=False)
        self._compiled: OrderedDict[Grammar, Any] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, grammar: Grammar) -> None:
        """Compile `grammar` (kept for the matchers to come); `GrammarError` naming what cannot be enforced."""
        self._prototype(grammar)

    def matcher(self, grammar: Grammar, prefetch: bool = True) -> Matcher:
        """A matcher at the start of `grammar`; with `prefetch`, each next mask is computed on a worker
        thread as soon as a token is accepted."""
        return Matcher(self._prototype(grammar).deep_copy(), self.vocab_size, _mask_threads() if prefetch else None)

    def _prototype(self, grammar: Grammar):
        from llguidance import LLMatcher

        with self._lock:
            if grammar in self._compiled:
                self._compiled.move_to_end(grammar)
                return self._compiled[grammar]
        try:
            source = grammar.source()
        except (ValueError, TypeError) as e:  # not JSON, or not an object
            raise GrammarError(_one_line(str(e))) from None
        compiled = LLMatcher(self.tokenizer, source, log_level=0, limits=self.limits)  # drops the GIL
        if compiled.is_error():
            raise GrammarError(_one_line(compiled.get_error()))
        with self._lock:
            self._compiled[grammar] = compiled
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return compiled


_constraints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(V, eos): Constraints}
_constraints_lock = threading.Lock()


def constraints_for(tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_ids: frozenset[int]) -> Constraints:
    """The `Constraints` of a tokenizer and vocabulary, built on first use and shared after that."""
    with _constraints_lock:
        per = _constraints.setdefault(tokenizer, {})
        key = (vocab_size, eos_ids)
        if key not in per:
            per[key] = Constraints(tokenizer, vocab_size, eos_ids)
        return per[key]


@functools.cache
def _mask_threads() -> ThreadPoolExecutor:
    """The threads computing next masks, started by the first constrained request (not at import)."""
    return ThreadPoolExecutor(MASK_THREADS, thread_name_prefix="hetero-moe-mask")


class Matcher:
    """One request's place in its grammar: the tokens allowed next, and the tokens it took."""

    def __init__(self, matcher, vocab_size: int, threads: ThreadPoolExecutor | None) -> None:
        self._m, self.vocab_size, self._threads = matcher, vocab_size, threads
        self._bits = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)  # [V / 32] one bit per token
        self._next: Future | None = None
        self._stopped = False
        self._start()

    def allowed(self) -> torch.Tensor:
        """`[V]` bool: the tokens the grammar allows next (EOS among them once the output is complete)."""
        if self._next is not None:
            self._next.result()
            self._next = None
        else:
            self._fill()
        if self._m.is_error():
            raise GrammarError(f"the grammar failed: {_one_line(self._m.get_error())}")
        bits = np.unpackbits(self._bits.numpy().view(np.uint8), bitorder="little", count=self.vocab_size)
        return torch.from_numpy(bits.view(np.bool_))

    def advance(self, token: int) -> None:
        """Take the sampled `token` (one the last mask allowed) and start on the next mask."""
        if not self._m.consume_token(token):
            raise GrammarError(f"token {token} does not fit the grammar: {_one_line(self._m.get_error())}")
        self._start()

    @property
    def done(self) -> bool:
        """Whether the output is complete and nothing may follow."""
        return self._stopped

    def _start(self) -> None:
        # read before the next mask is started: the matcher is not to be touched while a thread computes it
        self._stopped = self._m.is_stopped()
        if self._threads is not None and not self._stopped:
            self._next = self._threads.submit(self._fill)

    def _fill(self) -> None:
        self._m.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)  # drops the GIL


def _one_line(text: str) -> str:
    return " ".join(text.split())
