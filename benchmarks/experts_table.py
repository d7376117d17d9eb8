"""Markdown table from `hetero-moe bench experts --json` outputs: `python experts_table.py FILE...`."""

from __future__ import annotations

import json
import sys


def main(paths: list[str]) -> None:
    columns = [
        "shape",
        "quant",
        "tokens",
        "ms / layer",
        "weight GB/s",
        "DRAM read GB/s",
        "share of DRAM",
        "torch bf16",
        "torch int4",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        base = {(b["name"], b.get("tokens")): b for b in report.get("baselines", [])}
        for r in report["results"]:
            cells = []
            for name in ("torch_bf16_linear", "torch_int4pack_mm"):
                b = base.get((name, r["tokens"]))
                cells.append(f"{b['weight_gbps']:.1f} GB/s ({b['ratio']:.0%})" if b else "-")
            print(
                f"| {report['arch']} ({report['experts_in_memory']} experts, {report['threads']} threads) "
                f"| {r['quant']} | {r['tokens']} | {r['seconds_per_layer'] * 1e3:.2f} | {r['weight_gbps']:.1f} "
                f"| {r['dram_read_gbps']:.1f} | {r['ratio']:.0%} | {cells[0]} | {cells[1]} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
