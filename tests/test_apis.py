"""The three APIs the server speaks, each through its official client (`openai`, `ollama`, `anthropic`),
streamed and not, for chat, tool calls and structured output; and their malformed requests (bad JSON,
wrong types, no key), each answered in its API's own error shape."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import ollama
import openai
import pytest
from test_server import MODEL, serving

from hetero_moe.llm import LLM

KEY = "s3cret"
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["Paris", "Rome"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    },
}
TOOLS = [{"type": "function", "function": WEATHER}]
SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["answer", "score", "tags"],
    "additionalProperties": False,
}
HI = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def llm(tiny) -> LLM:
    return LLM(tiny("DeepseekV3ForCausalLM").path, dtype="float32")


@pytest.fixture(scope="module")
def url(llm):
    with serving(llm, api_key=KEY) as u:
        yield u


# OpenAI


@pytest.fixture(scope="module")
def oai(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openai_forced_tool_calls_streamed_and_not(oai) -> None:
    r = oai.chat.completions.create(model=MODEL, messages=HI, tools=TOOLS, tool_choice="required", max_tokens=300)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["parameters"])
    named = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=HI,
            tools=TOOLS,
            tool_choice=named,
            parallel_tool_calls=False,
            max_tokens=300,
            stream=True,
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and deltas[0].type == "function"
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), WEATHER["parameters"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # the call and its result sent back: the next turn runs
    history = [
        *HI,
        {"role": "assistant", "content": None, "tool_calls": [choice.message.tool_calls[0].model_dump()]},
        {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "18C, sunny"},
    ]
    nxt = oai.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=4, temperature=0)
    assert nxt.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_openai_structured_output_streamed_and_not(oai) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    r = oai.chat.completions.create(model=MODEL, messages=HI, response_format=fmt, max_tokens=200)
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    chunks = oai.chat.completions.create(model=MODEL, messages=HI, response_format=fmt, max_tokens=200, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    obj = oai.chat.completions.create(
        model=MODEL, messages=HI, response_format={"type": "json_object"}, max_tokens=3, temperature=0
    )
    assert obj.choices[0].message.content.startswith("{")
    with pytest.raises(openai.BadRequestError, match="cannot be combined"):
        oai.chat.completions.create(model=MODEL, messages=HI, response_format=fmt, tools=TOOLS, tool_choice="required")


# Ollama


@pytest.fixture(scope="module")
def oll(url) -> ollama.Client:
    return ollama.Client(host=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def test_ollama_model_routes(oll, llm) -> None:
    (entry,) = oll.list().models
    assert entry.model == MODEL and entry.size > 0 and entry.details.family == "deepseek_v3"
    (running,) = oll.ps().models
    assert running.context_length == llm.engine.max_sequence
    shown = oll.show(MODEL)
    assert "tools" in shown.capabilities and shown.modelinfo["general.architecture"] == "DeepseekV3ForCausalLM"
    assert oll.show(f"{MODEL}:latest").template == llm.tokenizer.chat_template
    version = httpx.get(f"{oll._client.base_url}/api/version", headers={"Authorization": f"Bearer {KEY}"})
    assert version.json()["version"]


def test_ollama_chat_and_generate_streamed_and_not(oll, llm) -> None:
    options = {"num_predict": 8, "temperature": 0}
    r = oll.chat(model=MODEL, messages=HI, options=options)
    assert r.done and r.message.role == "assistant" and r.eval_count == 8 and r.done_reason == "length"
    assert r.message.content == llm.chat(HI, max_tokens=8, temperature=0).text
    parts = list(oll.chat(model=MODEL, messages=HI, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == r.message.content
    assert parts[-1].done and not any(p.done for p in parts[:-1]) and parts[-1].prompt_eval_count > 0
    g = oll.generate(model=MODEL, prompt="Once upon a time", options=options, raw=True)
    assert g.response == llm.generate("Once upon a time", max_tokens=8, temperature=0).text
    streamed = "".join(
        p.response for p in oll.generate(model=MODEL, prompt="Once upon a time", options=options, raw=True, stream=True)
    )
    assert streamed == g.response
    assert oll.generate(model=MODEL, prompt="").done_reason == "load"


def test_ollama_tools_and_format(oll) -> None:
    r = oll.chat(model=MODEL, messages=HI, format=SCHEMA, options={"num_predict": 200})
    jsonschema.validate(json.loads(r.message.content), SCHEMA)
    text = "".join(
        p.response
        for p in oll.generate(model=MODEL, prompt="x", format="json", stream=True, options={"num_predict": 3})
    )
    assert text.startswith("{")
    auto = oll.chat(model=MODEL, messages=HI, tools=TOOLS, options={"num_predict": 6, "temperature": 0})
    assert auto.done  # a random model seldom calls: text or calls, either parses
    history = [
        *HI,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}}],
        },
        {"role": "tool", "content": "18C", "tool_name": "get_weather"},
    ]
    assert oll.chat(model=MODEL, messages=history, tools=TOOLS, options={"num_predict": 3}).done
    with pytest.raises(ollama.ResponseError, match="repeat_penalty") as info:
        oll.chat(model=MODEL, messages=HI, options={"repeat_penalty": 1.1})
    assert info.value.status_code == 400


# Anthropic


@pytest.fixture(scope="module")
def ant(url) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=60)


def test_anthropic_messages_streamed_and_not(ant, llm) -> None:
    r = ant.messages.create(model=MODEL, max_tokens=8, system="Be brief.", messages=HI, extra_body={"temperature": 0})
    chat = [{"role": "system", "content": "Be brief."}, *HI]
    expected = llm.chat(chat, max_tokens=8, temperature=0)
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == expected.text
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 8
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == len(expected.prompt_token_ids)
    with ant.messages.stream(
        model=MODEL, max_tokens=8, system="Be brief.", messages=HI, extra_body={"temperature": 0}
    ) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert final.content[0].text == expected.text
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_delta" in kinds
    count = ant.messages.count_tokens(model=MODEL, system="Be brief.", messages=HI)
    assert count.input_tokens == len(expected.prompt_token_ids)
    free = llm.generate(llm.chat_ids(chat), max_tokens=30, temperature=0).text
    stop = free[3:5]
    stopped = ant.messages.create(
        model=MODEL,
        max_tokens=30,
        system="Be brief.",
        messages=HI,
        stop_sequences=[stop],
        extra_body={"temperature": 0},
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop


def test_anthropic_tool_use_streamed_and_not(ant) -> None:
    tools = [{"name": WEATHER["name"], "description": WEATHER["description"], "input_schema": WEATHER["parameters"]}]
    r = ant.messages.create(model=MODEL, max_tokens=300, messages=HI, tools=tools, tool_choice={"type": "any"})
    uses = [b for b in r.content if b.type == "tool_use"]
    assert r.stop_reason == "tool_use" and uses
    for use in uses:
        jsonschema.validate(use.input, WEATHER["parameters"])
    choice = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    with ant.messages.stream(model=MODEL, max_tokens=300, messages=HI, tools=tools, tool_choice=choice) as s:
        final = s.get_final_message()
    (use,) = [b for b in final.content if b.type == "tool_use"]
    jsonschema.validate(use.input, WEATHER["parameters"])
    history = [
        *HI,
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18C"}]},
    ]
    nxt = ant.messages.create(model=MODEL, max_tokens=4, messages=history, tools=tools)
    assert nxt.stop_reason in ("max_tokens", "end_turn", "tool_use")


# Malformed requests on the new routes


@pytest.mark.parametrize(
    ("path", "body", "shape"),
    [
        ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "ollama"),
        ("/api/chat", {"model": MODEL, "messages": [], "options": {"temperature": "hot"}}, "ollama"),
        ("/api/chat", {"model": MODEL, "messages": HI, "options": {"mirostat": 1}}, "ollama"),
        ("/api/generate", {"model": MODEL, "prompt": "x", "suffix": "y"}, "ollama"),
        ("/api/generate", {"model": MODEL, "prompt": "x", "images": ["aGk="]}, "ollama"),
        ("/api/generate", {"model": MODEL, "prompt": "x", "format": {"type": "strin"}}, "ollama"),
        ("/api/show", {"model": 5}, "ollama"),
        ("/v1/messages", {"model": MODEL, "messages": HI}, "anthropic"),
        ("/v1/messages", {"model": MODEL, "max_tokens": "8", "messages": HI}, "anthropic"),
        (
            "/v1/messages",
            {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
            "anthropic",
        ),
        (
            "/v1/messages",
            {"model": MODEL, "max_tokens": 8, "messages": HI, "tool_choice": {"type": "any"}},
            "anthropic",
        ),
        ("/v1/messages/count_tokens", {"model": MODEL, "messages": []}, "anthropic"),
    ],
)
def test_malformed_requests_get_their_apis_errors(url, path: str, body: dict, shape: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}{path}", json=body, headers=auth, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()
    if shape == "ollama":
        assert isinstance(error["error"], str) and error["error"]
    else:
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    bad_json = httpx.post(f"{url}{path}", content=b'{"model": ', headers={**auth, "content-type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.text
    assert httpx.post(f"{url}{path}", json=body, timeout=60).status_code == 401
    wrong = httpx.post(f"{url}{path}", json=body, headers={"x-api-key": "nope"}, timeout=60)
    assert wrong.status_code == 401
    other = {**body, "model": "other"}
    assert httpx.post(f"{url}{path}", json=other, headers={"x-api-key": KEY}, timeout=60).status_code in (400, 404)


def test_unknown_model_and_key_on_every_route(url) -> None:
    for path in ("/api/version", "/api/tags", "/api/ps"):
        assert httpx.get(f"{url}{path}", timeout=10).status_code == 401
        assert httpx.get(f"{url}{path}", headers={"x-api-key": KEY}, timeout=10).status_code == 200
    r = httpx.post(f"{url}/api/show", json={"model": "nope"}, headers={"x-api-key": KEY}, timeout=10)
    assert r.status_code == 404 and "nope" in r.json()["error"]
    r = httpx.post(
        f"{url}/v1/messages", json={"model": "nope", "max_tokens": 1, "messages": HI}, headers={"x-api-key": KEY}
    )
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    page = httpx.get(f"{url}/", timeout=10)  # the page is open; what it calls needs the key
    assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
