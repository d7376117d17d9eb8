"""`hetero-moe rules check`: each module's op and device, the bytes per device, and whether that fits
this box; no weight is loaded."""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

import torch

from hetero_moe.cli.common import DTYPES, gb, model_dir, presets
from hetero_moe.inject.injector import PlacedModel, collapse_layers
from hetero_moe.settings import RESERVES, available_memory, total_memory


def add_parsers(sub) -> None:
    rules = sub.add_parser("rules", help="placement rules").add_subparsers(required=True, metavar="ACTION")
    check = rules.add_parser("check", help="show each module's op and device and the bytes per device; loads no weight")
    check.add_argument(
        "--model",
        required=True,
        help="model directory (config.json is enough), a .gguf file (the first part of a split set), or a built-in "
        "preset: " + ", ".join(presets()),
    )
    check.add_argument("--rules", required=True, help="rules file, or the name of a built-in one")
    check.add_argument("--dtype", default="auto", choices=DTYPES)
    check.add_argument("--max-context", type=int, help="also count the KV cache of one sequence of this many tokens")
    check.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    check.set_defaults(func=check_rules)


def check_rules(args: argparse.Namespace) -> int:
    from hetero_moe.llm import place

    placed = place(model_dir(args.model), args.rules, args.dtype)
    if args.max_context is not None and args.max_context < 1:
        raise ValueError(f"--max-context must be at least 1, got {args.max_context}")
    cache = placed.kv_cache_bytes(args.max_context) if args.max_context else {}
    weights = placed.bytes_per_device()
    usable = usable_memory(set(weights) | set(cache))
    if args.json:
        report = {**_report(placed), "usable": usable, **({"kv_cache": cache} if args.max_context else {})}
        print(json.dumps(report))
        return 0
    _print_modules(placed)
    print("\nweights per device:")
    for dev, nbytes in weights.items():
        print(f"  {dev:<8} {gb(nbytes)}")
    if cache:
        print(f"\nKV cache for {args.max_context} tokens, and the total with the weights:")
        for dev, nbytes in cache.items():
            print(f"  {dev:<8} {gb(nbytes)}  (total {gb(nbytes + weights.get(dev, 0))})")
    if usable:
        print("\nthis box (free memory less the reserve kept for the runtime):")
        for dev, free in usable.items():
            need = weights.get(dev, 0) + cache.get(dev, 0)
            print(f"  {dev:<8} {gb(free)} usable: {'fits' if need <= free else f'short by {gb(need - free)}'}")
    for w in placed.warnings:
        print(f"warning: {w}")
    return 0


def usable_memory(devices: set[str]) -> dict[str, float]:
    """Per device of `devices` present on this box: the bytes weights and KV cache may take."""
    out = {}
    for dev in sorted(devices):
        if dev.startswith("cuda") and torch.cuda.is_available():
            out[dev] = RESERVES["cuda"].usable(*torch.cuda.mem_get_info(torch.device(dev)))
        elif dev == "cpu" and (available := available_memory()) is not None:
            out[dev] = RESERVES["cpu"].usable(available, total_memory() or available)
    return out


def _print_modules(placed: PlacedModel) -> None:
    rows: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for name, p in placed.placements.items():
        if p.op is None and not any(True for _ in placed.model.get_submodule(name).parameters(recurse=False)):
            continue
        rows[(re.sub(r"\.layers\.\d+", ".layers.N", name), p.op or "-", str(p.device))].append(name)
    lines = [(collapse_layers(names), op, dev) for (_, op, dev), names in rows.items()]
    width = max(len(n) for n, _, _ in lines)
    print(f"{'module':<{width}}  {'op':<10}  device")
    for name, op, dev in lines:
        print(f"{name:<{width}}  {op:<10}  {dev}")


def _report(placed: PlacedModel) -> dict:
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
