"""Structured output: a random-weight model sampled at temperature 1 under a grammar's masks still writes
JSON that validates against its schema; a grammar that cannot be enforced is refused; a failing matcher
ends its own request only."""

from __future__ import annotations

import json

import jsonschema
import pytest

from hetero_moe.engine.grammar import Grammar, GrammarError, constraints_for
from hetero_moe.engine.sampler import SamplingParams
from hetero_moe.llm import LLM

SCHEMAS = [
    {  # required and optional properties, bounded string and integer
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "maxLength": 20},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {  # nested objects and an array of enums
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 9999},
                    "roles": {
                        "type": "array",
                        "items": {"enum": ["admin", "user", "guest"]},
                        "minItems": 1,
                        "maxItems": 3,
                    },
                },
                "required": ["id", "roles"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    {  # enums, null
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
            "note": {"type": ["string", "null"], "maxLength": 5},
        },
        "required": ["color", "size", "note"],
        "additionalProperties": False,
    },
    {  # an array of objects at the top
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "boolean"}},
            "required": ["x", "y"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 4,
    },
    {  # $defs and $ref, const, anyOf
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99}},
                "required": ["x"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {
            "kind": {"const": "shape"},
            "points": {"type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 3},
            "label": {"anyOf": [{"type": "string", "maxLength": 6}, {"type": "integer", "minimum": 0, "maximum": 9}]},
        },
        "required": ["kind", "points", "label"],
        "additionalProperties": False,
    },
]


@pytest.fixture(scope="module")
def llm(tiny) -> LLM:
    return LLM(tiny("DeepseekV3ForCausalLM").path, dtype="float32")


def test_100_sampled_completions_validate_against_5_schemas(llm) -> None:
    params = [
        SamplingParams(max_tokens=160, temperature=1.0, seed=i, grammar=Grammar.json_schema(SCHEMAS[i % 5]))
        for i in range(100)
    ]
    outs = llm.generate(["Answer in JSON:"] * 100, params)
    for i, out in enumerate(outs):
        assert out.finish_reason == "stop", (i, out.text)
        jsonschema.validate(json.loads(out.text), SCHEMAS[i % 5])
    assert len({o.text for o in outs}) > 50  # sampled, not one answer
    anything = llm.generate("JSON:", max_tokens=2, temperature=0, grammar=Grammar.json_object())
    assert anything.text.startswith("{")
    short = llm.generate("JSON:", max_tokens=3, json_schema=SCHEMAS[0])  # cut by max_tokens: "length"
    assert short.finish_reason == "length" and short.text.startswith('{"')


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
        ({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}, "nowhere"),
        ({"type": "strin"}, "strin"),
        (False, "nothing matches"),
    ],
)
def test_what_cannot_be_enforced_is_a_clear_error(llm, schema, message: str) -> None:
    constraints = constraints_for(llm.tokenizer, llm.engine.runner.vocab_size, llm.eos_ids)
    with pytest.raises(GrammarError, match=message):
        constraints.check(Grammar.json_schema(schema))
    with pytest.raises(ValueError, match="not valid JSON"):
        Grammar("json_schema", "{")
    with pytest.raises(ValueError, match="grammar must be a Grammar"):
        SamplingParams(grammar={"type": "object"})


def test_a_failing_matcher_ends_its_request_alone(llm, monkeypatch) -> None:
    from hetero_moe.engine import grammar

    calls = {"n": 0}
    original = grammar.Matcher.advance

    def advance(self, token: int) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise GrammarError("broken on purpose")
        original(self, token)

    monkeypatch.setattr(grammar.Matcher, "advance", advance)
    engine = llm.engine
    bad = engine.add_request(llm.encode("a"), SamplingParams(max_tokens=20, grammar=Grammar.json_schema(SCHEMAS[2])))
    good = engine.add_request(llm.encode("b"), SamplingParams(max_tokens=6, temperature=0))
    ended: dict[int, object] = {}
    while engine.has_work():
        for event in engine.step():
            if event.finished:
                ended[event.request_id] = event.output
    assert isinstance(ended[bad], GrammarError)
    assert ended[good].finish_reason in ("stop", "length")
