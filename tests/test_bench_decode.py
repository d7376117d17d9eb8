"""`hetero-moe bench decode` end to end on a tiny checkpoint: the report is complete and consistent
(the figures themselves are for the device box, never asserted on time)."""

from __future__ import annotations

import json

import pytest

from hetero_moe.bench import decode as bench_decode
from hetero_moe.cli import main
from hetero_moe.engine.engine import Engine
from hetero_moe.synth.large import write_large_checkpoint
from hetero_moe.synth.tiny import tiny_config


@pytest.mark.parametrize("rules", ["cpu-only.yaml", "cpu-only-int4.yaml"])
def test_decode_report_is_consistent(tmp_path, rules: str, monkeypatch) -> None:
    path = write_large_checkpoint(tiny_config("DeepseekV2ForCausalLM"), tmp_path / "m", fp8=False, layers=3)
    bench = bench_decode.DecodeBench("deepseek-v2-lite", rules, layers=3, fp8=False, steps=3, prompt_tokens=5)
    steps, real_step = [], Engine.step

    def counted(self):
        events = real_step(self)
        steps.append(len(events))
        return events

    monkeypatch.setattr(Engine, "step", counted)
    r = bench_decode.run(bench, path)
    # it times the engine's step, as the server runs it: prefill and 2 warm-up steps, a timed pass, the
    # overhead pass and the per-layer pass
    assert r["timed"].startswith("Engine.step") and steps == [1] * (3 + 3 * 3)
    assert r["layers_run"] == 3 and r["moe_layers_run"] == 2 and r["layers_full"] == 27 and r["extrapolated"]
    m = r["per_moe_layer_ms"]
    assert m["total"] > 0 and m["cpu_experts"] > 0 and m["total"] >= m["gpu_and_host"] >= 0
    assert r["per_dense_layer_ms"] > 0 and r["outside_layers_ms"] >= 0
    # extrapolated from the per-layer times to the real 26 MoE and 1 dense layers
    step_ms = r["outside_layers_ms"] + 26 * m["total"] + 1 * r["per_dense_layer_ms"]
    assert r["decode_tok_s"] == pytest.approx(1e3 / step_ms, rel=1e-6)
    assert r["roofline_tok_s"] == pytest.approx(r["dram_read_gbps"]["best"] * 1e9 / r["routed_bytes_per_token"])
    assert r["share_of_roofline"] == pytest.approx(r["decode_tok_s"] / r["roofline_tok_s"])
    config = tiny_config("DeepseekV2ForCausalLM")
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size * 2  # bf16 experts
    if rules == "cpu-only.yaml":
        assert r["routed_bytes_per_token"] == 26 * config.num_experts_per_tok * per_expert
    else:  # INT4: over a quarter of bf16 (scales, and rows padded to the group at these tiny widths)
        assert 0.25 < r["routed_bytes_per_token"] / (26 * config.num_experts_per_tok * per_expert) < 0.6
    assert r["gpu_memory_gb"] is None and r["cpu_peak_rss_gb"] > 0
    o = r["step_overhead"]  # the time in the integer kernels, where any ran, and outside them
    if rules == "cpu-only.yaml":
        assert o is None  # bf16 experts and float linears: no integer kernel
    else:
        # the whole step in one call (`decoder.step`), the integer kernels and their activations' quantizing inside
        assert o["other_kernels_ms"] > 0 and o["other_kernel_calls"] == 1 and o["kernel_calls"] == 0
        assert o["cpu_weight_kernels_ms"] == o["cpu_activations_ms"] == 0
        assert 0 <= o["outside_share"] < 1 and o["outside_kernels_ms"] >= 0
        assert "outside all of them" in bench_decode.format_report(r)
    # CPU only, every other weight is read each token too: the attention, the shared experts, lm_head...
    lm_head = config.vocab_size * config.hidden_size
    per_weight = {"float32": 4, "bfloat16": 2}[r["dtype"]] if rules == "cpu-only.yaml" else 0.5  # INT4: 0.5 and scales
    assert r["other_cpu_bytes_per_token"] > lm_head * per_weight
    total = r["routed_bytes_per_token"] + r["other_cpu_bytes_per_token"]
    assert r["cpu_roofline_tok_s"] == pytest.approx(r["dram_read_gbps"]["best"] * 1e9 / total)


def test_decode_cli_writes_its_checkpoint_once(tmp_path, capsys, monkeypatch) -> None:
    written = []

    def tiny_checkpoint(config, out, *, fp8, layers, routing_skew):
        written.append(out)
        return write_large_checkpoint(
            tiny_config("Qwen3MoeForCausalLM"), out, fp8=fp8, layers=layers, routing_skew=routing_skew
        )

    monkeypatch.setattr("hetero_moe.synth.large.write_large_checkpoint", tiny_checkpoint)
    argv = ["bench", "decode", "--arch", "qwen3-30b-a3b", "--rules", "cpu-only.yaml", "--layers", "2", "--steps", "2"]
    argv += ["--checkpoint-dir", str(tmp_path), "--threads", "1"]
    assert main([*argv, "--json", "--prompt-tokens", "40"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arch"] == "qwen3-30b-a3b" and report["layers_full"] == 48 and report["moe_layers_run"] == 1
    assert report["prompt_tokens"] == 40 and report["context_tokens"] >= 40 + 2 * 2
    assert main(argv) == 0
    assert "tok/s after a prompt of 16 tokens" in capsys.readouterr().out
    assert written == [tmp_path / "qwen3-30b-a3b-2-bf16"]  # the second run reuses it
    assert main(["bench", "decode", "--arch", "deepseek-v3", "--layers", "0"]) == 2
    assert "--layers must be at least 1" in capsys.readouterr().err


def test_compare_with_transformers_and_the_report(tmp_path, capsys) -> None:
    from hetero_moe.bench import compare as bench_compare

    path = write_large_checkpoint(tiny_config("DeepseekV3ForCausalLM"), tmp_path / "m", fp8=False, layers=3)
    bench = bench_decode.DecodeBench(
        "deepseek-v3", "cpu-only.yaml", layers=3, fp8=False, steps=2, prompt_tokens=5, prefill=(8, 16)
    )
    # transformers' grouped matmul rejects these tiny bf16 rows on the CPU: its eager experts instead
    r = bench_compare.run(bench, path, experts_implementation="eager")
    ours, theirs = r["ours"], r["transformers"]
    assert [p["tokens"] for p in ours["prefill"]] == [8, 16] == [p["tokens"] for p in theirs["prefill"]]
    for engine in (ours, theirs):
        assert engine["decode_tok_s"] > 0 and all(
            p["tok_s"] == pytest.approx(p["tokens"] / p["ttft_s"]) for p in engine["prefill"]
        )
    assert theirs["device_map"] == "everything on the CPU" and ours["pcie_h2d_gbps"] is None
    out = tmp_path / "out"
    out.mkdir()
    (out / "deepseek-v3.json").write_text(json.dumps(r))
    (out / "unrelated.json").write_text("{}")
    assert main(["bench", "report", str(out)]) == 0
    table = (out / "compare.md").read_text()
    assert "transformers + accelerate offload" in table and "prefill 16 tok/s (TTFT)" in table
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", "report", str(tmp_path / "m")]) == 2
    assert "no `hetero-moe bench compare --json` output" in capsys.readouterr().err
