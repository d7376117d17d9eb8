"""A real uvicorn server on a loopback port, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient

from hetero_moe.engine.scheduler import SchedulerConfig
from hetero_moe.llm import LLM
from hetero_moe.server.app import ServerConfig, create_app
from hetero_moe.server.reasoning import DeepseekR1Parser

MODEL = "tiny-v3"


@contextmanager
def serving(llm: LLM, **config) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(llm, ServerConfig(served_model_name=MODEL, **config))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def llm(tiny) -> LLM:
    return LLM(tiny("DeepseekV3ForCausalLM").path, dtype="float32")


@pytest.fixture
def url(llm) -> Iterator[str]:
    """A server on the module's model for one test: tests that start servers of their own settings on it
    never overlap with this one (one running server a model)."""
    with serving(llm) as u:
        yield u


@pytest.fixture
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models(client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_chat_non_streamed_equals_the_engine(client, llm) -> None:
    messages = [{"role": "user", "content": "Tell me about experts."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    expected = llm.chat(messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streamed_with_usage(client) -> None:
    messages = [{"role": "user", "content": "Stream, please."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=15, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=15,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    plain = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, stream=True))
    assert all(c.usage is None for c in plain)


def test_completions_streamed_and_not(client, llm) -> None:
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    expected = llm.generate("Once upon a time", max_tokens=10, temperature=0)
    assert r.choices[0].text == expected.text and r.usage.completion_tokens == len(expected.token_ids)
    chunks = list(
        client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    ids = client.completions.create(model=MODEL, prompt=expected.prompt_token_ids, max_tokens=10, temperature=0)
    assert ids.choices[0].text == expected.text


def test_default_max_tokens_for_completions_is_16(client) -> None:
    r = client.completions.create(model=MODEL, prompt="x", temperature=0)
    assert r.usage.completion_tokens <= 16


def test_stop_strings(client) -> None:
    free = client.completions.create(model=MODEL, prompt="The stop", max_tokens=30, temperature=0)
    text = free.choices[0].text
    assert len(text) > 8, text
    stop = text[4:7]
    r = client.completions.create(model=MODEL, prompt="The stop", max_tokens=30, temperature=0, stop=[stop, "@@@"])
    assert r.choices[0].text == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"
    s = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a"}], max_tokens=30, temperature=0, stop=stop
    )
    assert stop not in s.choices[0].message.content


def test_seed_reproducible(client) -> None:
    def sample(seed: int) -> str:
        return (
            client.completions.create(
                model=MODEL, prompt="Random", max_tokens=20, temperature=1.0, seed=seed, top_p=0.95
            )
            .choices[0]
            .text
        )

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_the_python_api_while_serving_goes_through_the_worker(llm) -> None:
    """`LLM.chat` while a server runs on the model: its requests are handed to the server's worker and
    batched beside the HTTP ones (one thread runs the model), with the same answers; so also when the
    server has an engine of its own settings."""
    messages = [{"role": "user", "content": "Tell me about experts."}]
    with serving(llm, batching=SchedulerConfig(max_batch=4)) as u:
        client = openai.OpenAI(base_url=f"{u}/v1", api_key="unused", max_retries=0, timeout=60)

        def http() -> str:
            r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
            return r.choices[0].message.content

        alone = http()
        assert llm.engine.driver is not None
        with ThreadPoolExecutor(3) as pool:
            remote = [pool.submit(http) for _ in range(3)]
            local = llm.chat([messages] * 3, max_tokens=12, temperature=0)
            assert [f.result() for f in remote] == [alone] * 3
        assert [c.text for c in local] == [alone] * 3
        steps = llm.stream([messages[0]["content"]] * 2, max_tokens=4, temperature=0)
        next(steps)
        steps.close()  # closing early cancels what is left; the server keeps serving
        assert http() == alone
    assert llm.engine.driver is None and llm.chat(messages, max_tokens=12, temperature=0).text == alone


def test_a_second_server_on_a_running_model_is_refused(llm) -> None:
    """One thread runs a model: a second server on it (of any settings) does not start while the first
    runs, and the first keeps the model, so the Python API still goes through it; after it stops, both work."""
    messages = [{"role": "user", "content": "Hi"}]
    alone = llm.chat(messages, max_tokens=4, temperature=0).text
    with serving(llm) as u:
        driver = llm.engine.driver
        for config in ({}, {"batching": SchedulerConfig(max_batch=2)}):
            app = create_app(llm, ServerConfig(served_model_name=MODEL, **config))
            with pytest.raises(RuntimeError, match="already served by a running server"), TestClient(app):
                pass  # its startup refuses
            assert llm.engine.driver is driver
        assert llm.chat(messages, max_tokens=4, temperature=0).text == alone
        r = httpx.post(f"{u}/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 4,
                                                         "temperature": 0}, timeout=60)  # fmt: skip
        assert r.json()["choices"][0]["message"]["content"] == alone
    assert llm.engine.driver is None
    with serving(llm, batching=SchedulerConfig(max_batch=2)) as u:
        assert llm.chat(messages, max_tokens=4, temperature=0).text == alone


def test_multi_turn_chat(client, llm) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": [{"type": "text", "text": "How are "}, {"type": "text", "text": "you?"}]},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    flat = [{**m, "content": "How are you?"} if isinstance(m["content"], list) else m for m in messages]
    assert r.usage.prompt_tokens == len(llm.chat_ids(flat))
    assert r.choices[0].message.content == llm.chat(flat, max_tokens=8, temperature=0).text


def test_logprobs(client) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "p"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob)  # greedy takes the best
    c = client.completions.create(model=MODEL, prompt="p", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4


def test_nulls_mean_defaults(url) -> None:
    body = {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": None},
            {"role": "user", "content": "y"},
        ],
        "max_tokens": 3,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "n": None,
        "stop": None,
        "seed": None,
        "presence_penalty": None,
        "frequency_penalty": None,
        "stream": None,
        "logprobs": None,
        "user": None,
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(
        f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": None, "echo": None}, timeout=60
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 16


def test_harmless_fields_are_accepted(url) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x", "name": "bob"}, {"role": "assistant", "content": "y"}],
        "max_tokens": 2,
        "user": "someone",
        "n": 1,
        "metadata": {"team": "a"},
        "store": False,
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "logit_bias": {},
        "tools": None,
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("whatever", {"a": 1}, "whatever: unknown field; this server does not support it"),
        ("functions", [{"name": "f"}], "functions: unknown field"),
        ("tools", [{"type": "function", "function": {"name": "f g"}}], "tools.0.function.name: String should match"),
        ("tool_choice", "required", "tool_choice 'required' or a named function needs tools"),
        ("response_format", {"type": "json_schema"}, "response_format.json_schema.json_schema: Field required"),
        (
            "response_format",
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?=a)"}}},
            "the schema cannot be enforced: regex parse error",
        ),
        ("logit_bias", {"5": 1.0}, "logit_bias is not supported yet"),
        ("store", True, "store is not supported"),
        ("stream_options", {"include_usage": True, "extra": 1}, "stream_options.extra: unknown field"),
        ("messages", [{"role": "user", "content": "x", "audio": {}}], "messages.0.audio: unknown field"),
        ("messages", [{"role": "tool", "content": "x"}], "a tool message needs the tool_call_id"),
    ],
)
def test_fields_we_do_not_honour_are_refused(url, field: str, value, message: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, field: value}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["param"] == field and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "model"),
        ("/v1/chat/completions", {"model": MODEL}, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 5},
            "temperature",
        ),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": [""]},
            "stop",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "presence_penalty": 9},
            "presence_penalty",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 50, "logprobs": True},
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            },
            "messages",
        ),
        ("/v1/completions", {"model": MODEL}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": ""}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, "echo"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 10**9]}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, -1]}, "prompt"),
    ],
)
def test_invalid_requests_are_400(url, path: str, body: dict, param: str) -> None:
    r = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"] or "").startswith(param.split(".")[0])


def test_malformed_json_and_prompt_too_long(url, llm) -> None:
    r = httpx.post(
        f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}, timeout=60
    )
    assert r.status_code == 400 and "error" in r.json()
    long_prompt = list(range(3, 3 + llm.engine.max_context + 5))
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": long_prompt}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_unknown_model_is_404(client) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"


def test_health_and_metrics(url) -> None:
    assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for name in (
        "hetero_moe_requests_total",
        "hetero_moe_generation_tokens_total",
        "hetero_moe_time_to_first_token_seconds_bucket",
        "hetero_moe_decode_tokens_per_second",
        "hetero_moe_queue_size",
    ):
        assert name in text
    assert 'status="200"' in text


def test_api_key(llm) -> None:
    with serving(llm, api_key="s3cret") as u:
        assert httpx.get(f"{u}/v1/models", timeout=10).status_code == 401
        bad = httpx.get(f"{u}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10)
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        ok = openai.OpenAI(base_url=f"{u}/v1", api_key="s3cret", max_retries=0)
        assert ok.models.list().data[0].id == MODEL
        assert httpx.get(f"{u}/health", timeout=10).status_code == 200  # not a /v1 route


def test_cors_only_when_asked(llm) -> None:
    headers = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    with serving(llm) as u:
        assert "access-control-allow-origin" not in httpx.options(f"{u}/v1/chat/completions", headers=headers).headers
    with serving(llm, allow_origins=("http://localhost:3000",)) as u:
        r = httpx.options(f"{u}/v1/chat/completions", headers=headers, timeout=10)
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"


def wait_for_metrics(url: str, *lines: str, within: float = 10.0) -> None:
    """Polls /metrics until it shows every one of `lines`; fails with the last text after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        missing = [line for line in lines if line not in metrics]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"/metrics never showed {missing}:\n{metrics}")
        time.sleep(0.1)


def never_ending(llm: LLM, monkeypatch) -> LLM:
    """`llm` whose model never emits EOS, so a request runs until max_tokens or the context's end."""
    monkeypatch.setattr(llm.engine, "eos_ids", frozenset())
    monkeypatch.setattr(llm, "eos_ids", frozenset())  # engines made for other batching settings
    return llm


@pytest.fixture
def endless(llm, monkeypatch):
    """The model never emits EOS, so a request runs until max_tokens: a long, busy engine."""
    return never_ending(llm, monkeypatch)


def test_queue_full_and_disconnect_cancels(endless) -> None:
    with serving(endless, max_queue=1, batching=SchedulerConfig(max_batch=1)) as u:
        long_body = {"model": MODEL, "prompt": "long", "max_tokens": 2000, "stream": True}
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", f"{u}/v1/completions", json=long_body) as stream:
                lines = stream.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))  # the engine is busy now
                queued = threading.Thread(
                    target=lambda: http.post(
                        f"{u}/v1/completions", json={"model": MODEL, "prompt": "q", "max_tokens": 2}
                    )
                )
                queued.start()
                time.sleep(0.5)
                full = httpx.post(
                    f"{u}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=60
                )
                assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
            # the stream is closed mid-generation: its job is cancelled, the queue drains at once
            queued.join(timeout=30)
            start = time.monotonic()
            r = http.post(f"{u}/v1/completions", json={"model": MODEL, "prompt": "next", "max_tokens": 3})
            assert r.status_code == 200 and time.monotonic() - start < 10
        metrics = httpx.get(f"{u}/metrics", timeout=10).text
        assert "hetero_moe_cancelled_total 1" in metrics
        assert "hetero_moe_running_requests 0" in metrics and "hetero_moe_queue_size 0" in metrics


def test_non_streamed_disconnect_cancels(endless) -> None:
    with serving(endless) as u:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{u}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2000}, timeout=1.0)
        start = time.monotonic()
        r = httpx.post(f"{u}/v1/completions", json={"model": MODEL, "prompt": "y", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and time.monotonic() - start < 10
        # the gone client's generation is dropped and its handler finishes (no task left waiting); the watcher
        # notices the disconnect within its poll, which may come after the short request above has finished
        wait_for_metrics(
            u,
            "hetero_moe_cancelled_total 1",
            "hetero_moe_running_requests 0",
            'endpoint="/v1/completions",status="499"} 1',
        )


def test_a_failing_request_does_not_take_the_server_down(llm, monkeypatch) -> None:
    with serving(llm) as u:
        real, bad = llm.runner.forward, llm.encode("zz zz")

        def broken(batch, *args):
            if batch.ids[: len(bad)].tolist() == bad:
                raise RuntimeError("boom")
            return real(batch, *args)

        monkeypatch.setattr(llm.runner, "forward", broken)
        r = httpx.post(f"{u}/v1/completions", json={"model": MODEL, "prompt": "zz zz", "max_tokens": 7}, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        s = httpx.post(
            f"{u}/v1/completions",
            json={"model": MODEL, "prompt": "zz zz", "max_tokens": 7, "stream": True},
            timeout=60,
        )
        assert "server_error" in s.text and s.text.rstrip().endswith("data: [DONE]")
        ok = httpx.post(f"{u}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200


def test_reasoning_parser_in_the_server(tiny, tmp_path) -> None:
    path = shutil.copytree(tiny("DeepseekV3ForCausalLM").path, tmp_path / "r1")
    template = (path / "chat_template.jinja").read_text()
    (path / "chat_template.jinja").write_text(
        template.replace("'<｜Assistant｜>' }}{%- endif %}", "'<｜Assistant｜><think>\\n' }}{%- endif %}")
    )
    llm = LLM(path, dtype="float32")
    assert llm.tokenizer.decode(llm.chat_ids([{"role": "user", "content": "q"}])).endswith("<think>\n")
    with serving(llm, reasoning_parser="deepseek-r1") as u:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "q"}], "max_tokens": 10, "temperature": 0}
        r = httpx.post(f"{u}/v1/chat/completions", json=body, timeout=60).json()
        message = r["choices"][0]["message"]
        assert message["reasoning_content"], r and "</think>" not in message["reasoning_content"]
        stream = httpx.post(f"{u}/v1/chat/completions", json={**body, "stream": True}, timeout=60).text
        deltas = [
            json.loads(line[5:])["choices"][0]["delta"]
            for line in stream.splitlines()
            if line.startswith("data:") and "[DONE]" not in line
        ]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]


@pytest.mark.parametrize(
    ("prompt_end", "pieces", "reasoning", "content"),
    [
        (
            "<｜Assistant｜><think>\n",
            ["Let me ", "think.</th", "ink>\n\nThe answer", " is 4."],
            "Let me think.",
            "\n\nThe answer is 4.",
        ),
        ("<｜Assistant｜>", ["<thi", "nk>hmm</think>", "ok"], "hmm", "ok"),
        ("<｜Assistant｜>", ["  <think>a<", "/think>b"], "a", "b"),
        ("<｜Assistant｜>", ["no tags at all"], "", "no tags at all"),
        ("<｜Assistant｜><think>", ["never closed </thi"], "never closed </thi", ""),
        ("<｜Assistant｜>", ["<th"], "", "<th"),
    ],
)
def test_deepseek_r1_parser(prompt_end: str, pieces: list[str], reasoning: str, content: str) -> None:
    p = DeepseekR1Parser(prompt_end)
    r, c = zip(*(p.feed(x) for x in pieces), strict=True)
    fr, fc = p.flush()
    assert "".join(r) + fr == reasoning and "".join(c) + fc == content
