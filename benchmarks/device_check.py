"""The Python side of `benchmarks/device-check.sh`: what is easier in Python than in bash.

    seed       write a synthetic checkpoint under the name `hetero-moe bench decode` looks for, from a
               changed config (tiny, for the dry run; or fewer routed experts), so the bench reuses it
    env        the box: Python, torch, CUDA, GPU, CPU, memory, disk (JSON on stdout)
    tests      the GPU tests' per-file results from their JUnit XML files (JSON on stdout)
    profile    where a decode step's time goes, from py-spy's samples of `bench decode` (`record -f raw
               --idle`): the frames the steps' samples end in, and our deepest frame in each (JSON on stdout)
    v3-memory  the DeepSeek-V3 GPU memory measured on a few layers, extrapolated to the full model
               with `rules check`'s predictions (JSON on stdout)
    record     one step's record in $OUT (NN-name.json) and the summary (summary.json) rewritten
    table      the summary as a short table (the last lines the device tool hands back)

Only `seed` and `env` import torch; the others stay fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

GB = 1e9
GPU = "cuda:0"
V3_TARGET_GB = 12.0  # issue 4: DeepSeek-V3 on deepseek-v3-int4-gpu.yaml within 12 GB at 8K context
STEPS = ("setup", "tests", "decode", "prefill", "profile", "v3-memory")
STEP_FRAME = "_timed_step ("  # bench decode's timer of one engine step: samples under it are a step's
TOP = 25  # frames listed in the profile
EXPERT_FIELDS = ("n_routed_experts", "num_experts", "num_local_experts")  # DeepSeek, Qwen3-MoE, Mixtral


def seed(args: argparse.Namespace) -> int:
    """Write the checkpoints `bench decode --arch A --layers N --disk D --checkpoint-dir ROOT` would write,
    but from a changed config: `bench_decode.checkpoint` names each and marks it complete, so the bench
    finds it and writes nothing. Prints `arch path` per checkpoint."""
    import hetero_moe.synth.large as large
    from hetero_moe.bench import decode as bench_decode
    from hetero_moe.synth.tiny import tiny_config

    real_writer = large.write_large_checkpoint

    def changed(config, out, **kwargs):
        if args.tiny:
            config = tiny_config(config.architectures[0])
        if args.experts:
            field = next(f for f in EXPERT_FIELDS if hasattr(config, f))
            setattr(config, field, args.experts)
        return real_writer(config, out, **kwargs)

    large.write_large_checkpoint = changed
    try:
        for spec in args.checkpoint:
            arch, layers, disk = spec.split(",")
            rules = bench_decode.ARCHS[arch][0]
            bench = bench_decode.DecodeBench(arch, rules, layers=int(layers), fp8=disk == "fp8")
            start = time.perf_counter()
            path = bench_decode.checkpoint(bench, Path(args.root))
            size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
            seconds = time.perf_counter() - start
            rate = size / GB / max(seconds, 1e-9)
            print(f"seeded {path}: {size / GB:.2f} GB in {seconds:.1f} s ({rate:.2f} GB/s)", file=sys.stderr)
            print(arch, path, flush=True)  # the script reads the checkpoint's path from here
    finally:
        large.write_large_checkpoint = real_writer
    return 0


def predict(args: argparse.Namespace) -> int:
    """`hetero-moe rules check --json` of each model (a checkpoint or a preset), in one process."""
    import contextlib
    import io

    from hetero_moe.cli import main as cli

    report = {}
    for key, model in zip(("run", "full"), args.model, strict=True):
        out = io.StringIO()
        argv = ["rules", "check", "--model", model, "--rules", args.rules, "--dtype", "bfloat16"]
        with contextlib.redirect_stdout(out):
            rc = cli([*argv, "--max-context", str(args.max_context), "--json"])
        if rc:
            return rc
        report[key] = {"model": model, **json.loads(out.getvalue())}
        report[key].pop("modules")  # one row per module: long, and `rules check` prints it any time
    print(json.dumps(report))
    return 0


def env(args: argparse.Namespace) -> int:
    """The box, and a check of the installed copy in `args.site` (on sys.path first): it is the one
    imported, and it holds the rules and shape presets."""
    from importlib import resources

    import hetero_moe.kernels.quant
    import torch

    import hetero_moe
    import hetero_moe.cli
    import hetero_moe.llm
    from hetero_moe.settings import physical_cores

    if args.site and not hetero_moe.__file__.startswith(str(Path(args.site).resolve())):
        raise SystemExit(f"hetero_moe came from {hetero_moe.__file__}, not from {args.site}")
    for package, name in [("rules", "deepseek-v3-int4-gpu.yaml"), ("configs", "deepseek-v3/config.json")]:
        if not resources.files(f"hetero_moe.{package}").joinpath(name).is_file():
            raise SystemExit(f"the installed copy lacks hetero_moe/{package}/{name}")
    report: dict = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "physical_cores": physical_cores(),
        "cpu_model": _cpu_model(),
        "mem_total_gb": _meminfo("MemTotal"),
        "mem_available_gb": _meminfo("MemAvailable"),
        "work_dir": args.work,
        "work_free_gb": shutil.disk_usage(args.work).free / GB,
        "git_commit": _git_commit(),
    }
    for name in ("triton", "transformers", "numba", "safetensors", "pytest_timeout"):
        try:
            module = __import__(name)
            report[name] = getattr(module, "__version__", "present")
        except ImportError:
            report[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        report.update(
            gpu=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_total_gb=total / GB,
            gpu_free_gb=free / GB,
            cuda=torch.version.cuda,
        )
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem", "--format=csv"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        report["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    print(json.dumps(report))
    return 0


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _meminfo(field: str) -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def tests(args: argparse.Namespace) -> int:
    """`args.table`: one line per test file, `file rc seconds limit`, as the script wrote them."""
    files = []
    for line in Path(args.table).read_text().splitlines():
        name, rc, seconds, limit = line.split()
        entry = {"file": name, "rc": int(rc), "seconds": float(seconds), "limit_s": int(limit)}
        entry["status"] = _status(int(rc), ok_codes=(0, 5))  # 5: no tests collected
        junit = Path(args.junit_dir) / (Path(name).stem + ".xml")
        entry.update(_junit(junit) if junit.is_file() else {"junit": "missing (killed before pytest wrote it?)"})
        files.append(entry)
    totals = {k: sum(f.get(k, 0) for f in files) for k in ("tests", "passed", "failed", "errors", "skipped")}
    print(json.dumps({"files": files, **totals}))
    return 0


def _junit(path: Path) -> dict:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"junit": f"unreadable: {e}"}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {"junit": "no testsuite"}
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failures = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            for node in case.findall(kind):
                message = (node.get("message") or node.text or "").strip()
                failures.append(
                    {"test": f"{case.get('classname')}::{case.get('name')}", "kind": kind, "message": message[:600]}
                )
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {
        "tests": counts["tests"],
        "passed": passed,
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "failures": failures[:40],
    }


def v3_memory(args: argparse.Namespace) -> int:
    """Measured GPU memory of the run (K layers, the bench's KV pool) and the full model's estimate:
    measured + (predicted full - predicted run), the predictions being `rules check`'s weights plus one
    sequence's KV cache at the same context. What the prediction misses (activations, workspaces, the
    allocator's slack) is taken to be the same for the full model: it is per step, not per layer."""
    bench = _load(args.bench)
    checks = _load(args.predicted) or {}
    predicted = {"run": _predicted(checks.get("run")), "full": _predicted(checks.get("full"))}
    smi = _smi_peak_gb(args.smi) if args.smi else None
    measured = {
        "allocated_peak_gb": bench.get("gpu_memory_gb") if bench else None,
        "reserved_peak_gb": bench.get("gpu_memory_reserved_gb") if bench else None,
        "nvidia_smi_peak_gb": smi,
        "nvidia_smi_before_gb": _smi_peak_gb(args.smi_before) if args.smi_before else None,
    }
    extra = None
    if predicted["run"] and predicted["full"] and GPU in predicted["run"] and GPU in predicted["full"]:
        extra = predicted["full"][GPU] - predicted["run"][GPU]
    estimate = {
        k.replace("_peak", ""): (v + extra if v is not None and extra is not None else None)
        for k, v in measured.items()
        if k != "nvidia_smi_before_gb"
    }
    # the card's whole use (CUDA context, allocator's cache) where measured: what a 16 GB card must hold
    judged_by = next((k for k in ("nvidia_smi_gb", "reserved_gb", "allocated_gb") if estimate[k] is not None), None)
    report = {
        "context_tokens": bench.get("context_tokens") if bench else None,
        "layers_run": bench.get("layers_run") if bench else None,
        "layers_full": bench.get("layers_full") if bench else None,
        "routed_experts_run": args.experts,
        "predicted_gb": predicted,
        "measured_gb": measured,
        "full_model_estimate_gb": estimate,
        "target_gb": V3_TARGET_GB,
        "within_target": None if judged_by is None else estimate[judged_by] <= V3_TARGET_GB,
        "judged_by": judged_by,
        "method": "full estimate = measured on the run + (rules check full - rules check run), weights and one "
        "sequence's KV cache at the same context; the smi figures include the CUDA context",
        "bench": bench,
    }
    print(json.dumps(report))
    return 0 if bench else 1


def _predicted(check: dict | None) -> dict | None:
    """Per device: weights plus the KV cache of one sequence, in GB, from `rules check --json`."""
    if not check:
        return None
    devices = set(check["devices"]) | set(check.get("kv_cache", {}))
    return {d: (check["devices"].get(d, 0) + check.get("kv_cache", {}).get(d, 0)) / GB for d in sorted(devices)}


def _smi_peak_gb(path: str) -> float | None:
    """The largest `memory.used` (MiB) of an `nvidia-smi --query-gpu=memory.used -lms` log, in GB."""
    values = []
    try:
        for line in Path(path).read_text().splitlines():
            try:
                values.append(float(line.split(",")[0]))
            except ValueError:
                continue
    except OSError:
        return None
    return max(values) * 2**20 / GB if values else None


def profile(args: argparse.Namespace) -> int:
    """py-spy's raw output (one line a distinct stack: `frame;frame;... count`, outermost first) -> the
    share of the decode steps' samples (those under `STEP_FRAME`) each leaf frame and each deepest
    frame of ours (hetero_moe, kernels) takes, highest first; samples outside the steps (loading, the
    other threads) are only counted."""
    leaf: dict[str, int] = {}
    ours: dict[str, int] = {}
    total = steps = 0
    for line in Path(args.folded).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        if not any(STEP_FRAME in f for f in frames):
            continue
        steps += n
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + n
        mine = [f for f in frames if "hetero_moe/" in f or "kernels/" in f]
        if mine:
            ours[mine[-1]] = ours.get(mine[-1], 0) + n

    def top(counts: dict[str, int]) -> list:
        return [[round(c / steps, 4), f] for f, c in sorted(counts.items(), key=lambda kv: -kv[1])[:TOP]]

    print(json.dumps({"samples": total, "step_samples": steps, "leaf": top(leaf), "ours": top(ours)}, indent=1))
    return 0 if steps else 1


def _load(path: str | None) -> dict | None:
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _status(rc: int, ok_codes: tuple[int, ...] = (0,)) -> str:
    if rc in ok_codes:
        return "ok"
    return "timeout" if rc in (124, 137) else "failed"


def record(args: argparse.Namespace) -> int:
    """$OUT/NN-step.json: the step's status, time and result (the JSON its commands wrote), or the tail
    of its log when it failed; then summary.json from every step record in $OUT."""
    out = Path(args.out)
    result = _load(args.result)
    if args.status:
        status = args.status
    elif args.rc == 0 and args.result and result is None:
        status = "failed"  # it exited 0 but left no readable result
    else:
        status = _status(args.rc)
    entry = {
        "step": args.step,
        "status": status,
        "rc": args.rc,
        "seconds": round(args.seconds, 1),
        "limit_s": args.limit,
        "commands": args.command,
        "result": result,
    }
    if status != "ok" and args.log:
        entry["log_tail"] = _log_tail(Path(args.log), args.log_offset)
    if args.note:
        entry["note"] = args.note
    index = STEPS.index(args.step)
    (out / f"{index:02d}-{args.step}.json").write_text(json.dumps(entry, indent=1) + "\n")
    _write_summary(out, args.mode, args.started, args.env)
    print(status)  # the script reads the step's status from here
    return 0


def _log_tail(log: Path, offset: int, lines: int = 60) -> list[str]:
    try:
        with log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def _write_summary(out: Path, mode: str, started: float, env_file: str | None) -> dict:
    steps = {}
    for path in sorted(out.glob("[0-9][0-9]-*.json")):
        entry = _load(str(path))
        if entry:
            steps[entry["step"]] = entry
    summary = {
        "mode": mode,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "ok": bool(steps) and all(s["status"] in ("ok", "not selected") for s in steps.values()),
        "steps": {name: {k: s[k] for k in ("status", "rc", "seconds", "limit_s")} for name, s in steps.items()},
        "figures": _figures(steps),
        "env": _load(env_file),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _figures(steps: dict) -> dict:
    """The headline numbers of each step that got that far."""
    fig: dict = {}
    tests_ = (steps.get("tests") or {}).get("result")
    if tests_:
        fig["tests"] = {k: tests_[k] for k in ("tests", "passed", "failed", "errors", "skipped")}
    decode = (steps.get("decode") or {}).get("result")
    if decode:
        fig["decode"] = {
            "arch": decode["arch"],
            "layers_run": decode["layers_run"],
            "layers_full": decode["layers_full"],
            "tok_s": decode["decode_tok_s"],
            "roofline_tok_s": decode["roofline_tok_s"],
            "share_of_roofline": decode["share_of_roofline"],
            "dram_read_gbps": decode["dram_read_gbps"]["best"],
            "per_moe_layer_ms": decode["per_moe_layer_ms"],
            "step_overhead": decode["step_overhead"],
            "gpu_memory_gb": decode["gpu_memory_gb"],
            "pcie_h2d_gbps": decode["pcie_h2d_gbps"],
        }
    prefill = (steps.get("prefill") or {}).get("result")
    if prefill:
        fig["prefill"] = [{k: p[k] for k in ("tokens", "tok_s", "ttft_s")} for p in prefill["prefill"]]
    prof = (steps.get("profile") or {}).get("result")
    if prof and prof.get("step_samples"):
        fig["profile"] = {"step_samples": prof["step_samples"], "leaf": prof["leaf"][:5], "ours": prof["ours"][:5]}
    v3 = (steps.get("v3-memory") or {}).get("result")
    if v3:
        fig["v3_memory"] = {
            "measured_gb": v3["measured_gb"],
            "full_model_estimate_gb": v3["full_model_estimate_gb"],
            "predicted_full_gb": v3["predicted_gb"]["full"],
            "within_target": v3["within_target"],
            "judged_by": v3["judged_by"],
        }
    return fig


def table(args: argparse.Namespace) -> int:
    summary = _write_summary(Path(args.out), args.mode, args.started, args.env)
    print(f"device check ({summary['mode']}), {summary['elapsed_s']:.0f} s: {'ok' if summary['ok'] else 'FAILED'}")
    for name, s in summary["steps"].items():
        print(f"  {name:<10} {s['status']:<12} {s['seconds']:>6.1f} s of {s['limit_s']} s (rc {s['rc']})")
    fig = summary["figures"]
    if t := fig.get("tests"):
        print(f"  tests: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped")
    if d := fig.get("decode"):
        m = d["per_moe_layer_ms"]
        print(
            f"  decode {d['arch']} ({d['layers_run']} of {d['layers_full']} layers): {d['tok_s']:.2f} tok/s, "
            f"{d['share_of_roofline']:.0%} of {d['roofline_tok_s']:.1f} (DRAM {d['dram_read_gbps']:.0f} GB/s); "
            f"MoE layer {m['total']:.3f} ms = CPU experts {m['cpu_experts']:.3f}, waiting {m['waiting']:.3f}"
        )
    for p in fig.get("prefill", []):
        print(f"  prefill {p['tokens']}: {p['tok_s']:.0f} tok/s, TTFT {p['ttft_s']:.2f} s")
    if pr := fig.get("profile"):
        print(f"  profile: {pr['step_samples']} samples in decode steps; ours, deepest frame:")
        for share, frame in pr["ours"]:
            print(f"    {share:6.1%} {frame}")
    if v := fig.get("v3_memory"):
        est = v["full_model_estimate_gb"]
        print(
            f"  V3 GPU memory, full model at the run's context: {_gb(est['allocated_gb'])} allocated, "
            f"{_gb(est['reserved_gb'])} reserved, {_gb(est['nvidia_smi_gb'])} by nvidia-smi "
            f"(target {V3_TARGET_GB:g} GB: {v['within_target']})"
        )
    return 0 if summary["ok"] else 1


def _gb(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f} GB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="device_check.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(required=True, metavar="WHAT")
    s = sub.add_parser("seed")
    s.add_argument("--root", required=True)
    s.add_argument("--checkpoint", action="append", required=True, help="ARCH,LAYERS,fp8|bf16 (repeatable)")
    s.add_argument("--tiny", action="store_true", help="the architecture's tiny test config")
    s.add_argument("--experts", type=int, help="routed experts per MoE layer")
    s.set_defaults(func=seed)
    s = sub.add_parser("predict")
    s.add_argument("--model", action="append", required=True, help="the run's checkpoint, then the full model")
    s.add_argument("--rules", required=True)
    s.add_argument("--max-context", type=int, required=True)
    s.set_defaults(func=predict)
    s = sub.add_parser("env")
    s.add_argument("--work", required=True)
    s.add_argument("--site", help="the folder the project was installed into")
    s.set_defaults(func=env)
    s = sub.add_parser("tests")
    s.add_argument("--table", required=True)
    s.add_argument("--junit-dir", required=True)
    s.set_defaults(func=tests)
    s = sub.add_parser("profile")
    s.add_argument("--folded", required=True, help="py-spy record -f raw's output")
    s.set_defaults(func=profile)
    s = sub.add_parser("v3-memory")
    s.add_argument("--bench")
    s.add_argument("--predicted")
    s.add_argument("--smi")
    s.add_argument("--smi-before")
    s.add_argument("--experts", type=int)
    s.set_defaults(func=v3_memory)
    for name, func in (("record", record), ("table", table)):
        s = sub.add_parser(name)
        s.add_argument("--out", required=True)
        s.add_argument("--mode", required=True)
        s.add_argument("--started", type=float, required=True)
        s.add_argument("--env")
        s.set_defaults(func=func)
        if name == "record":
            s.add_argument("--step", required=True, choices=STEPS)
            s.add_argument("--rc", type=int, required=True)
            s.add_argument("--seconds", type=float, required=True)
            s.add_argument("--limit", type=int, required=True)
            s.add_argument("--result")
            s.add_argument("--status", help="override: skipped, not selected")
            s.add_argument("--command", action="append", default=[])
            s.add_argument("--log")
            s.add_argument("--log-offset", type=int, default=0)
            s.add_argument("--note")
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
