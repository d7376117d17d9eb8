"""What the commands share: model arguments, loading with a progress bar, sampling flags, sizes."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from hetero_moe.engine.sampler import SamplingParams
from hetero_moe.engine.scheduler import SchedulerConfig

DTYPES = ["auto", "float32", "bfloat16", "float16"]


def presets() -> list[str]:
    root = resources.files("hetero_moe.configs")
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def model_dir(value: str) -> Path:
    """A model directory or GGUF file, or the name of a built-in shape preset (`configs/`)."""
    path = Path(value).expanduser()
    if not path.exists() and value in presets():
        return Path(str(resources.files("hetero_moe.configs") / value))
    return path


def add_model_args(p: argparse.ArgumentParser, batching: bool = False) -> None:
    """--model, --rules, --dtype, --max-context, --cpu-threads; with `batching`, the engine's batch flags."""
    p.add_argument(
        "--model",
        help="model directory or .gguf file (the first part of a split set); default: the built-in demo model, "
        "random weights",
    )
    p.add_argument("--rules", default="cpu-only.yaml", help="rules file or built-in name (default cpu-only.yaml)")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--max-context", type=int, help="tokens of context (default: the model's)")
    p.add_argument("--cpu-threads", type=int, help="threads for the CPU experts (default: the physical cores)")
    if batching:
        p.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most (default 16)")
        p.add_argument(
            "--kv-cache-tokens",
            type=int,
            help="tokens the shared KV cache pool holds (default: the context times --max-batch, "
            "or what the free memory holds)",
        )
        p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per step, between decodes")
        p.add_argument(
            "--no-prefix-cache",
            dest="prefix_cache",
            action="store_false",
            help="do not reuse the KV cache of identical prompt beginnings across requests",
        )
        p.add_argument(
            "--kv-host-cache",
            type=float,
            help="GB of host memory for prefix-cache pages evicted from a GPU pool (default 4 on a GPU)",
        )


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def batching(args: argparse.Namespace) -> SchedulerConfig:
    for flag in ("max_batch", "kv_cache_tokens", "prefill_chunk"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.kv_host_cache is not None and args.kv_host_cache < 0:
        raise ValueError(f"--kv-host-cache takes GB, 0 or more, got {args.kv_host_cache}")
    return SchedulerConfig(
        max_batch=args.max_batch,
        kv_cache_tokens=args.kv_cache_tokens,
        prefill_chunk=args.prefill_chunk,
        prefix_cache=args.prefix_cache,
        host_cache_bytes=None if args.kv_host_cache is None else int(args.kv_host_cache * 1e9),
    )


def load(args: argparse.Namespace, batching_config: SchedulerConfig | None = None):
    """The LLM the arguments name, loaded with a progress bar on stderr."""
    from hetero_moe.llm import LLM

    if args.model is None:
        print("using the built-in demo model (tiny, random weights: its text is gibberish)", file=sys.stderr)
    bars: list[tqdm] = []  # made at the first progress report, so nothing shows for an early error

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="loading weights", unit="B", unit_scale=True, file=sys.stderr))
        bars[0].update(done - bars[0].n)

    try:
        return LLM(
            args.model,
            rules=args.rules,
            dtype=args.dtype,
            max_context=args.max_context,
            progress=progress,
            cpu_threads=args.cpu_threads,
            batching=batching_config,
        )
    finally:
        for bar in bars:
            bar.close()


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:,.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:,.2f} MB"


def int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
