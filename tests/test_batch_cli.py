"""`hetero-moe batch`: a prompt file through the engine, results in input order, resumable, and
bad input refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hetero_moe.cli import main
from hetero_moe.llm import LLM

ARCH = "Qwen3MoeForCausalLM"


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def batch(model: Path, inp: Path, out: Path, *extra: str) -> int:
    args = ["batch", "--model", str(model), "--dtype", "float32", "--input", str(inp), "--output", str(out)]
    return main([*args, "--temperature", "0", "--max-tokens", "6", *extra])


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def prompts(tmp_path) -> Path:
    lines = [
        {"id": "a", "prompt": "hello there"},
        {"id": 2, "messages": [{"role": "user", "content": "tell me about experts"}], "max_tokens": 3},
        {"id": "c", "prompt": "the quick brown fox jumps over the lazy dog " * 3, "stop": ["zz"]},
        {"id": "d", "prompt": "x"},
        {"id": "e", "prompt": "one more line", "temperature": 0.0, "max_tokens": 9, "ignore_eos": True},
    ]
    return write_lines(tmp_path / "in.jsonl", lines)


def test_results_in_input_order_equal_each_prompt_alone(tiny, prompts, tmp_path) -> None:
    path = tiny(ARCH).path
    out = tmp_path / "out.jsonl"
    assert batch(path, prompts, out, "--max-batch", "2") == 0
    got = records(out)
    assert [r["id"] for r in got] == ["a", 2, "c", "d", "e"]
    llm = LLM(path, dtype="float32")
    expected = [
        llm.generate("hello there", max_tokens=6, temperature=0),
        llm.chat([{"role": "user", "content": "tell me about experts"}], max_tokens=3, temperature=0),
        llm.generate("the quick brown fox jumps over the lazy dog " * 3, max_tokens=6, temperature=0, stop="zz"),
        llm.generate("x", max_tokens=6, temperature=0),
        llm.generate("one more line", max_tokens=9, temperature=0, ignore_eos=True),
    ]
    for r, c in zip(got, expected, strict=True):
        assert r["text"] == c.text and r["finish_reason"] == c.finish_reason
        assert r["prompt_tokens"] == len(c.prompt_token_ids) and r["completion_tokens"] == len(c.token_ids)
    assert got[4]["completion_tokens"] == 9


def test_an_interrupted_run_resumes(tiny, prompts, tmp_path, capsys) -> None:
    path = tiny(ARCH).path
    full = tmp_path / "full.jsonl"
    assert batch(path, prompts, full) == 0
    lines = full.read_text(encoding="utf-8").splitlines(keepends=True)
    part = tmp_path / "part.jsonl"
    part.write_text(lines[0] + lines[1] + lines[2][:10], encoding="utf-8")  # killed while writing line 3
    assert batch(path, prompts, part) == 0
    assert part.read_text(encoding="utf-8") == full.read_text(encoding="utf-8")  # 3..5 redone, 1..2 kept
    assert batch(path, prompts, part) == 0  # nothing left to do
    assert "already in" in capsys.readouterr().err
    assert part.read_text(encoding="utf-8") == full.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "in.jsonl:2: not valid JSON"),
        ({"prompt": "no id"}, 'in.jsonl:2: "id" (a string or an integer) is required'),
        ({"id": "a", "prompt": "dup"}, "in.jsonl:2: id 'a' appears twice"),
        ({"id": "b", "prompt": "x", "messages": []}, "in.jsonl:2: give exactly one of"),
        ({"id": "b", "prompt": "x", "temperature": -1}, "in.jsonl:2: temperature must be"),
        ({"id": "b", "prompt": "x", "tools": []}, "in.jsonl:2: unknown field(s) ['tools']"),
    ],
)
def test_a_bad_line_is_an_error_naming_it_and_nothing_is_lost(tiny, tmp_path, capsys, line, message) -> None:
    inp = write_lines(tmp_path / "in.jsonl", [{"id": "a", "prompt": "fine"}, line])
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "z", "text": "kept"}\n', encoding="utf-8")
    assert batch(tiny(ARCH).path, inp, out) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert out.read_text(encoding="utf-8") == '{"id": "z", "text": "kept"}\n'


def test_an_output_that_cannot_be_written_fails_before_loading(tiny, prompts, tmp_path, capsys) -> None:
    assert batch(tiny(ARCH).path, prompts, tmp_path / "no" / "such" / "dir.jsonl") == 2
    assert "No such file or directory" in capsys.readouterr().err
    readonly = tmp_path / "ro.jsonl"
    readonly.write_text("")
    readonly.chmod(0o444)
    if readonly.open("rb").readable() and not _writable(readonly):
        assert batch(tiny(ARCH).path, prompts, readonly) == 2
        assert "Permission denied" in capsys.readouterr().err


def test_a_prompt_longer_than_the_context_gets_an_error_line(tiny, tmp_path) -> None:
    inp = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hi"}, {"id": 2, "prompt": "word " * 100}])
    out = tmp_path / "out.jsonl"
    assert batch(tiny(ARCH).path, inp, out, "--max-context", "32") == 0
    first, second = records(out)
    assert first["id"] == 1 and first["finish_reason"] in ("stop", "length")
    assert second["id"] == 2 and second["finish_reason"] == "error" and "context holds 32" in second["error"]


def _writable(path: Path) -> bool:
    try:
        path.open("a").close()
    except PermissionError:
        return False
    return True
