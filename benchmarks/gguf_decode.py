"""Decode and prefill speed of a GGUF file (or a model folder) through the runner, token ids only: the peer's
`v2lite-q4_0.gguf` carries no tokenizer, so `LLM` refuses it; this loads it as `LLM` does and feeds ids
the way `Engine.step` runs them (`TeacherForced`: the same runner, pool and batch, no sampling).

    python benchmarks/gguf_decode.py ~/.cache/hetero-moe-peer/v2lite-q4_0.gguf --threads 2
    llama-bench -m ~/.cache/hetero-moe-peer/v2lite-q4_0.gguf -t 2 -p 64 -n 32 -r 3 -fa 1   # right after

Prints one JSON line per repeat: load seconds, prefill tok/s of a 64-token prompt (`--prompt`), decode tok/s
(median of the steps after 8 warm-up steps) and the peak resident memory (which counts the file's mapped pages).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

from hetero_moe.bench.teacher import TeacherForced
from hetero_moe.engine.runner import ModelRunner
from hetero_moe.llm import place, serving_services
from hetero_moe.loader.checkpoint import Checkpoint
from hetero_moe.loader.gguf_file import GGUFFile, is_gguf
from hetero_moe.loader.gguf_load import load_gguf_weights
from hetero_moe.loader.load import load_weights

STEPS, WARMUP = 40, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a .gguf file (or the first part of a set), or a model folder")
    parser.add_argument("--rules", default="cpu-only-int4.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens the prefill is timed on")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    placed = place(args.model, args.rules, "auto", args.threads, serving_services())
    if is_gguf(args.model):
        load_gguf_weights(placed, GGUFFile.open(args.model))
    else:
        load_weights(placed, Checkpoint.open(args.model))
    load_s = time.perf_counter() - start
    runner = ModelRunner(placed)
    prompt = args.prompt
    ids = [i % 200 + 3 for i in range(prompt + STEPS)]
    for _ in range(args.repeat):
        tf = TeacherForced(runner, prompt + STEPS)
        start = time.perf_counter()
        tf.feed(ids[:prompt])
        prefill = prompt / (time.perf_counter() - start)
        steps = []
        for token in ids[prompt:]:
            start = time.perf_counter()
            tf.feed([token])
            steps.append(time.perf_counter() - start)
        row = {
            "model": str(args.model),
            "rules": args.rules,
            "threads": args.threads,
            "dtype": str(placed.dtype).removeprefix("torch."),
            "load_s": round(load_s, 1),
            f"prefill_{prompt}_tok_s": round(prefill, 2),
            "decode_tok_s": round(1 / statistics.median(steps[WARMUP:]), 2),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
