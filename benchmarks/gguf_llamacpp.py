"""Our logits against llama.cpp's on the same GGUF file, teacher-forced over the same token ids.

Writes a tiny GGUF of one architecture (`hetero_moe/synth/gguf.py`: random weights, llama.cpp's layout)
with the dense matrices and the routed experts in the types given, evaluates the ids with llama.cpp through
llama-cpp-python (all logits, CPU) and with hetero-moe (float32, `TeacherForced`, one token per step), and
prints one JSON line: per-position correlation (min, mean) and top-1 agreement.

    LLAMA_CPP_LIB_PATH=DIR python benchmarks/gguf_llamacpp.py --arch DeepseekV3ForCausalLM --experts Q4_0

llama-cpp-python with llama.cpp's libraries built beside it: `CMAKE_ARGS=-DLLAMA_BUILD=OFF pip install
--no-deps llama_cpp_python-0.3.36.tar.gz diskcache` and LLAMA_CPP_LIB_PATH pointing at the `build/bin` of
`../shared/peer/llamacpp.sh build`. With `--self`, llama.cpp is instead compared with itself on an F32
file of the same (dequantized) values: what its own quantized arithmetic changes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

from hetero_moe.bench.teacher import TeacherForced
from hetero_moe.llm import LLM
from hetero_moe.synth import tiny as synth
from hetero_moe.synth.gguf import GGUF_SIZES, cpu_rules, from_gguf_layout, write_gguf


def llama_logits(path: Path, ids: list[int], threads: int) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path), n_ctx=2 * len(ids), n_batch=2 * len(ids), n_threads=threads, logits_all=True, verbose=False
    )
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def our_logits(path: Path, ids: list[int], rules: Path, threads: int) -> np.ndarray:
    with LLM(path, rules=rules, dtype="float32", cpu_threads=threads) as llm:
        tf = TeacherForced(llm.runner, 2 * len(ids))
        return np.stack([tf.feed([t]).double().numpy() for t in ids])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="DeepseekV3ForCausalLM", choices=list(GGUF_SIZES))
    p.add_argument("--experts", default="Q4_0", choices=["Q4_0", "Q8_0", "F32"])
    p.add_argument("--dense", default="F32", help="comma-separated types, taken in turn (default F32)")
    p.add_argument("--layers", type=int, help="decoder layers (llama.cpp reads a deepseek2 of 26/27 as V2-Lite)")
    p.add_argument("--positions", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--self", action="store_true", help="llama.cpp on this file against llama.cpp on F32 values")
    args = p.parse_args()
    extra = {"num_hidden_layers": args.layers} if args.layers else {}
    if args.arch == "Qwen3MoeForCausalLM":
        extra["mlp_only_layers"] = []  # llama.cpp's qwen3moe has no dense layers
    model = synth.random_model(synth.tiny_config(args.arch, **GGUF_SIZES[args.arch], **extra), seed=3)
    dense, experts = [QT[t] for t in args.dense.split(",")], QT[args.experts]
    ids = [int(x) for x in np.random.default_rng(1).integers(5, model.config.vocab_size - 1, args.positions)]
    ids[0] = model.config.bos_token_id
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.gguf"
        values = write_gguf(path, model, dense, experts)
        theirs = llama_logits(path, ids, args.threads)
        if args.self:
            model.load_state_dict(from_gguf_layout(values, model.config, model.state_dict()))
            write_gguf(Path(tmp) / "f32.gguf", model, [QT.F32], QT.F32)
            ours = llama_logits(Path(tmp) / "f32.gguf", ids, args.threads)
        else:
            replace = {
                "Q4_0": "{op: cpu_experts, device: cpu, kwargs: {quant: int4, group_size: 32, scale_dtype: fp16}}",
                "Q8_0": "{op: cpu_experts, device: cpu, kwargs: {quant: int8, group_size: 32, scale_dtype: fp16}}",
                "F32": "{op: experts, device: cpu}",
            }[args.experts]
            rules = Path(tmp) / "rules.yaml"
            rules.write_text(cpu_rules(replace))
            ours = our_logits(path, ids, rules, args.threads)
    corr = [float(np.corrcoef(a, b)[0, 1]) for a, b in zip(ours, theirs, strict=True)]
    report = {
        "arch": args.arch,
        "layers": model.config.num_hidden_layers,
        "experts": args.experts,
        "dense": args.dense,
        "against": "llama.cpp on F32 values" if args.self else "hetero-moe",
        "positions": args.positions,
        "corr_min": round(min(corr), 5),
        "corr_mean": round(float(np.mean(corr)), 5),
        "top1": round(float(np.mean(ours.argmax(1) == theirs.argmax(1))), 4),
        "max_abs_diff": round(float(np.abs(ours - theirs).max()), 4),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
