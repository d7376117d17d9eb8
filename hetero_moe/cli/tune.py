"""`hetero-moe plan` (rules for this box) and `hetero-moe profile` (routing counts on a prompt set)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hetero_moe.cli.common import DTYPES, model_dir


def add_parsers(sub) -> None:
    pl = sub.add_parser("plan", help="write rules for this box: placement, quantization, pinned experts")
    pl.add_argument(
        "--model",
        required=True,
        help="model directory (config.json is enough), a .gguf file (first part of a split set), or a preset",
    )
    pl.add_argument("--gpu-memory", type=float, help="GB of GPU memory to use (default: free on cuda:0; 0: none)")
    pl.add_argument("--cpu-memory", type=float, help="GB of DRAM to use (default: available now)")
    pl.add_argument("--gpu-fp8", action=argparse.BooleanOptionalAction, help="FP8 tensor cores (default: probed)")
    pl.add_argument("--max-context", type=int, help="tokens of KV cache to plan for (default 8192, or the model's)")
    pl.add_argument("--profile", help="routing counts from `hetero-moe profile`: pin the busiest experts on the GPU")
    pl.add_argument("--experts-quant", default="int4", choices=["int4", "fp8", "bf16"])
    pl.add_argument("--dtype", default="auto", choices=DTYPES)
    pl.add_argument("--out", help="write the rules file here (default: print it)")
    pl.set_defaults(func=plan)

    pr = sub.add_parser("profile", help="count how often each routed expert is chosen on a set of prompts")
    pr.add_argument("--model", required=True, help="model directory or .gguf file")
    pr.add_argument("--rules", default="cpu-only.yaml", help="rules file or built-in name (default cpu-only.yaml)")
    pr.add_argument("--prompts", required=True, help='one prompt per line: text, or JSON {"prompt"} / {"messages"}')
    pr.add_argument("--max-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    pr.add_argument("--dtype", default="auto", choices=DTYPES)
    pr.add_argument("--cpu-threads", type=int, help="threads for the CPU experts (default: the physical cores)")
    pr.add_argument("--out", required=True, help="the profile (JSON) to write")
    pr.set_defaults(func=profile)


def plan(args: argparse.Namespace) -> int:
    from hetero_moe.tune.plan import Box, render
    from hetero_moe.tune.plan import plan as make_plan
    from hetero_moe.tune.profile import load_profile

    if any(v is not None and v < 0 for v in (args.gpu_memory, args.cpu_memory)):
        raise ValueError("--gpu-memory and --cpu-memory take GB, 0 or more")
    box = Box.measure(args.gpu_memory, args.cpu_memory, args.gpu_fp8)
    routing = load_profile(Path(args.profile)) if args.profile else None
    result = make_plan(model_dir(args.model), box, args.max_context, routing, args.experts_quant, args.dtype)
    text = render(result, box)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(text.split("\n- ")[0].rstrip())  # the header: what was planned and the predicted memory
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def profile(args: argparse.Namespace) -> int:
    from hetero_moe.llm import LLM
    from hetero_moe.tune.profile import profile as run_profile
    from hetero_moe.tune.profile import read_prompts

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    prompts = read_prompts(Path(args.prompts))
    with LLM(args.model, rules=args.rules, dtype=args.dtype, cpu_threads=args.cpu_threads) as llm:
        report = run_profile(llm, prompts, args.max_tokens)
    Path(args.out).write_text(json.dumps(report), encoding="utf-8")
    print(f"profiled {report['tokens']} tokens over {len(report['layers'])} MoE layers: wrote {args.out}")
    return 0
