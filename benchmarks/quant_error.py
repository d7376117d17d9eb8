"""Accuracy of the quantized CPU paths on tiny synthetic models: per architecture, the mean relative logit
error against the exact run and the teacher-forced top-1 agreement over 40 positions, for

- the routed experts alone in INT4 (group 32, 64, 128), INT8, FP8 or BF16, the rest exact;
- everything quantized (`cpu-only-int4.yaml`, `cpu-only-int8.yaml`);

INT4 and INT8 each twice: with int8 activations (integer dot products, the default on x86 with AVX2) and
with float32 activations (the `float` backend: weight-only quantization). Usage:
`python benchmarks/quant_error.py` (prints JSON lines)."""

from __future__ import annotations

import json
import os
import tempfile
from importlib import resources
from pathlib import Path

from hetero_moe.bench.teacher import TeacherForced
from hetero_moe.llm import LLM
from hetero_moe.synth import tiny as synth

PROMPT = [0, 5, 17, 42, 99, 7, 3, 100, 200, 11, 64]
EXPERTS = [("int4", 32), ("int4", 64), ("int4", 128), ("int8", 32), ("fp8", 64), ("bf16", 64)]
EXACT_EXPERTS = "replace: {op: experts, device: cpu}"


def teacher_forced(exact: LLM, other: LLM, ids: list[int]) -> tuple[float, float]:
    caches = [TeacherForced(m.runner, len(ids)) for m in (exact, other)]
    errors, agree = [], []
    chunks = [ids[: len(PROMPT)]] + [[t] for t in ids[len(PROMPT) : -1]]
    for chunk in chunks:
        a, b = (c.feed(chunk) for c in caches)
        errors.append(float((b - a).norm() / a.norm()))
        agree.append(int(a.argmax() == b.argmax()))
    return sum(errors) / len(errors), sum(agree) / len(agree)


def variants(tmp: Path) -> list[tuple[str, Path, bool]]:
    """(name, rules file, whether it has an int8-activation path to compare with weight-only)."""
    exact = (resources.files("hetero_moe.rules") / "cpu-only.yaml").read_text()
    out = []
    for quant, group in EXPERTS:
        rules = tmp / f"experts-{quant}-{group}.yaml"
        kwargs = f"quant: {quant}" + (f", group_size: {group}" if quant in ("int4", "int8") else "")
        replacement = f"replace: {{op: cpu_experts, device: cpu, kwargs: {{{kwargs}}}}}"
        rules.write_text(exact.replace(EXACT_EXPERTS, replacement))
        out.append((f"experts {quant}" + (f" g{group}" if quant in ("int4", "int8") else ""), rules, "int" in quant))
    for name in ("cpu-only-int4.yaml", "cpu-only-int8.yaml"):
        out.append((f"everything: {name}", Path(str(resources.files("hetero_moe.rules") / name)), True))
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for arch in synth.SUPPORTED:
            path = Path(tmp) / arch
            synth.write_checkpoint(synth.random_model(synth.tiny_config(arch)), path)
            exact = LLM(path, dtype="float32")
            ids = PROMPT + exact.generate(PROMPT, max_tokens=40, temperature=0, ignore_eos=True).token_ids
            for name, rules, integer in variants(Path(tmp)):
                for activations in ("int8", "float32") if integer else ("float32",):
                    os.environ["HETERO_MOE_CPU_ISA"] = "float" if activations == "float32" else ""
                    error, agreement = teacher_forced(exact, LLM(path, rules=str(rules), dtype="float32"), ids)
                    row = {"arch": arch, "variant": name, "activations": activations}
                    print(json.dumps({**row, "mean_rel_logit_error": error, "top1_agreement": agreement}), flush=True)


if __name__ == "__main__":
    main()
