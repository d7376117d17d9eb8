"""`hetero-moe bench experts | decode | compare | report | serve`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hetero_moe.cli.common import int_list


def add_parsers(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(required=True, metavar="WHAT")
    ex = bench.add_parser("experts", help="CPU experts at a real layer shape against the measured DRAM bandwidth")
    ex.add_argument("--arch", required=True, choices=["deepseek-v3", "deepseek-v2-lite", "qwen3-30b-a3b"])
    ex.add_argument("--quant", default="int4", choices=["int4", "int8", "fp8", "bf16"])
    ex.add_argument("--tokens", default="1,8,64,512", help="comma-separated token counts per call")
    ex.add_argument("--threads", type=int, help="threads (default: the physical cores)")
    ex.add_argument("--experts", type=int, help="experts held in memory (default: the model's)")
    ex.add_argument("--iters", type=int, default=20, help="calls per token count, at least (and at least 1 s of them)")
    ex.add_argument("--no-baselines", action="store_true", help="skip the torch baselines")
    ex.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ex.set_defaults(func=run_experts)
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
        g.add_argument(
            "--prompt-tokens",
            type=int,
            default=16,
            help="the decode steps follow a prompt of this many tokens (llama-bench's --n-depth, plus 16)",
        )
        g.add_argument("--prefill", default="", help="prompt lengths to time prefill for, e.g. 512,2048,8192")
        g.add_argument(
            "--max-context", type=int, help="size the KV pool for this many tokens (GPU memory at that context)"
        )
        g.add_argument("--threads", type=int, help="CPU threads (default: the physical cores)")
        g.add_argument(
            "--dtype",
            choices=["float32", "bfloat16"],
            help="compute dtype (default: float32 on the CPU only, bf16 with a GPU)",
        )
        g.add_argument(
            "--routing-skew", type=float, default=0.0, help="synthetic routers prefer some experts (e.g. 1.0)"
        )
        g.add_argument("--checkpoint-dir", help="where synthetic checkpoints are kept (default: the cache directory)")
        g.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    dec.set_defaults(func=run_decode)
    cmp_.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    cmp_.set_defaults(func=run_decode)
    rep = bench.add_parser("report", help="Markdown table and PNG chart of the `bench compare --json` files in DIR")
    rep.add_argument("dir", help="directory of compare JSON files; compare.md and compare.png are written there")
    rep.set_defaults(func=run_report)
    srv = bench.add_parser("serve", help="concurrent streaming clients against a running server on this box")
    srv.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    srv.add_argument("--concurrency", default="1,4,16,32", help="comma-separated client counts")
    srv.add_argument("--prompt-tokens", type=int, default=128)
    srv.add_argument("--max-tokens", type=int, default=64)
    srv.add_argument("--api-key", help="the server's --api-key")
    srv.add_argument(
        "--multi-turn",
        type=int,
        help="instead: simulated chats of this many turns, time to first token with the prefix cache and without",
    )
    srv.add_argument("--history", type=int, default=2000, help="--multi-turn: words of history before turn 1")
    srv.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    srv.set_defaults(func=run_serve)


def run_experts(args: argparse.Namespace) -> int:
    from hetero_moe.bench.experts import bench_experts as run
    from hetero_moe.settings import physical_cores

    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        raise ValueError(f"--tokens takes comma-separated integers, got {args.tokens!r}") from None
    if any(t < 1 for t in tokens) or (args.threads is not None and args.threads < 1):
        raise ValueError("token counts and --threads must be positive")
    report = run(
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
    peak, amx_peak = report["int8_peak_gmacs"], report["amx_peak_gmacs"]
    if peak:
        print(f"int8 peak of the {report['isa']} dot products: {peak:.0f} G multiply-adds/s on these threads (the best")
        print("of 5 at the start; each row's share is of the median of the peaks probed among its calls)")
    if amx_peak:
        print(f"int8 peak of the AMX tile products: {amx_peak:.0f} G multiply-adds/s on these threads")
    print(
        f"{'kernel':<20} {'tokens':>6} {'ms/layer':>9} {'GB/s':>7} {'of DRAM':>8} {'per expert':>10} "
        f"{'G MAC/s':>8} {'of peak':>8}{' of AMX' if amx_peak else ''}   (the DRAM read and the peak probed among each "
        "row's calls)"
    )
    for r in report["results"]:
        share = f"{r['of_int8_peak']:>8.0%}" if r["of_int8_peak"] is not None else f"{'-':>8}"
        near = f", {r['int8_peak_gmacs']:.0f} G MAC/s" if r["int8_peak_gmacs"] is not None else ""
        near += f"; read {r['dram_read_around_gbps']:.1f} GB/s before and after"
        if r["of_amx_peak"] is not None:
            share += f"{r['of_amx_peak']:>7.0%}"
            near += f", AMX {r['amx_peak_gmacs']:.0f}"
        print(
            f"{'hetero-moe ' + r['quant']:<20} {r['tokens']:>6} {r['seconds_per_layer'] * 1e3:>9.3f} "
            f"{r['weight_gbps']:>7.1f} {r['ratio']:>8.0%} {r['tokens_per_expert']:>10.1f} {r['gmacs']:>8.0f} {share}"
            f"   ({r['dram_read_gbps']:.1f} GB/s{near})"
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


def run_decode(args: argparse.Namespace) -> int:
    from hetero_moe.bench import decode as bench_decode
    from hetero_moe.settings import physical_cores

    rules, fp8, layers = bench_decode.ARCHS[args.arch]
    bench = bench_decode.DecodeBench(
        arch=args.arch,
        rules=args.rules or rules,
        layers=args.layers if args.layers is not None else layers,
        fp8=fp8 if args.disk is None else args.disk == "fp8",
        steps=args.steps,
        prompt_tokens=args.prompt_tokens,
        threads=args.threads or physical_cores(),
        prefill=int_list(args.prefill, "--prefill") if args.prefill else (),
        routing_skew=args.routing_skew,
        max_context=args.max_context,
    )
    root = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    path = bench_decode.checkpoint(bench, root)
    if not hasattr(args, "no_transformers"):  # bench decode
        report = bench_decode.run(bench, path)
        print(json.dumps(report) if args.json else bench_decode.format_report(report))
        return 0
    from hetero_moe.bench import compare as bench_compare

    report = bench_compare.run(bench, path, not args.no_transformers)
    print(json.dumps(report) if args.json else bench_compare.format_report(report))
    return 0


def run_report(args: argparse.Namespace) -> int:
    from hetero_moe.bench.report import write

    for path in write(Path(args.dir)):
        print(f"wrote {path}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from hetero_moe.bench import serve as bench_serve

    if args.multi_turn is not None:
        if args.multi_turn < 1 or args.history < 1 or args.max_tokens < 1:
            raise ValueError("--multi-turn, --history and --max-tokens must be positive")
        report = bench_serve.multi_turn(args.url, args.multi_turn, args.history, args.max_tokens, args.api_key)
        print(json.dumps(report) if args.json else bench_serve.format_multi_turn(report))
        return 0
    levels = list(int_list(args.concurrency, "--concurrency"))
    if any(c < 1 for c in levels) or args.prompt_tokens < 1 or args.max_tokens < 2:
        raise ValueError("client counts and --prompt-tokens must be positive, --max-tokens at least 2")
    report = bench_serve.run(args.url, levels, args.prompt_tokens, args.max_tokens, args.api_key)
    print(json.dumps(report) if args.json else bench_serve.format_report(report))
    return 0
