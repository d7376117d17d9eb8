"""benchmarks/device-check.sh, the one prepared call for the GPU box: its dry run (the same steps on the
CPU at tiny sizes) passes, so the script never fails there on a typo; its failure paths still write
their records; its helper extrapolates the V3 memory and reads JUnit files as documented."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device-check.sh"
STEPS = ["setup", "tests", "decode", "prefill", "profile", "v3-memory"]
NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool brings back from $OUT


def _helper():
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "benchmarks" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    full_env = {**os.environ, "OUT": str(out), "WORK": str(tmp_path), "PYTHON": sys.executable, **env}
    done = subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=1800
    )
    return done, out


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_dry_run_passes_every_step_and_writes_what_comes_back(tmp_path) -> None:
    done, out = run_script(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "00-setup.json",
        "01-tests.json",
        "02-decode.json",
        "03-prefill.json",
        "04-profile.json",
        "05-v3-memory.json",
        "device-check.log",
        "summary.json",
    ]
    assert all(NAME.match(f) for f in files) and len(files) <= 8
    summary = load(out / "summary.json")
    assert summary["mode"] == "dry" and summary["ok"]
    assert list(summary["steps"]) == STEPS and all(s["status"] == "ok" for s in summary["steps"].values())
    assert summary["env"]["python"] and summary["env"]["physical_cores"] >= 1
    assert "device check (dry)" in done.stdout and "decode" in done.stdout  # the table, last in the output

    tests = load(out / "01-tests.json")["result"]
    assert tests["tests"] == tests["skipped"] > 0 and tests["failed"] == tests["errors"] == 0  # no GPU here
    decode = load(out / "02-decode.json")
    assert decode["commands"] and "bench decode" in decode["commands"][0]
    d = decode["result"]
    assert d["arch"] == "deepseek-v2-lite" and d["layers_run"] == 8 and d["layers_full"] == 27
    assert d["decode_tok_s"] > 0 and d["gpu_memory_gb"] is None
    assert [p["tokens"] for p in load(out / "03-prefill.json")["result"]["prefill"]] == [16, 32]
    prof = load(out / "04-profile.json")
    if shutil.which("py-spy"):  # sampled where py-spy is installed (the box gets it as a carried wheel)
        assert prof["result"]["step_samples"] > 0 and prof["result"]["ours"]
    else:
        assert prof["result"] is None and "py-spy is not installed" in prof["note"]
    v3 = load(out / "05-v3-memory.json")["result"]
    assert v3["context_tokens"] == 1024 and v3["layers_run"] == 2 and v3["layers_full"] == 61
    assert v3["predicted_gb"]["full"]["cpu"] > v3["predicted_gb"]["run"]["cpu"] > 0
    assert v3["full_model_estimate_gb"]["allocated_gb"] is None  # no GPU: nothing measured
    assert not (tmp_path / "hetero-moe-check").exists()  # the scratch folder is removed


def test_a_step_over_its_limit_is_recorded_with_its_log(tmp_path) -> None:
    done, out = run_script(tmp_path, "--dry-run", DC_LIMIT_SETUP="1")
    assert done.returncode == 1
    setup = load(out / "00-setup.json")
    assert setup["status"] == "timeout" and setup["rc"] == 124 and setup["log_tail"]
    assert "pip install" in setup["commands"][0]
    summary = load(out / "summary.json")
    assert not summary["ok"] and list(summary["steps"]) == ["setup"]  # nothing runs without the install
    assert "nothing else can run" in (out / "device-check.log").read_text()


def test_a_spent_budget_skips_the_step(tmp_path) -> None:
    done, out = run_script(tmp_path, "--dry-run", DC_BUDGET="12")
    assert done.returncode == 1
    assert load(out / "00-setup.json")["status"] == "skipped"
    assert load(out / "summary.json")["steps"]["setup"]["status"] == "skipped"


def test_arguments_are_checked(tmp_path) -> None:
    done, _ = run_script(tmp_path, "--only", "decode,bogus")
    assert done.returncode == 2 and "got 'bogus'" in done.stderr
    done, _ = run_script(tmp_path, "--frobnicate")
    assert done.returncode == 2 and "unknown argument" in done.stderr
    done, _ = run_script(tmp_path, "--help")
    assert done.returncode == 0 and "--dry-run" in done.stdout and "v3-memory" in done.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck() -> None:
    scripts = [SCRIPT, ROOT / "benchmarks" / "device-wheels.sh"]
    done = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_v3_memory_extrapolates_by_the_predicted_difference(tmp_path) -> None:
    helper = _helper()
    bench = {"gpu_memory_gb": 1.5, "gpu_memory_reserved_gb": 3.0, "context_tokens": 8192, "layers_run": 2}
    checks = {
        "run": {"devices": {"cpu": 3e9, "cuda:0": 1.0e9}, "kv_cache": {"cuda:0": 0.02e9}},
        "full": {"devices": {"cpu": 349e9, "cuda:0": 10.2e9}, "kv_cache": {"cuda:0": 0.58e9}},
    }
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    (tmp_path / "predicted.json").write_text(json.dumps(checks))
    (tmp_path / "smi.csv").write_text("1000\n2000\n1500\n")  # MiB
    (tmp_path / "before.csv").write_text("500\n")
    argv = ["v3-memory", "--bench", str(tmp_path / "bench.json"), "--predicted", str(tmp_path / "predicted.json")]
    argv += ["--smi", str(tmp_path / "smi.csv"), "--smi-before", str(tmp_path / "before.csv"), "--experts", "64"]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py"), *argv], capture_output=True)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    extra = (10.2 + 0.58) - (1.0 + 0.02)
    assert r["full_model_estimate_gb"]["allocated_gb"] == pytest.approx(1.5 + extra)
    assert r["full_model_estimate_gb"]["reserved_gb"] == pytest.approx(3.0 + extra)
    assert r["measured_gb"]["nvidia_smi_peak_gb"] == pytest.approx(2000 * 2**20 / 1e9)
    assert r["full_model_estimate_gb"]["nvidia_smi_gb"] == pytest.approx(2000 * 2**20 / 1e9 + extra)
    assert r["judged_by"] == "nvidia_smi_gb" and r["within_target"] is True and r["routed_experts_run"] == 64
    assert helper.V3_TARGET_GB == 12.0


def test_junit_failures_are_listed(tmp_path) -> None:
    junit = tmp_path / "junit"
    junit.mkdir()
    (junit / "test_x.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_x" name="test_a"/>'
        '<testcase classname="tests.test_x" name="test_b"><failure message="assert 1 == 2">trace</failure></testcase>'
        '<testcase classname="tests.test_x" name="test_c"><skipped message="no GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    (tmp_path / "t.tsv").write_text("tests/test_x.py 1 4.2 30\ntests/test_y.py 124 30.0 30\n")
    r = json.loads(
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "device_check.py"),
                "tests",
                "--table",
                str(tmp_path / "t.tsv"),
                "--junit-dir",
                str(junit),
            ],
            capture_output=True,
            check=True,
        ).stdout
    )
    x, y = r["files"]
    assert (x["status"], x["passed"], x["failed"], x["skipped"]) == ("failed", 1, 1, 1)
    assert x["failures"] == [{"test": "tests.test_x::test_b", "kind": "failure", "message": "assert 1 == 2"}]
    assert y["status"] == "timeout" and "missing" in y["junit"]
    assert (r["tests"], r["failed"]) == (3, 1)


def test_profile_counts_only_the_steps(tmp_path, capsys) -> None:
    folded = tmp_path / "x.folded"
    step = "_timed_step (hetero_moe/bench/decode.py:310)"
    folded.write_text(
        f"<module> (cli.py:1);load (hetero_moe/llm.py:5);read (io.py:2) 50\n"
        f"<module> (cli.py:1);{step};forward (hetero_moe/engine/runner.py:9);down (kernels/numba/int8dot.py:7) 30\n"
        f"<module> (cli.py:1);{step};forward (hetero_moe/engine/runner.py:9);sync (torch/cuda.py:3) 10\n"
    )
    assert _helper().main(["profile", "--folded", str(folded)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["samples"], r["step_samples"]) == (90, 40)
    assert r["leaf"] == [[0.75, "down (kernels/numba/int8dot.py:7)"], [0.25, "sync (torch/cuda.py:3)"]]
    assert r["ours"] == [[0.75, "down (kernels/numba/int8dot.py:7)"], [0.25, "forward (hetero_moe/engine/runner.py:9)"]]
