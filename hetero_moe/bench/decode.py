"""`hetero-moe bench decode`: decode speed of a whole model at a real shape, against the DRAM roofline
measured in the same run.

The checkpoint is synthetic (random values, the real layout and dimensions, `synth_large`), written
once into the cache directory. DeepSeek-V2-Lite and Qwen3-30B-A3B run whole; DeepSeek-V3 runs as K
real-size layers and is extrapolated to its 61 layers from the measured per-layer times.

Per decode step, the routed experts must stream `top_k x bytes per expert` from DRAM in every MoE
layer; the roofline is the measured DRAM read bandwidth divided by those bytes.
"""

from __future__ import annotations

import importlib
import resource
import statistics
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from hetero_moe.arch import load_config
from hetero_moe.bench.experts import dram_read_gbps
from hetero_moe.engine.sampler import SamplingParams
from hetero_moe.engine.scheduler import SchedulerConfig
from hetero_moe.llm import LLM
from hetero_moe.ops.base import Op, direct_tensors
from hetero_moe.ops.cpu_experts import CPUExperts
from hetero_moe.ops.experts import TorchExperts
from hetero_moe.ops.moe import MoEBlock
from hetero_moe.settings import cache_dir

ARCHS = {  # preset -> (shipped GPU rules, FP8 on disk as the release, default layers: None = whole)
    "deepseek-v2-lite": ("deepseek-v2-lite.yaml", False, None),
    "qwen3-30b-a3b": ("qwen3-moe.yaml", False, None),
    "deepseek-v3": ("deepseek-v3.yaml", True, 4),
}


@dataclass(frozen=True)
class DecodeBench:
    arch: str
    rules: str
    layers: int | None  # None: the whole model
    fp8: bool  # checkpoint on disk in FP8 (else bf16)
    steps: int = 32
    prompt_tokens: int = 16
    threads: int = 1
    prefill: tuple[int, ...] = ()  # prompt lengths whose prefill (time to first token) is measured too
    routing_skew: float = 0.0  # synthetic routers that prefer some experts (synth_large), for pinning
    max_context: int | None = None  # KV pool and context at least this many tokens (GPU memory at that context)
    dtype: str | None = None  # compute dtype; None: auto (`llm.place`: float32 CPU-only quantized, else bf16)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"--layers must be at least 1, got {self.layers}")
        if self.steps < 2 or self.prompt_tokens < 1 or self.threads < 1:
            raise ValueError("steps must be at least 2, prompt tokens and threads at least 1")
        if any(not isinstance(n, int) or n < 1 for n in self.prefill):
            raise ValueError(f"prefill lengths must be positive integers, got {self.prefill}")
        if self.max_context is not None and self.max_context < 1:
            raise ValueError(f"--max-context must be at least 1, got {self.max_context}")


def checkpoint(bench: DecodeBench, root: Path | None = None) -> Path:
    """The synthetic checkpoint for `bench`, written on first use (tens of GB at real size)."""
    from hetero_moe.synth.large import write_large_checkpoint

    name = f"{bench.arch}-{bench.layers or 'all'}-{'fp8' if bench.fp8 else 'bf16'}"
    if bench.routing_skew:
        name += f"-skew{bench.routing_skew:g}"
    out = (root or cache_dir() / "bench") / name
    done = out / ".complete"
    if not done.exists():
        write_large_checkpoint(
            preset_config(bench.arch), out, fp8=bench.fp8, layers=bench.layers, routing_skew=bench.routing_skew
        )
        done.write_text("written by hetero-moe bench decode\n")
    return out


class LayerTimer:
    """Wall time of each decoder layer (from its input norm, or the module in `starts`, to the end of its MLP or
    MoE block, as the runner calls them) and of each routed experts call, on forward hooks that wait for the
    GPU first; used in a separate profiled pass only. Our runner's layers start at their attention: its
    residual adds and norms need not be modules (`AddNorm`). Where the runner calls no module (its numpy decode
    lane: the attention's `decode`, the MLP's `run`), the timer wraps those methods, and it times the CPU
    experts by their `run`, which both their module and a block's numpy lane call, or, where a block runs in one
    kernel call, by that call (`MoEBlock.run_in_one_call`: its router and shared experts too); a layer's clock
    starts at whichever comes first and stops at whichever ends first."""

    def __init__(self, layers: list[nn.Module], blocks: list[nn.Module], sync, starts=None) -> None:
        self.sync = sync
        self.layer_s = [0.0] * len(layers)
        self.experts_s = 0.0
        self.handles = []
        self.wrapped: list[tuple[object, str]] = []
        starts = starts or [layer.input_layernorm for layer in layers]
        for i, (layer, start) in enumerate(zip(layers, starts, strict=True)):
            self.handles.append(start.register_forward_pre_hook(self._start(("layer", i))))
            self.handles.append(layer.mlp.register_forward_hook(self._stop(("layer", i))))
            self._wrap(start, "decode", ("layer", i), stops=False)
            self._wrap(layer.mlp, "run", ("layer", i), stops=True)
        for b in blocks:
            self._wrap(b, "run_in_one_call", ("experts", 0))
            e = b.experts
            if not self._wrap(e, "run", ("experts", 0)):
                self.handles.append(e.register_forward_pre_hook(self._start(("experts", 0))))
                self.handles.append(e.register_forward_hook(self._stop(("experts", 0))))
        self.started: dict[tuple, float] = {}
        self.step_s = 0.0  # mean wall time of a step of the pass it timed, set by whoever runs it

    def _wrap(self, obj, name: str, key: tuple, starts: bool = True, stops: bool = True) -> bool:
        """Time `obj.name(...)` (a method it may lack) under `key`: start before the call, stop after it."""
        method = getattr(obj, name, None)
        if method is None:
            return False
        start, stop = self._start(key), self._stop(key)

        def timed(*args):
            if starts:
                start(obj, args)
            out = method(*args)
            if stops:
                stop(obj, args, out)
            return out

        setattr(obj, name, timed)
        self.wrapped.append((obj, name))
        return True

    def _start(self, key):
        def hook(module, args):
            if key not in self.started:
                self.sync()
                self.started[key] = time.perf_counter()

        return hook

    def _stop(self, key):
        def hook(module, args, out):
            if key not in self.started:
                return
            self.sync()
            seconds = time.perf_counter() - self.started.pop(key)
            if key[0] == "layer":
                self.layer_s[key[1]] += seconds
            else:
                self.experts_s += seconds

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for obj, name in self.wrapped:
            delattr(obj, name)


@dataclass(frozen=True)
class Extrapolation:
    """Which layers of the run are MoE and which dense, and how many of each the full model has."""

    moe: list[int]
    dense: list[int]
    full_moe: int
    full_dense: int

    @classmethod
    def of(cls, layers: list[nn.Module], is_moe, arch: str) -> Extrapolation:
        moe = [i for i, layer in enumerate(layers) if is_moe(layer.mlp)]
        return cls(moe, [i for i in range(len(layers)) if i not in moe], *layer_counts(preset_config(arch)))

    def split(self, seconds: float, layer_s: list[float]) -> tuple[float, float, float]:
        """(mean MoE layer, mean dense layer, outside the layers) of a pass of `seconds` in all."""
        moe_s = statistics.mean(layer_s[i] for i in self.moe)
        dense_s = statistics.mean(layer_s[i] for i in self.dense) if self.dense else 0.0
        return moe_s, dense_s, max(seconds - sum(layer_s), 0.0)

    def full(self, seconds: float, layer_s: list[float]) -> float:
        """A pass's total (time, or bytes) for the full model: outside + its MoE and dense layers at the means."""
        moe_s, dense_s, outside_s = self.split(seconds, layer_s)
        return outside_s + self.full_moe * moe_s + self.full_dense * dense_s


def cpu_weight_bytes(module: nn.Module) -> int:
    """Bytes of the weights in `module` placed on the CPU that a decode token reads whole: all of them but
    the routed experts' (counted per expert chosen) and the embedding's (one row a token). Beside the routed
    experts, they are the whole step's share of DRAM in a CPU-only placement."""
    total = 0
    for m in module.modules():
        if isinstance(m, (CPUExperts, TorchExperts, nn.Embedding)):
            continue
        if isinstance(m, Op):
            total += m.nbytes() if m.device.type == "cpu" else 0
        else:
            total += sum(t.numel() * t.element_size() for _, t in direct_tensors(m) if t.device.type == "cpu")
    return total


def run(bench: DecodeBench, model_dir: Path) -> dict:
    torch.set_num_threads(bench.threads)
    dram = dram_read_gbps()
    steps = bench.steps
    decode_tokens = 2 + 3 * steps + 2  # warm-up, timed, per-layer hooks, and the overhead pass
    context = max(bench.prompt_tokens + decode_tokens + 8, max(bench.prefill, default=0) + 1, bench.max_context or 0)
    batching = SchedulerConfig(max_batch=1, kv_cache_tokens=-(-context // 16) * 16, prefill_chunk=context)
    load_start = time.perf_counter()
    llm = LLM(
        model_dir,
        rules=bench.rules,
        dtype=bench.dtype or "auto",
        max_context=context,
        cpu_threads=bench.threads,
        batching=batching,
    )
    load_s = time.perf_counter() - load_start
    engine, runner = llm.engine, llm.runner
    gpu = next((d for d in llm.placed.devices() if d.type == "cuda"), None)
    sync = torch.cuda.synchronize if gpu is not None else (lambda: None)

    blocks = [m for m in llm.placed.model.modules() if isinstance(m, MoEBlock)]
    experts = [b.experts for b in blocks]
    shape = Extrapolation.of(runner.layers, lambda mlp: isinstance(mlp, MoEBlock), bench.arch)
    top_k = blocks[0].gate.top_k
    per_expert = _bytes_per_expert(experts[0])

    step_s, overlap, overhead, timer = _decode(engine, runner, blocks, sync, bench, decode_tokens, gpu is not None)
    # per-layer times, scaled by what the hooks' synchronisations added to the whole step; the experts' time,
    # inside a layer's, by the same factor (so that it stays inside)
    scale = step_s / timer.step_s
    layer_s = [t / steps * scale for t in timer.layer_s]
    experts_s = timer.experts_s / steps / len(shape.moe) * scale
    # outside: embedding, final norm, lm_head, sampling, detokenizing, Python
    moe_s, dense_s, outside_s = shape.split(step_s, layer_s)
    full_step_s = shape.full(step_s, layer_s)
    prefill = [_prefill(engine, runner, blocks, sync, n, shape) for n in bench.prefill]
    routed_bytes = shape.full_moe * top_k * per_expert
    roofline = dram["best"] * 1e9 / routed_bytes
    other_bytes = shape.full(cpu_weight_bytes(llm.placed.model), [cpu_weight_bytes(x) for x in runner.layers])
    tok_s = 1.0 / full_step_s
    wait_per_layer = overlap["wait_s"] / len(shape.moe) if overlap else experts_s
    layers_full = shape.full_moe + shape.full_dense
    llm.close()
    return {
        **{name: getattr(bench, name) for name in ("arch", "rules", "threads", "prompt_tokens")},
        "checkpoint": str(model_dir),
        "timed": TIMED,
        "dtype": str(llm.placed.dtype).removeprefix("torch."),
        "layers_run": len(runner.layers),
        "moe_layers_run": len(shape.moe),
        "layers_full": layers_full,
        "extrapolated": len(runner.layers) != layers_full,
        "load_s": load_s,
        "decode_step_ms_run": step_s * 1e3,
        "decode_tok_s": tok_s,
        "per_moe_layer_ms": {
            "total": moe_s * 1e3,
            "cpu_experts": experts_s * 1e3,
            "waiting": wait_per_layer * 1e3,
            "gpu_and_host": (moe_s - wait_per_layer) * 1e3,
        },
        "per_dense_layer_ms": dense_s * 1e3,
        "outside_layers_ms": outside_s * 1e3,
        "routed_bytes_per_token": routed_bytes,
        "dram_read_gbps": dram,
        "roofline_tok_s": roofline,
        "share_of_roofline": tok_s / roofline,
        "other_cpu_bytes_per_token": other_bytes,
        "cpu_roofline_tok_s": dram["best"] * 1e9 / (routed_bytes + other_bytes),
        "step_overhead": overhead,
        "prefill": prefill,
        "pcie_h2d_gbps": pcie_h2d_gbps() if gpu is not None else None,
        "context_tokens": context,
        "gpu_memory_gb": torch.cuda.max_memory_allocated(gpu) / 1e9 if gpu is not None else None,
        "gpu_memory_reserved_gb": torch.cuda.max_memory_reserved(gpu) / 1e9 if gpu is not None else None,
        "cpu_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }


TIMED = "Engine.step: schedule, forward, sample, detokenize, one request (as the server steps it)"


def _decode(engine, runner, blocks, sync, bench: DecodeBench, decode_tokens: int, gpu: bool):
    """One greedy request stepped by the engine as the server steps it (the host waits for each token):
    a timed pass, a pass for the overhead outside kernels (on a GPU torch's profiler, on the CPU alone the
    integer kernels' clock), then a pass with per-layer hooks (on the per-layer calls where a step runs in one:
    `ModelRunner.one_call`). Returns (mean step seconds, the CPU-experts overlap per step or None, the overhead or
    None, the layer timer)."""
    steps = bench.steps
    prompt = [i % 200 + 3 for i in range(bench.prompt_tokens)]
    request = engine.add_request(prompt, SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True))
    for _ in range(3):  # prefill, then two warm-up steps: allocator, kernel caches
        engine.step()
    stats = runner.overlap_stats()
    if stats is not None:
        stats.reset()
    step_s = statistics.mean(_timed_step(engine) for _ in range(steps))
    overlap = None if stats is None else {"experts_s": stats.experts_s / steps, "wait_s": stats.wait_s / steps}
    overhead = _step_overhead(engine, steps, step_s, overlap) if gpu else _cpu_overhead(engine, steps)
    timer = LayerTimer(runner.layers, blocks, sync, runner.mixers)
    runner.one_call = False  # the hooks need the per-layer calls: they split the one-call step's time
    try:
        timer.step_s = statistics.mean(_timed_step(engine) for _ in range(steps))
    finally:
        timer.remove()
        runner.one_call = True
    engine.abort(request)
    return step_s, overlap, overhead, timer


def _timed_step(engine) -> float:
    start = time.perf_counter()
    (event,) = engine.step()
    if isinstance(event.output, BaseException):
        raise event.output
    return time.perf_counter() - start


def _prefill(engine, runner, blocks, sync, n: int, shape: Extrapolation) -> dict:
    """One prompt of `n` tokens in one engine step (its first token sampled), per-layer times from hooks,
    extrapolated like decode."""
    engine.add_request([i % 200 + 3 for i in range(n)], SamplingParams(max_tokens=1, temperature=0))
    timer = LayerTimer(runner.layers, blocks, sync, runner.mixers)
    try:
        sync()
        seconds = _timed_step(engine)
    finally:
        timer.remove()
    full_s = shape.full(seconds, timer.layer_s)
    moe_s = shape.split(seconds, timer.layer_s)[0]
    return {"tokens": n, "ttft_s": full_s, "tok_s": n / full_s, "per_moe_layer_ms": moe_s * 1e3}


def _step_overhead(engine, steps: int, step_s: float, overlap: dict | None) -> dict:
    """Per decode step: the time GPU kernels ran (torch's profiler), and what is left of the step outside
    them and outside the wait for the CPU experts: launches, copies, synchronisation, Python."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            _timed_step(engine)
    events = prof.key_averages()
    kernel_us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) for e in events)
    kernel_s = kernel_us / 1e6 / steps
    wait_s = overlap["wait_s"] if overlap else 0.0
    return {
        "gpu_kernels_ms": kernel_s * 1e3,
        "waiting_for_cpu_experts_ms": wait_s * 1e3,
        "outside_kernels_and_experts_ms": max(step_s - kernel_s - wait_s, 0.0) * 1e3,
    }


def _cpu_overhead(engine, steps: int) -> dict | None:
    """Per decode step of a CPU-only placement: the time in the integer kernels (`int8dot.timed`: the dot
    products over weights, with the quantizing of their activations where one call does both, and the
    activations' quantization called apart), in the other Numba kernels a step calls (`OTHER_KERNELS`: a
    layer's latent attention and MoE block with their weights, routers, norms), and what is left of the step
    outside all of them (Python, numpy, sampling; torch where an op runs in torch). None when none of them ran
    (experts in fp8 or bf16)."""
    from hetero_moe.kernels.numba import int8dot

    others = [(importlib.import_module(m), name) for m, names in OTHER_KERNELS.items() for name in names]
    with int8dot.timed(others) as clock:
        step_s = statistics.mean(_timed_step(engine) for _ in range(steps))
    if not clock.calls and not clock.other_calls:
        return None
    weights_s, activations_s, other_s = clock.weights_s / steps, clock.activations_s / steps, clock.other_s / steps
    outside_s = max(step_s - weights_s - activations_s - other_s, 0.0)
    return {
        "cpu_weight_kernels_ms": weights_s * 1e3,
        "cpu_activations_ms": activations_s * 1e3,
        "kernel_calls": clock.calls / steps,
        "other_kernels_ms": other_s * 1e3,
        "other_kernel_calls": clock.other_calls / steps,
        "outside_kernels_ms": outside_s * 1e3,
        "outside_share": outside_s / step_s,
    }


# module -> the Numba kernels of a CPU decode step besides int8dot's, as the ops call them (module attributes). A
# step in one call (`decoder.step`), or a layer's latent attention (`decode`) and MoE block (`block`), run int8dot's
# kernels inside: their time counts here whole.
OTHER_KERNELS = {
    "hetero_moe.kernels.numba.decoder": ("step",),
    "hetero_moe.kernels.numba.latent": ("decode",),
    "hetero_moe.kernels.numba.moe": ("block",),
    "hetero_moe.kernels.numba.router": ("select",),
    "hetero_moe.kernels.numba.norm": ("rms_norm", "add_rms_norm"),
}


def pcie_h2d_gbps(gigabytes: float = 1.0, repeat: int = 5) -> float:
    """Host-to-GPU copy bandwidth from pinned memory, the path streamed expert weights would take."""
    host = torch.empty(int(gigabytes * 1e9), dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return host.numel() / statistics.median(times) / 1e9


def _bytes_per_expert(experts: nn.Module) -> float:
    if isinstance(experts, CPUExperts):
        return experts.nbytes() / experts.num_experts
    if isinstance(experts, TorchExperts):
        return (experts.w13[0].nbytes + experts.w2[0].nbytes) * 1.0
    raise TypeError(f"no byte count for routed experts of type {type(experts).__name__}")


def preset_config(arch: str):
    """The real config of a built-in shape preset (`configs/`)."""
    config, _ = load_config(Path(str(resources.files("hetero_moe.configs") / arch)))
    return config


def layer_counts(config) -> tuple[int, int]:
    """(MoE layers, dense layers) of a full config, by each architecture's own rule."""
    n = config.num_hidden_layers
    if getattr(config, "first_k_dense_replace", None) is not None:  # DeepSeek
        moe = n - config.first_k_dense_replace
    elif hasattr(config, "decoder_sparse_step"):  # Qwen3-MoE
        dense = set(config.mlp_only_layers or [])
        moe = sum(1 for i in range(n) if i not in dense and (i + 1) % config.decoder_sparse_step == 0)
    else:  # Mixtral: every layer
        moe = n
    return moe, n - moe


def format_report(r: dict) -> str:
    m = r["per_moe_layer_ms"]
    lines = [
        f"timed: {r['timed']}",
        f"{r['arch']} on {r['rules']}: ran {r['layers_run']} layers ({r['moe_layers_run']} MoE), "
        f"{r['threads']} CPU threads; DRAM read {r['dram_read_gbps']['best']:.1f} GB/s",
        f"decode {r['decode_tok_s']:.2f} tok/s after a prompt of {r['prompt_tokens']} tokens"
        + (f" (extrapolated to {r['layers_full']} layers)" if r["extrapolated"] else ""),
        f"roofline {r['roofline_tok_s']:.2f} tok/s ({r['routed_bytes_per_token'] / 1e9:.2f} GB routed per token): "
        f"{r['share_of_roofline']:.0%}",
        *(
            [
                f"CPU roofline {r['cpu_roofline_tok_s']:.2f} tok/s (also {r['other_cpu_bytes_per_token'] / 1e9:.2f} GB "
                f"of other weights on the CPU per token): {r['decode_tok_s'] / r['cpu_roofline_tok_s']:.0%}"
            ]
            if r["other_cpu_bytes_per_token"]
            else []
        ),
        f"per MoE layer {m['total']:.3f} ms: CPU experts {m['cpu_experts']:.3f} (with the router and shared "
        f"experts where the block is one kernel call), waiting {m['waiting']:.3f}, "
        f"GPU and host {m['gpu_and_host']:.3f}; dense layer {r['per_dense_layer_ms']:.3f} ms; "
        f"outside layers {r['outside_layers_ms']:.3f} ms",
        *(
            f"prefill {p['tokens']} tokens: {p['tok_s']:.0f} tok/s, time to first token {p['ttft_s']:.2f} s"
            for p in r["prefill"]
        ),
        *(
            [
                f"per step: GPU kernels {o['gpu_kernels_ms']:.2f} ms, waiting for CPU experts "
                f"{o['waiting_for_cpu_experts_ms']:.2f} ms, outside both {o['outside_kernels_and_experts_ms']:.2f} ms"
            ]
            if (o := r["step_overhead"]) and "gpu_kernels_ms" in o
            else []
        ),
        *(
            [
                f"per step: integer kernels ({o['kernel_calls']:.0f} calls) {o['cpu_weight_kernels_ms']:.2f} ms "
                f"over weights and {o['cpu_activations_ms']:.2f} ms quantizing activations apart (most are "
                f"quantized inside the weights' calls), other kernels ({o['other_kernel_calls']:.0f} calls: the "
                f"whole step, or latent attention and MoE blocks a call each, with their weights, routers, norms) "
                f"{o['other_kernels_ms']:.2f} ms, outside all of them "
                f"{o['outside_kernels_ms']:.2f} ms ({o['outside_share']:.0%} of the step)"
            ]
            if (o := r["step_overhead"]) and "cpu_weight_kernels_ms" in o
            else []
        ),
        "GPU memory "
        + (f"{r['gpu_memory_gb']:.2f} GB" if r["gpu_memory_gb"] is not None else "none")
        + f"; CPU peak RSS {r['cpu_peak_rss_gb']:.1f} GB; load {r['load_s']:.0f} s",
    ]
    return "\n".join(lines)
