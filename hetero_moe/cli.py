"""The `hetero-moe` command: `rules check`, `generate`, `chat`."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections import defaultdict
from importlib import resources
from pathlib import Path

from hetero_moe.arch import ModelError
from hetero_moe.engine.engine import ContextLengthError
from hetero_moe.engine.sampler import SamplingParams
from hetero_moe.inject.injector import InjectError, PlacedModel, collapse_layers
from hetero_moe.inject.rules import RulesError
from hetero_moe.loader.checkpoint import CheckpointError

# Mistakes in what the user gave us: reported in one line, exit code 2.
USER_ERRORS = (
    RulesError,
    InjectError,
    ModelError,
    CheckpointError,
    ContextLengthError,
    ValueError,
    OSError,
    ImportError,
)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetero-moe", description="MoE inference: routed experts on the CPU.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and details to stderr")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    rules = sub.add_parser("rules", help="placement rules").add_subparsers(required=True, metavar="ACTION")
    check = rules.add_parser("check", help="show each module's op and device and the bytes per device; loads no weight")
    check.add_argument(
        "--model",
        required=True,
        help="model directory (config.json is enough), or a built-in preset: " + ", ".join(_presets()),
    )
    check.add_argument("--rules", required=True, help="rules file, or the name of a built-in one")
    check.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    check.add_argument("--max-context", type=int, help="also count the KV cache of one sequence of this many tokens")
    check.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    check.set_defaults(func=_rules_check)

    pl = sub.add_parser("plan", help="write rules for this box: placement, quantization, pinned experts")
    pl.add_argument("--model", required=True, help="model directory (config.json is enough), or a built-in preset")
    pl.add_argument("--gpu-memory", type=float, help="GB of GPU memory to use (default: free on cuda:0; 0: none)")
    pl.add_argument("--cpu-memory", type=float, help="GB of DRAM to use (default: available now)")
    pl.add_argument("--gpu-fp8", action=argparse.BooleanOptionalAction, help="FP8 tensor cores (default: probed)")
    pl.add_argument("--max-context", type=int, help="tokens of KV cache to plan for (default 8192, or the model's)")
    pl.add_argument("--profile", help="routing counts from `hetero-moe profile`: pin the busiest experts on the GPU")
    pl.add_argument("--experts-quant", default="int4", choices=["int4", "fp8", "bf16"])
    pl.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    pl.add_argument("--out", help="write the rules file here (default: print it)")
    pl.set_defaults(func=_plan)

    pr = sub.add_parser("profile", help="count how often each routed expert is chosen on a set of prompts")
    pr.add_argument("--model", required=True, help="model directory")
    pr.add_argument("--rules", default="cpu-only.yaml", help="rules file or built-in name (default cpu-only.yaml)")
    pr.add_argument("--prompts", required=True, help='one prompt per line: text, or JSON {"prompt"} / {"messages"}')
    pr.add_argument("--max-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    pr.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    pr.add_argument("--cpu-threads", type=int, help="threads for the CPU experts (default: the physical cores)")
    pr.add_argument("--out", required=True, help="the profile (JSON) to write")
    pr.set_defaults(func=_profile)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(required=True, metavar="WHAT")
    ex = bench.add_parser("experts", help="CPU experts at a real layer shape against the measured DRAM bandwidth")
    ex.add_argument("--arch", required=True, choices=["deepseek-v3", "deepseek-v2-lite", "qwen3-30b-a3b"])
    ex.add_argument("--quant", default="int4", choices=["int4", "fp8", "bf16"])
    ex.add_argument("--tokens", default="1,8,64,512", help="comma-separated token counts per call")
    ex.add_argument("--threads", type=int, help="threads (default: the physical cores)")
    ex.add_argument("--experts", type=int, help="experts held in memory (default: the model's)")
    ex.add_argument("--iters", type=int, default=20)
    ex.add_argument("--no-baselines", action="store_true", help="skip the torch baselines")
    ex.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ex.set_defaults(func=_bench_experts)
    dec = bench.add_parser(
        "decode", help="decode tok/s of a synthetic checkpoint at a real shape against the DRAM roofline"
    )
    cmp_ = bench.add_parser(
        "compare", help="bench decode, and plain transformers (accelerate offload) on the same checkpoint"
    )
    for g in (dec, cmp_):
        g.add_argument("--arch", required=True, choices=["deepseek-v2-lite", "qwen3-30b-a3b", "deepseek-v3"])
        g.add_argument("--rules", help="rules file (default: the shipped GPU rules of the architecture)")
        g.add_argument("--layers", type=int, help="real-size layers to run (default: whole model; DeepSeek-V3: 4)")
        g.add_argument("--disk", choices=["fp8", "bf16"], help="checkpoint format (default: the release's)")
        g.add_argument("--steps", type=int, default=32, help="decode steps timed")
        g.add_argument("--prefill", default="", help="prompt lengths to time prefill for, e.g. 512,2048,8192")
        g.add_argument("--threads", type=int, help="CPU threads (default: the physical cores)")
        g.add_argument(
            "--routing-skew", type=float, default=0.0, help="synthetic routers prefer some experts (e.g. 1.0)"
        )
        g.add_argument("--checkpoint-dir", help="where synthetic checkpoints are kept (default: the cache directory)")
        g.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    dec.set_defaults(func=_bench_decode)
    cmp_.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    cmp_.set_defaults(func=_bench_decode)
    rep = bench.add_parser("report", help="Markdown table and PNG chart of the `bench compare --json` files in DIR")
    rep.add_argument("dir", help="directory of compare JSON files; compare.md and compare.png are written there")
    rep.set_defaults(func=_bench_report)
    srv = bench.add_parser("serve", help="concurrent streaming clients against a running server on this box")
    srv.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    srv.add_argument("--concurrency", default="1,4,16,32", help="comma-separated client counts")
    srv.add_argument("--prompt-tokens", type=int, default=128)
    srv.add_argument("--max-tokens", type=int, default=64)
    srv.add_argument("--api-key", help="the server's --api-key")
    srv.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    srv.set_defaults(func=_bench_serve)

    for name, helptext in (
        ("generate", "complete a raw prompt"),
        ("chat", "chat in the terminal"),
        ("serve", "serve the OpenAI API over HTTP"),
    ):
        g = sub.add_parser(name, help=helptext)
        g.add_argument("--model", help="model directory (default: the built-in demo model, random weights)")
        g.add_argument("--rules", default="cpu-only.yaml", help="rules file or built-in name (default cpu-only.yaml)")
        g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
        g.add_argument("--max-context", type=int, help="tokens of context (default: the model's)")
        g.add_argument("--cpu-threads", type=int, help="threads for the CPU experts (default: the physical cores)")
        if name == "serve":
            g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this box only)")
            g.add_argument("--port", type=int, default=8000)
            g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 route")
            g.add_argument("--served-model-name", help="the model id clients send (default: the directory's name)")
            g.add_argument("--max-queue", type=int, default=64, help="requests that may wait (default 64)")
            g.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most (default 16)")
            g.add_argument(
                "--kv-cache-tokens",
                type=int,
                help="tokens the shared KV cache pool holds (default: the context times --max-batch, "
                "or what the free memory holds)",
            )
            g.add_argument(
                "--prefill-chunk", type=int, default=512, help="prompt tokens per step, interleaved with decodes"
            )
            g.add_argument(
                "--allow-origin",
                action="append",
                default=[],
                help="let browser apps from this origin call the API (CORS; repeatable, '*' for any)",
            )
            g.add_argument(
                "--reasoning-parser", choices=["deepseek-r1"], help="send <think>...</think> as reasoning_content"
            )
            g.set_defaults(func=_serve)
            continue
        g.add_argument("--max-tokens", type=int, default=256 if name == "generate" else 512)
        g.add_argument("--temperature", type=float, default=1.0 if name == "generate" else 0.7)
        g.add_argument("--top-p", type=float, default=1.0)
        g.add_argument("--top-k", type=int, default=0)
        g.add_argument("--seed", type=int)
        g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
        if name == "generate":
            g.add_argument("--prompt", required=True, help="the text to complete (no chat template)")
            g.add_argument(
                "--json", action="store_true", help='print {"prompt_token_ids", "token_ids", "text"} as the only stdout'
            )
            g.set_defaults(func=_generate)
        else:
            g.add_argument("--system", help="system prompt")
            g.set_defaults(func=_chat)
    return p


def _presets() -> list[str]:
    root = resources.files("hetero_moe.configs")
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def _model_dir(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists() and value in _presets():
        return Path(str(resources.files("hetero_moe.configs") / value))
    return path


def _rules_check(args: argparse.Namespace) -> int:
    from hetero_moe.llm import place

    placed = place(_model_dir(args.model), args.rules, args.dtype)
    if args.max_context is not None and args.max_context < 1:
        raise ValueError(f"--max-context must be at least 1, got {args.max_context}")
    cache = placed.kv_cache_bytes(args.max_context) if args.max_context else {}
    if args.json:
        print(json.dumps({**_check_report(placed), **({"kv_cache": cache} if args.max_context else {})}))
        return 0
    rows: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for name, p in placed.placements.items():
        if p.op is None and not _owns_tensors(placed, name):
            continue
        rows[(re.sub(r"\.layers\.\d+", ".layers.N", name), p.op or "-", str(p.device))].append(name)
    lines = [(collapse_layers(names), op, dev) for (_, op, dev), names in rows.items()]
    width = max(len(n) for n, _, _ in lines)
    print(f"{'module':<{width}}  {'op':<10}  device")
    for name, op, dev in lines:
        print(f"{name:<{width}}  {op:<10}  {dev}")
    print("\nweights per device:")
    for dev, nbytes in placed.bytes_per_device().items():
        print(f"  {dev:<8} {_gb(nbytes)}")
    if cache:
        weights = placed.bytes_per_device()
        print(f"\nKV cache for {args.max_context} tokens, and the total with the weights:")
        for dev, nbytes in cache.items():
            print(f"  {dev:<8} {_gb(nbytes)}  (total {_gb(nbytes + weights.get(dev, 0))})")
    for w in placed.warnings:
        print(f"warning: {w}")
    return 0


def _check_report(placed: PlacedModel) -> dict:
    return {
        "model": placed.arch.name,
        "dtype": str(placed.dtype).removeprefix("torch."),
        "devices": placed.bytes_per_device(),
        "modules": [
            {"name": p.name, "class": p.hf_class, "op": p.op, "device": str(p.device)}
            for p in placed.placements.values()
        ],
        "warnings": placed.warnings,
    }


def _owns_tensors(placed: PlacedModel, name: str) -> bool:
    module = placed.model.get_submodule(name)
    return any(True for _ in module.parameters(recurse=False))


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:,.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:,.2f} MB"


def _load(args: argparse.Namespace):
    from hetero_moe.llm import LLM

    if args.model is None:
        print("using the built-in demo model (tiny, random weights: its text is gibberish)", file=sys.stderr)
    bar = _ProgressBar()
    llm = LLM(
        args.model,
        rules=args.rules,
        dtype=args.dtype,
        max_context=args.max_context,
        progress=bar,
        cpu_threads=args.cpu_threads,
    )
    bar.close()
    return llm


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def _generate(args: argparse.Namespace) -> int:
    params = _sampling(args)
    llm = _load(args)
    if args.json:
        c = llm.generate(args.prompt, params)
        print(
            json.dumps(
                {
                    "prompt_token_ids": c.prompt_token_ids,
                    "token_ids": c.token_ids,
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                }
            )
        )
        return 0
    for step in llm.stream(args.prompt, params):
        print(step.text, end="", flush=True)
    print()
    return 0


def _chat(args: argparse.Namespace) -> int:
    params = _sampling(args)
    llm = _load(args)
    base = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    print("chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = list(base)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        parts = []
        try:
            for step in llm.engine.stream(llm.chat_ids(messages), params):
                parts.append(step.text)
                print(step.text, end="", flush=True)
        except ContextLengthError as e:
            print(f"\nerror: {e}; /reset to start over", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": "".join(parts)})


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from hetero_moe.engine.scheduler import SchedulerConfig, default_pool_tokens
    from hetero_moe.server.app import ServerConfig, create_app

    name = args.served_model_name or (Path(args.model).resolve().name if args.model else "hetero-moe-demo")
    for flag in ("max_batch", "kv_cache_tokens", "prefill_chunk"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    llm = _load(args)
    context = llm.engine.max_context
    config = ServerConfig(
        served_model_name=name,
        api_key=args.api_key,
        max_queue=args.max_queue,
        reasoning_parser=args.reasoning_parser,
        allow_origins=tuple(args.allow_origin),
        batching=SchedulerConfig(
            max_batch=args.max_batch,
            kv_cache_tokens=args.kv_cache_tokens or default_pool_tokens(llm.runner, args.max_batch * context),
            prefill_chunk=args.prefill_chunk,
        ),
    )
    app = create_app(llm, config)
    print(f"serving {name!r} at http://{args.host}:{args.port}/v1 (OpenAI API; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


def _bench_experts(args: argparse.Namespace) -> int:
    from hetero_moe.bench import bench_experts
    from hetero_moe.settings import physical_cores

    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        raise ValueError(f"--tokens takes comma-separated integers, got {args.tokens!r}") from None
    if any(t < 1 for t in tokens) or (args.threads is not None and args.threads < 1):
        raise ValueError("token counts and --threads must be positive")
    report = bench_experts(
        args.arch, args.quant, tokens, args.threads or physical_cores(), args.experts, args.iters, not args.no_baselines
    )
    if args.json:
        print(json.dumps(report))
        return 0
    dram = report["dram_read_gbps"]
    print(
        f"{args.arch} {args.quant}, {report['threads']} threads, {report['experts_in_memory']} experts in memory; "
        f"DRAM read {dram['best']:.1f} GB/s (numba {dram['numba']:.1f}, torch {dram['torch']:.1f})"
    )
    print(f"{'kernel':<20} {'tokens':>6} {'ms/layer':>9} {'GB/s':>7} {'of DRAM':>8}")
    for r in report["results"]:
        print(
            f"{'hetero-moe ' + r['quant']:<20} {r['tokens']:>6} {r['seconds_per_layer'] * 1e3:>9.3f} "
            f"{r['weight_gbps']:>7.1f} {r['ratio']:>8.0%}"
        )
    for b in report.get("baselines", []):
        if "unavailable" in b:
            print(f"{b['name']:<20} unavailable: {b['unavailable']}")
            continue
        print(
            f"{b['name']:<20} {b['tokens']:>6} {b['seconds_per_layer'] * 1e3:>9.3f} {b['weight_gbps']:>7.1f} "
            f"{b['ratio']:>8.0%}"
        )
    return 0


def _bench_decode(args: argparse.Namespace) -> int:
    from hetero_moe import bench_decode
    from hetero_moe.settings import physical_cores

    rules, fp8, layers = bench_decode.ARCHS[args.arch]
    bench = bench_decode.DecodeBench(
        arch=args.arch,
        rules=args.rules or rules,
        layers=args.layers if args.layers is not None else layers,
        fp8=fp8 if args.disk is None else args.disk == "fp8",
        steps=args.steps,
        threads=args.threads or physical_cores(),
        prefill=_int_list(args.prefill, "--prefill") if args.prefill else (),
        routing_skew=args.routing_skew,
    )
    root = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    path = bench_decode.checkpoint(bench, root)
    if not hasattr(args, "no_transformers"):  # bench decode
        report = bench_decode.run(bench, path)
        print(json.dumps(report) if args.json else bench_decode.format_report(report))
        return 0
    from hetero_moe import bench_compare

    report = bench_compare.run(bench, path, not args.no_transformers)
    print(json.dumps(report) if args.json else bench_compare.format_report(report))
    return 0


def _bench_report(args: argparse.Namespace) -> int:
    from hetero_moe.bench_report import write

    for path in write(Path(args.dir)):
        print(f"wrote {path}")
    return 0


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None


def _bench_serve(args: argparse.Namespace) -> int:
    from hetero_moe import bench_serve

    levels = list(_int_list(args.concurrency, "--concurrency"))
    if any(c < 1 for c in levels) or args.prompt_tokens < 1 or args.max_tokens < 2:
        raise ValueError("client counts and --prompt-tokens must be positive, --max-tokens at least 2")
    report = bench_serve.run(args.url, levels, args.prompt_tokens, args.max_tokens, args.api_key)
    print(json.dumps(report) if args.json else bench_serve.format_report(report))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from hetero_moe.plan import Box, plan, render
    from hetero_moe.profile import load_profile

    if any(v is not None and v < 0 for v in (args.gpu_memory, args.cpu_memory)):
        raise ValueError("--gpu-memory and --cpu-memory take GB, 0 or more")
    box = Box.measure(args.gpu_memory, args.cpu_memory, args.gpu_fp8)
    profile = load_profile(Path(args.profile)) if args.profile else None
    result = plan(_model_dir(args.model), box, args.max_context, profile, args.experts_quant, args.dtype)
    text = render(result, box)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(text.split("\n- ")[0].rstrip())  # the header: what was planned and the predicted memory
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from hetero_moe.llm import LLM
    from hetero_moe.profile import profile, read_prompts

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    prompts = read_prompts(Path(args.prompts))
    llm = LLM(args.model, rules=args.rules, dtype=args.dtype, cpu_threads=args.cpu_threads)
    report = profile(llm, prompts, args.max_tokens)
    Path(args.out).write_text(json.dumps(report), encoding="utf-8")
    print(f"profiled {report['tokens']} tokens over {len(report['layers'])} MoE layers: wrote {args.out}")
    return 0


class _ProgressBar:
    """Weight loading progress on stderr: bytes done of total, redrawn at most 10 times a second."""

    def __init__(self) -> None:
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\rloading weights [{'#' * filled}{'.' * (width - filled)}] {_gb(done)} / {_gb(total)}")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


if __name__ == "__main__":
    sys.exit(main())
