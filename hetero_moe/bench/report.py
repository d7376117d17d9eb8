"""`hetero-moe bench report DIR`: the Markdown table and the PNG chart of the `bench compare` JSON
files in DIR (written as `compare.md` and `compare.png` there)."""

from __future__ import annotations

import json
from pathlib import Path


def load(directory: Path) -> list[dict]:
    reports = []
    for path in sorted(directory.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "ours" in data and "transformers" in data:
            reports.append(data)
    if not reports:
        raise ValueError(f"{directory}: no `hetero-moe bench compare --json` output (*.json) to report")
    return reports


def _prefill(entries: list[dict], n: int) -> str:
    hit = [p for p in entries if p["tokens"] == n]
    return f"{hit[0]['tok_s']:,.0f} ({hit[0]['ttft_s']:.2f} s)" if hit else "-"


def markdown(reports: list[dict]) -> str:
    lengths = sorted({p["tokens"] for r in reports for p in r["ours"]["prefill"]})
    head = ["shape", "engine", "decode tok/s", "of roofline"]
    head += [f"prefill {n} tok/s (TTFT)" for n in lengths]
    head += ["GPU GB", "CPU GB"]
    rows = [head, ["---"] * len(head)]
    for r in reports:
        ours, theirs = r["ours"], r["transformers"]
        roof = ours["roofline_tok_s"]
        shape = r["arch"] + (f" ({ours['layers_run']} layers, extrapolated)" if ours["extrapolated"] else "")
        engines = [("hetero-moe, " + ours["rules"], ours)]
        if "decode_tok_s" in theirs:
            engines.append(("transformers + accelerate offload", theirs))
        for name, e in engines:
            gpu = f"{e['gpu_memory_gb']:.1f}" if e.get("gpu_memory_gb") is not None else "-"
            row = [shape, name, f"{e['decode_tok_s']:.2f}", f"{e['decode_tok_s'] / roof:.0%}"]
            row += [_prefill(e["prefill"], n) for n in lengths]
            row += [gpu, f"{e['cpu_peak_rss_gb']:.1f}"]
            rows.append(row)
        rows.append(
            [shape, "roofline (DRAM read / routed bytes per token)", f"{roof:.2f}", "100%"] + ["-"] * (len(head) - 4)
        )
        if "decode_tok_s" not in theirs:
            rows.append(
                [shape, "transformers", theirs.get("unavailable") or theirs.get("skipped", "-")]
                + [""] * (len(head) - 3)
            )
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


def chart(reports: list[dict], path: Path) -> None:
    """Grouped bars of decode tok/s per shape: ours, transformers, the roofline (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the chart needs matplotlib: pip install matplotlib") from e
    shapes = [r["arch"] for r in reports]
    series = {
        "hetero-moe": [r["ours"]["decode_tok_s"] for r in reports],
        "transformers + offload": [r["transformers"].get("decode_tok_s", 0.0) for r in reports],
        "DRAM roofline": [r["ours"]["roofline_tok_s"] for r in reports],
    }
    fig, ax = plt.subplots(figsize=(2.5 + 2.2 * len(shapes), 4))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(shapes))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens / s (batch 1)")
    ax.set_title("Decode speed on this box")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(directory: Path) -> tuple[Path, Path]:
    reports = load(directory)
    table, png = directory / "compare.md", directory / "compare.png"
    table.write_text(markdown(reports), encoding="utf-8")
    chart(reports, png)
    return table, png
