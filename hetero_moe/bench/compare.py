"""`hetero-moe bench compare`: ours against plain transformers on the same synthetic checkpoint, in one
run, and the rooflines of this box.

transformers runs the way a user would offload a model too big for the GPU: `from_pretrained` with a
`device_map` (accelerate) that puts every routed experts module on the CPU and the rest on the GPU;
accelerate then copies each offloaded layer's experts to the GPU for every forward. On a box without
a GPU everything runs on the CPU. Decode and prefill are timed as in `bench decode`, with per-layer
hooks so that a DeepSeek-V3 run of K layers extrapolates to its 61.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from hetero_moe.bench import decode as bench_decode
from hetero_moe.bench.decode import DecodeBench


def run(
    bench: DecodeBench, model_dir: Path, transformers_baseline: bool = True, experts_implementation: str | None = None
) -> dict:
    """`experts_implementation` overrides transformers' default for its fused experts (e.g. "eager" for
    shapes its grouped matmul rejects on the CPU)."""
    ours = bench_decode.run(bench, model_dir)
    gc.collect()
    theirs = (
        _transformers(bench, model_dir, experts_implementation)
        if transformers_baseline
        else {"skipped": "--no-transformers"}
    )
    return {"arch": bench.arch, "ours": ours, "transformers": theirs}


def _device_map(model: nn.Module, gpu: bool) -> dict[str, int | str]:
    """Every module that holds tensors of its own -> cuda:0, routed experts -> cpu."""
    out: dict[str, int | str] = {}
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if own and name:
            out[name] = "cpu" if not gpu or name.endswith(".mlp.experts") else 0
    return out


def _transformers(bench: DecodeBench, model_dir: Path, experts_implementation: str | None) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from hetero_moe.arch import build_meta_model, load_config

    gpu = torch.cuda.is_available()
    config, arch = load_config(model_dir)
    device_map = _device_map(build_meta_model(config, arch, torch.bfloat16), gpu)
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            config=AutoConfig.from_pretrained(model_dir, trust_remote_code=False),
            dtype=torch.bfloat16,
            device_map=device_map,
            trust_remote_code=False,
        )
    except (ValueError, RuntimeError, OSError, ImportError, NotImplementedError) as e:
        return {"unavailable": f"transformers could not load it: {type(e).__name__}: {e}"[:500]}
    load_s = time.perf_counter() - start
    model.eval()
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    device = "cuda:0" if gpu else "cpu"
    layers = list(model.model.layers)
    shape = bench_decode.Extrapolation.of(layers, lambda mlp: hasattr(mlp, "experts"), bench.arch)

    def timed(ids: torch.Tensor, past=None):
        timer = bench_decode.LayerTimer(layers, [], sync)
        try:
            sync()
            begin = time.perf_counter()
            with torch.inference_mode():
                out = model(ids, past_key_values=past, use_cache=True)
            int(out.logits[0, -1].argmax())
            seconds = time.perf_counter() - begin
        finally:
            timer.remove()
        return out, seconds, timer.layer_s

    prompt = (torch.arange(bench.prompt_tokens) % 200 + 3)[None].to(device)
    out, _, _ = timed(prompt)
    past, steps = out.past_key_values, []
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(2 + bench.steps):  # two warm-up steps, then the timed ones
        out, seconds, layer_s = timed(token, past)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        steps.append(shape.full(seconds, layer_s))
    step_s = statistics.mean(steps[2:])
    prefill = []
    for n in bench.prefill:
        ids = (torch.arange(n) % 200 + 3)[None].to(device)
        _, seconds, layer_s = timed(ids)
        full_s = shape.full(seconds, layer_s)
        prefill.append({"tokens": n, "ttft_s": full_s, "tok_s": n / full_s})
    return {
        "device_map": "routed experts on the CPU, the rest on cuda:0" if gpu else "everything on the CPU",
        "load_s": load_s,
        "decode_tok_s": 1.0 / step_s,
        "prefill": prefill,
        "gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if gpu else None,
        "cpu_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }


def format_report(r: dict) -> str:
    ours, theirs = r["ours"], r["transformers"]
    lines = [bench_decode.format_report(ours), ""]
    if "decode_tok_s" not in theirs:
        lines.append(f"transformers: {theirs.get('unavailable') or theirs.get('skipped')}")
        return "\n".join(lines)
    lines.append(
        f"transformers ({theirs['device_map']}): decode {theirs['decode_tok_s']:.2f} tok/s "
        f"({theirs['decode_tok_s'] / ours['roofline_tok_s']:.0%} of the roofline); ours is "
        f"{ours['decode_tok_s'] / theirs['decode_tok_s']:.1f}x"
    )
    for p in theirs["prefill"]:
        lines.append(f"transformers prefill {p['tokens']} tokens: {p['tok_s']:.0f} tok/s, TTFT {p['ttft_s']:.2f} s")
    return "\n".join(lines)
