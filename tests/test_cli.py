"""The `hetero-moe` command end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hetero_moe.cli import main
from hetero_moe.llm import LLM
from hetero_moe.synth.demo import DEMO_VERSION

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m hetero_moe.cli ARGS` from the checkout's root, where `-m` puts the root, with its kernels/ folder,
    first on sys.path (the command takes it off: transformers imports Hugging Face's `kernels`)."""
    return subprocess.run(
        [sys.executable, "-m", "hetero_moe.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"},
    )


def test_rules_check_json_on_the_real_deepseek_v3_config(capsys) -> None:
    argv = [
        "rules",
        "check",
        "--model",
        "deepseek-v3",
        "--rules",
        "deepseek-v3.yaml",
        "--json",
        "--max-context",
        "8192",
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["devices"]) == {"cpu", "cuda:0"}
    assert 3.4e11 < report["devices"]["cpu"] < 3.5e11 and 1.8e10 < report["devices"]["cuda:0"] < 2.2e10
    assert report["kv_cache"] == {"cuda:0": 61 * 8192 * 576 * 2}  # the latent and rope key, bf16
    assert report["warnings"] == []
    by_name = {m["name"]: m for m in report["modules"]}
    assert by_name["model.layers.60.mlp.experts"] == {
        "name": "model.layers.60.mlp.experts",
        "class": "DeepseekV3Experts",
        "op": "cpu_experts",
        "device": "cpu",
    }
    assert by_name["model.layers.0.self_attn"]["op"] == "attention"
    assert by_name["model.layers.0.self_attn.o_proj"]["op"] == "linear"
    assert by_name["lm_head"]["device"] == "cuda:0" and by_name["lm_head"]["op"] is None


def test_rules_check_text(capsys, tiny) -> None:
    assert main(["rules", "check", "--model", str(tiny("MixtralForCausalLM").path), "--rules", "cpu-only.yaml"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.{0..2}.mlp.experts" in out and "experts" in out
    assert "weights per device:" in out
    assert "warning: " not in out  # the rules Mixtral lacks a part for are optional in the shipped file


def test_rules_check_warns_of_a_rule_that_matches_nothing(capsys, tiny, tmp_path) -> None:
    """The same rules as the shipped `cpu-only.yaml` without `optional`: those Mixtral has no part for warn."""
    text = (Path(__file__).parents[1] / "rules" / "cpu-only.yaml").read_text().replace("  optional: true\n", "")
    (tmp_path / "mine.yaml").write_text(text)
    path = str(tiny("MixtralForCausalLM").path)
    assert main(["rules", "check", "--model", path, "--rules", str(tmp_path / "mine.yaml")]) == 0
    out = capsys.readouterr().out
    assert "warning: " in out and "matches no module of this MixtralForCausalLM" in out


def test_generate_json_is_the_only_stdout(tiny) -> None:
    path = tiny("DeepseekV2ForCausalLM").path
    r = run(
        "generate",
        "--model",
        str(path),
        "--prompt",
        "The quick brown fox",
        "--max-tokens",
        "7",
        "--temperature",
        "0",
        "--dtype",
        "float32",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"prompt_token_ids", "token_ids", "text"}
    expected = LLM(path, dtype="float32").generate("The quick brown fox", max_tokens=7, temperature=0)
    assert out["prompt_token_ids"] == expected.prompt_token_ids
    assert out["token_ids"] == expected.token_ids and out["text"] == expected.text


def test_generate_streams_text(capsys, tiny) -> None:
    path = str(tiny("Qwen3MoeForCausalLM").path)
    assert (
        main(
            [
                "generate",
                "--model",
                path,
                "--prompt",
                "hello",
                "--max-tokens",
                "5",
                "--temperature",
                "0",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    expected = LLM(path, dtype="float32").generate("hello", max_tokens=5, temperature=0)
    assert capsys.readouterr().out == expected.text + "\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rules", "nope.yaml"], "rules file 'nope.yaml' not found"),
        (["--model", "/no/such/dir"], "no config.json"),
        (["--max-tokens", "0"], "max_tokens must be a positive integer"),
        (["--top-p", "2"], "top_p must be in (0, 1]"),
    ],
)
def test_errors_are_one_line_and_exit_2(capsys, tiny, args: list[str], message: str) -> None:
    base = ["generate", "--model", str(tiny("Qwen3MoeForCausalLM").path), "--prompt", "x", "--dtype", "float32"]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err  # before loading a weight


def test_bad_rules_file_names_rule_and_line(capsys, tiny, tmp_path) -> None:
    rules = tmp_path / "bad.yaml"
    rules.write_text("- match: {name: '^$'}\n  replace: {device: cpu}\n- match: {name: x}\n  replace: {op: expertz}\n")
    assert main(["rules", "check", "--model", str(tiny("Qwen3MoeForCausalLM").path), "--rules", str(rules)]) == 2
    err = capsys.readouterr().err
    known = "attention, cpu_experts, cpu_linear, experts, linear, linear_attention, mlp, moe, router"
    assert f"{rules}: rule 1 (line 3): unknown op 'expertz'; known ops: {known}" in err


def test_gpu_rules_without_a_gpu_is_a_clear_error(capsys, tiny) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert (
        main(["generate", "--model", str(tiny("MixtralForCausalLM").path), "--rules", "mixtral.yaml", "--prompt", "x"])
        == 2
    )
    err = capsys.readouterr().err
    assert "torch sees no CUDA device" in err


def test_chat_in_the_terminal(tiny) -> None:
    path = str(tiny("DeepseekV3ForCausalLM").path)
    r = run(
        "chat",
        "--model",
        path,
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "--dtype",
        "float32",
        stdin="hello\n/reset\nagain\n/exit\n",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") == 4  # hello, /reset, again, /exit
    assert len(r.stdout.splitlines()) == 3  # two replies, then the last prompt


def test_demo_model_is_the_default(tmp_path) -> None:
    env_cache = tmp_path / "cache"
    os.environ["HETERO_MOE_CACHE"] = str(env_cache)
    r = run("generate", "--prompt", "Hello", "--max-tokens", "4", "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert "built-in demo model" in r.stderr and "random weights" in r.stderr
    first = json.loads(r.stdout)
    assert len(first["token_ids"]) == 4
    assert (env_cache / f"demo-v{DEMO_VERSION}" / "config.json").is_file()
    again = run("generate", "--prompt", "Hello", "--max-tokens", "4", "--temperature", "0", "--json")
    assert json.loads(again.stdout) == first  # built once, deterministic
