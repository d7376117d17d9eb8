"""Our logits against llama.cpp's on the same GGUF file, teacher-forced over the same token ids.

Writes a tiny GGUF of one architecture (`hetero_moe/synth/gguf.py`: random weights, llama.cpp's layout)
with the dense matrices and the routed experts in the types given, evaluates the ids with llama.cpp through
llama-cpp-python (all logits, CPU) and with hetero-moe (float32, `TeacherForced`, one token per step), and
prints one JSON line: per-position correlation (min, mean) and top-1 agreement.

    LLAMA_CPP_LIB_PATH=DIR python benchmarks/gguf_llamacpp.py --arch DeepseekV3ForCausalLM --experts Q4_0
    LLAMA_CPP_LIB_PATH=DIR python benchmarks/gguf_llamacpp.py --file ~/.cache/hetero-moe-peer/v2lite-q4_0.gguf
    ... --file F --rules cpu-only-int4.yaml   # the file's blocks wherever our rules quantize on the CPU

`--experts` takes one block type, or two (gate and up, down: `Q4_K,Q6_K`). `--file` compares on an existing
GGUF instead (the peer's V2-Lite-shaped files: no tokenizer, so the ids are random), experts in its blocks
and the rest dequantized to float32.

llama.cpp runs twice, without flash attention (the reference) and with it: the second run against the first is
what llama.cpp's own change of arithmetic does to these logits. A random-weight model has positions where that
alone decorrelates the logits (a routing choice near a tie flips, and the layers after it amplify the change), so
the report also gives our figures over the positions where llama.cpp agrees with itself (correlation at least
`STABLE`), and names the others.

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

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from hetero_moe.kernels.ggml_blocks import REPACK

from hetero_moe.bench.teacher import TeacherForced
from hetero_moe.engine.runner import ModelRunner
from hetero_moe.llm import place
from hetero_moe.loader.gguf_file import GGUFFile
from hetero_moe.loader.gguf_load import load_gguf_weights
from hetero_moe.synth import tiny as synth
from hetero_moe.synth.gguf import GGUF_SIZES, cpu_rules, from_gguf_layout, write_gguf

STABLE = 0.99  # llama.cpp with and without flash attention correlate at least this much at a stable position


def llama_logits(path: Path, ids: list[int], threads: int, flash_attn: bool = False) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path),
        n_ctx=2 * len(ids),
        n_batch=2 * len(ids),
        n_threads=threads,
        logits_all=True,
        flash_attn=flash_attn,
        verbose=False,
    )
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def references(path: Path, ids: list[int], threads: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's logits without flash attention (what we compare with) and with it (its own spread)."""
    return llama_logits(path, ids, threads), llama_logits(path, ids, threads, flash_attn=True)


def our_logits(path: Path, ids: list[int], rules: Path, threads: int) -> np.ndarray:
    placed = place(path, rules, "float32", threads)
    load_gguf_weights(placed, GGUFFile.open(path))
    tf = TeacherForced(ModelRunner(placed), 2 * len(ids))
    return np.stack([tf.feed([t]).double().numpy() for t in ids])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="DeepseekV3ForCausalLM", choices=list(GGUF_SIZES))
    p.add_argument("--experts", default="Q4_0", help=f"F32 or block types: {', '.join(REPACK)}; or gate/up,down")
    p.add_argument("--file", type=Path, help="an existing GGUF file instead of a tiny one")
    p.add_argument("--dense", default="F32", help="comma-separated types, taken in turn (default F32)")
    p.add_argument("--layers", type=int, help="decoder layers (llama.cpp reads a deepseek2 of 26/27 as V2-Lite)")
    p.add_argument("--positions", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--self", action="store_true", help="llama.cpp on this file against llama.cpp on F32 values")
    p.add_argument("--rules", help="with --file: our rules (default: experts in the file's blocks, the rest float32)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "rules.yaml"
        if args.file is not None:
            rules.write_text(cpu_rules("{op: cpu_experts, device: cpu}"))
            if args.rules is not None:
                rules = args.rules
            g = GGUFFile.open(args.file)
            vocab = g.tensors["token_embd.weight"].shape[0]
            ids = [int(x) for x in np.random.default_rng(1).integers(5, vocab - 1, args.positions)]
            theirs, spread = references(args.file, ids, args.threads)
            ours = our_logits(args.file, ids, rules, args.threads)
            types = sorted({t.type.name for n, t in g.tensors.items() if "_exps" in n})
            report = {"file": str(args.file), "layers": g.metadata.get(f"{g.architecture()}.block_count")}
            report |= {"experts": "/".join(types), "dense": "the file's", "rules": str(args.rules or "float")}
            print(json.dumps(report | compare(ours, theirs, spread, "hetero-moe")))
            return
        extra = {"num_hidden_layers": args.layers} if args.layers else {}
        if args.arch == "Qwen3MoeForCausalLM":
            extra["mlp_only_layers"] = []  # llama.cpp's qwen3moe has no dense layers
        dense, types = [QT[t] for t in args.dense.split(",")], [QT[t] for t in args.experts.split(",")]
        if any(gguf.GGML_QUANT_SIZES[t][0] == 256 for t in types):  # expert rows of whole 256-value blocks
            extra["intermediate_size" if args.arch == "MixtralForCausalLM" else "moe_intermediate_size"] = 256
        model = synth.random_model(synth.tiny_config(args.arch, **{**GGUF_SIZES[args.arch], **extra}), seed=3)
        experts = types[0] if len(types) == 1 else (types[0], types[0], types[1])
        ids = [int(x) for x in np.random.default_rng(1).integers(5, model.config.vocab_size - 1, args.positions)]
        ids[0] = model.config.bos_token_id
        path = Path(tmp) / "model.gguf"
        values = write_gguf(path, model, dense, experts)
        theirs, spread = references(path, ids, args.threads)
        if args.self:
            model.load_state_dict(from_gguf_layout(values, model.config, model.state_dict()))
            write_gguf(Path(tmp) / "f32.gguf", model, [QT.F32], QT.F32)
            ours = llama_logits(Path(tmp) / "f32.gguf", ids, args.threads)
        else:  # experts in blocks run in them, whatever the rule's quant
            rules.write_text(
                cpu_rules("{op: experts, device: cpu}" if args.experts == "F32" else "{op: cpu_experts, device: cpu}")
            )
            ours = our_logits(path, ids, rules, args.threads)
    report = {"arch": args.arch, "layers": model.config.num_hidden_layers, "experts": args.experts, "dense": args.dense}
    against = "llama.cpp on F32 values" if args.self else "hetero-moe"
    print(json.dumps(report | compare(ours, theirs, spread, against)))


def correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per position, the correlation of two runs' logits."""
    return np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b, strict=True)])


def agreement(ours: np.ndarray, theirs: np.ndarray, where: np.ndarray) -> dict:
    corr, same = correlations(ours, theirs)[where], (ours.argmax(1) == theirs.argmax(1))[where]
    return {
        "positions": int(where.sum()),
        "corr_min": round(float(corr.min()), 5),
        "corr_mean": round(float(corr.mean()), 5),
        "top1": round(float(same.mean()), 4),
    }


def compare(ours: np.ndarray, theirs: np.ndarray, spread: np.ndarray, against: str) -> dict:
    """`ours` against llama.cpp's `theirs` (no flash attention), over all positions and over those where llama.cpp
    with flash attention (`spread`) correlates with `theirs` at least `STABLE`; and `spread` against `theirs`."""
    corr = correlations(ours, theirs)
    everywhere = np.ones(len(ours), bool)
    stable = correlations(spread, theirs) >= STABLE
    return {
        "against": against,
        **agreement(ours, theirs, everywhere),
        "max_abs_diff": round(float(np.abs(ours - theirs).max()), 4),
        "worst": [  # (position, correlation, llama.cpp's logit spread there)
            (int(i), round(float(corr[i]), 4), round(float(theirs[i].std()), 4)) for i in np.argsort(corr)[:3]
        ],
        "llama.cpp with flash attention": agreement(spread, theirs, everywhere),
        "unstable positions": [int(i) for i in np.flatnonzero(~stable)],
        "at the stable positions": agreement(ours, theirs, stable),
    }


if __name__ == "__main__":
    main()
