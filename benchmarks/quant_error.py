"""Accuracy of the quantized CPU experts on tiny synthetic models: per architecture and INT4 group
size (and FP8, BF16), the mean relative logit error against the exact run and the teacher-forced
top-1 agreement over 40 positions. Usage: `python benchmarks/quant_error.py` (prints JSON lines)."""

from __future__ import annotations

import json
import tempfile
from importlib import resources
from pathlib import Path

import torch

from hetero_moe.bench.teacher import TeacherForced
from hetero_moe.llm import LLM
from hetero_moe.synth import tiny as synth

PROMPT = [0, 5, 17, 42, 99, 7, 3, 100, 200, 11, 64]
SETTINGS = [
    ("int4", "group_size: 32"),
    ("int4", "group_size: 64"),
    ("int4", "group_size: 128"),
    ("fp8", "group_size: 64"),
    ("bf16", "group_size: 64"),
]


def teacher_forced(exact: LLM, other: LLM, ids: list[int]) -> tuple[float, float]:
    caches = [TeacherForced(m.runner, len(ids)) for m in (exact, other)]
    errors, agree = [], []
    chunks = [ids[: len(PROMPT)]] + [[t] for t in ids[len(PROMPT) : -1]]
    for chunk in chunks:
        a, b = (c.feed(chunk) for c in caches)
        errors.append(float((b - a).norm() / a.norm()))
        agree.append(int(a.argmax() == b.argmax()))
    return sum(errors) / len(errors), sum(agree) / len(agree)


def main() -> None:
    base = (resources.files("hetero_moe.rules") / "cpu-only-int4.yaml").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in synth.SUPPORTED:
            path = Path(tmp) / arch
            synth.write_checkpoint(synth.random_model(synth.tiny_config(arch)), path)
            exact = LLM(path, dtype="float32")
            ids = PROMPT + exact.generate(PROMPT, max_tokens=40, temperature=0, ignore_eos=True).token_ids
            for quant, group in SETTINGS:
                rules = Path(tmp) / f"{quant}-{group[-3:].strip()}.yaml"
                rules.write_text(base.replace("quant: int4, group_size: 64", f"quant: {quant}, {group}"))
                error, agreement = teacher_forced(exact, LLM(path, rules=str(rules), dtype="float32"), ids)
                print(
                    json.dumps(
                        {
                            "arch": arch,
                            "quant": quant,
                            "setting": group,
                            "mean_rel_logit_error": error,
                            "top1_agreement": agreement,
                        }
                    )
                )


if __name__ == "__main__":
    main()
