"""`hetero-moe bench experts`: the CPU experts at a real model's layer shape against the box's own
DRAM read bandwidth, measured in the same run, and against torch's CPU kernels on the same routing.

Weights are random bytes in each format's real layout (no quantization pass), and every timed call
routes to freshly drawn experts (at few tokens none of the last call's), so weights come from DRAM rather than
cache.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from types import SimpleNamespace

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from hetero_moe.kernels.numba.amx import PEAK_TILES, tile_rounds
from hetero_moe.kernels.numba.simd import INT8, Simd, choose_isa, dot_macs, dot_rounds, peak_chains
from hetero_moe.ops.base import BuildContext, Services
from hetero_moe.ops.cpu_experts import CPUExperts, CPUExpertsKwargs
from hetero_moe.settings import cpu_isa

PRESETS = {"deepseek-v3": "deepseek-v3", "deepseek-v2-lite": "deepseek-v2-lite", "qwen3-30b-a3b": "qwen3-30b-a3b"}


@dataclass(frozen=True)
class Shape:
    hidden: int
    inter: int
    experts: int
    top_k: int
    moe_layers: int


def preset_shape(arch: str) -> Shape:
    path = resources.files("hetero_moe.configs") / PRESETS[arch] / "config.json"
    c = json.loads(path.read_text())
    experts = c.get("n_routed_experts") or c.get("num_experts") or c["num_local_experts"]
    dense = c.get("first_k_dense_replace", 0)
    return Shape(
        c["hidden_size"], c["moe_intermediate_size"], experts, c["num_experts_per_tok"], c["num_hidden_layers"] - dense
    )


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def _read_sum(a):
    """STREAM-style read: every thread sums its share of `a`."""
    total = 0.0
    for i in prange(a.shape[0]):
        total += a[i]
    return total


def read_pool(gigabytes: float = 2.0) -> np.ndarray:
    """A float32 array of `gigabytes` far larger than cache for `dram_read_gbps`, every page written: filled with
    one value (random values took 4.6 s for 2 GB here, 0.13 s this way; a sum reads them at the same rate)."""
    return np.full(int(gigabytes * 1e9 / 4), 0.5, np.float32)


def dram_read_gbps(gigabytes: float = 2.0, repeat: int = 5, pool: np.ndarray | None = None) -> dict[str, float]:
    """Read bandwidth of this box: a parallel Numba sum and torch's sum over an array far larger than cache (`pool`
    from `read_pool`, or one of `gigabytes` made here)."""
    a = read_pool(gigabytes) if pool is None else pool
    t = torch.from_numpy(a)
    _read_sum(a[:1024])
    out = {
        "numba": a.nbytes / _median(lambda: _read_sum(a), repeat) / 1e9,
        "torch": a.nbytes / _median(lambda: t.sum(), repeat) / 1e9,
    }
    out["best"] = max(out["numba"], out["torch"])
    return out


def dram_read_probe(pool: np.ndarray) -> Callable[[], float]:
    """A probe of the read bandwidth: one read of a quarter of `pool` (`read_pool`: 500 MB, 15x an EPYC's L3) by
    each of `dram_read_gbps`' sums, the faster, in GB/s. A quarter, so that a second of calls has several probes
    (one read of the pool takes about 65 ms at 30 GB/s)."""
    part = pool[: len(pool) // 4]
    t = torch.from_numpy(part)
    _read_sum(part[:1024])
    return lambda: part.nbytes / min(_seconds(lambda: _read_sum(part)), _seconds(lambda: t.sum())) / 1e9


@njit(parallel=True, nogil=True, cache=True)
def _dot_peak(simd, threads, rounds):
    """Every thread runs `rounds` of `dot_rounds`."""
    total = 0
    for _ in prange(threads):
        total += dot_rounds(simd, rounds)
    return total


def int8_peak_probe(isa: str, threads: int, rounds: int = 4_000_000) -> Callable[[], float]:
    """A probe of the backend's int8 multiply-adds a second on `threads` threads, in billions: one run of its dot
    product on registers, `peak_chains` chains a thread, no memory (compiled here)."""
    simd = Simd(isa, INT8, 32)
    macs = threads * rounds * peak_chains(isa) * dot_macs(isa)
    return _probe(lambda r: _dot_peak(simd, threads, r), macs, rounds)


@njit(parallel=True, nogil=True, cache=True)
def _tile_peak(threads, rounds):
    """Every thread runs `rounds` of `tile_rounds`."""
    total = 0
    for _ in prange(threads):
        total += tile_rounds(rounds)
    return total


def amx_peak_probe(threads: int, rounds: int = 1_000_000) -> Callable[[], float]:
    """A probe of AMX's int8 multiply-adds a second on `threads` threads, in billions: one run of `PEAK_TILES` tile
    products a round on tile registers, no memory. Only on the `avx512amx` backend."""
    return _probe(lambda r: _tile_peak(threads, r), threads * rounds * PEAK_TILES * 16 * 16 * 64, rounds)


def _probe(run: Callable[[int], object], macs: int, rounds: int) -> Callable[[], float]:
    """`run(1)` (compiling it), then a callable: `macs` over the time of one `run(rounds)`, in billions a second."""
    run(1)
    return lambda: macs / _seconds(lambda: run(rounds)) / 1e9


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median(fn: Callable[[], object], repeat: int) -> float:
    return statistics.median(_seconds(fn) for _ in range(repeat))


INTEGER = ("int4", "int8")  # the formats the integer dot products run
# calls of one token count go on until they add up to this: a one-token call takes under a millisecond, and the
# median of 20 moved by a tenth between runs on a noisy VM
MIN_SECONDS = 1.0
# The DRAM read and the peaks are probed among the calls, before the first and after a call while the probes have
# taken less than this share of the calls' time, and each token count's shares are of the medians of its probes:
# on a 2-vCPU VM the peak measured once (the best of 5) read 157 to 196 G a second in three runs minutes apart, the
# DRAM read 18 to 37 GB/s (Zen 3), and the calls move with them
PROBE_SHARE = 0.25


def random_experts(shape: Shape, quant: str, threads: int, experts: int, group_size: int | None = None) -> CPUExperts:
    """A CPUExperts op at `shape` filled with random bytes in its format's layout (INT4 group 64 and INT8
    group 32 unless `group_size` says otherwise: the shipped rules' settings), on the backend `HETERO_MOE_CPU_ISA`
    forces, else the best."""
    group_size = group_size or (32 if quant == "int8" else 64)
    hf = SimpleNamespace(gate_up_proj=torch.empty(experts, 2 * shape.inter, shape.hidden, device="meta"))
    services = Services(cpu_isa=cpu_isa())  # HETERO_MOE_CPU_ISA, as a loaded model's ops take it
    ctx = BuildContext(
        config=None, dtype=torch.bfloat16, device=torch.device("cpu"), cpu_threads=threads, services=services
    )
    op = CPUExperts(hf, ctx, CPUExpertsKwargs(quant=quant, group_size=group_size, torch_min_tokens=1 << 30))
    fmt = op.format
    fmt.allocate()
    op.allocated = True
    rng = np.random.default_rng(1)
    if quant in ("int4", "int8"):
        for a in (fmt.w13, fmt.w2):
            a[...] = rng.integers(0, 256, a.shape, dtype=np.uint8)
        for s in (fmt.s13, fmt.s2):  # bf16 bits of scales around 0.01
            s[...] = (
                torch.full(s.shape, 0.01)
                .mul_(torch.rand(s.shape) + 0.5)
                .to(torch.bfloat16)
                .view(torch.int16)
                .numpy()
                .view(np.uint16)
            )
    elif quant == "fp8":
        fmt.block = (128, 128)
        from hetero_moe.kernels.quant import fp8_scale_shape

        fmt.s13 = rng.random((experts, 2, *fp8_scale_shape((shape.inter, shape.hidden), (128, 128))), np.float32)
        fmt.s2 = rng.random((experts, *fp8_scale_shape((shape.hidden, shape.inter), (128, 128))), np.float32)
        for a in (fmt.w13, fmt.w2):
            a[...] = rng.integers(0, 256, a.shape, dtype=np.uint8) & 0xF7  # no NaN codes (0x7F, 0xFF)
    else:
        for a in (fmt.w13, fmt.w2):
            a[...] = (torch.randn(a.shape) * 0.02).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    fmt.bind(op.isa)
    op.forward(torch.zeros(1, shape.hidden), torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1))  # compile
    return op


def _routing(
    tokens: int, shape: Shape, experts: int, rng: np.random.Generator, avoid: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random `index [tokens, top_k]` and weights, each token's experts distinct. The experts `avoid` (the last
    call's) are left out where the others are at least tokens x top_k: their weights may still be in L3 (32 MB holds
    a V2-Lite token's 26 MB), where in a decode step the other layers' weights have evicted them."""
    choose = np.arange(experts)
    if avoid is not None and experts - len(avoid) >= tokens * shape.top_k:
        choose = np.setdiff1d(choose, avoid)
    index = np.stack([rng.choice(choose, size=shape.top_k, replace=False) for _ in range(tokens)])
    return torch.from_numpy(index).long(), torch.rand(tokens, shape.top_k)


@dataclass(frozen=True)
class Result:
    tokens: int
    quant: str
    seconds_per_layer: float
    weight_gbps: float
    dram_read_gbps: float  # the median of `dram_read_probe` among the calls
    ratio: float  # weight_gbps / dram_read_gbps
    dram_read_around_gbps: float  # `dram_read_gbps` (the best of 3) right before and right after the calls, the mean
    distinct_experts: float
    weight_bytes: float
    tokens_per_expert: float  # of those run: tokens x top-k / distinct experts
    gmacs: float  # multiply-adds a second, in billions: tokens x top-k x 3 x hidden x intermediate
    int8_peak_gmacs: float | None  # the median of `int8_peak_probe` among the calls (None without integer kernels)
    of_int8_peak: float | None  # gmacs / int8_peak_gmacs
    amx_peak_gmacs: float | None  # the median of `amx_peak_probe` among the calls (None but on AMX)
    of_amx_peak: float | None  # gmacs / amx_peak_gmacs


def _timed_calls(
    op: CPUExperts,
    x: torch.Tensor,
    shape: Shape,
    n_experts: int,
    rng: np.random.Generator,
    probes: dict[str, Callable[[], float]],
    iters: int,
    min_seconds: float,
) -> tuple[list[float], list[int], dict[str, list[float]]]:
    """`op.forward(x)` at least `iters` times and `min_seconds`, a fresh routing each call, with `probes` run before
    the first and among the calls (`PROBE_SHARE`) -> (each call's seconds, each call's experts, each probe's
    readings)."""
    times, distinct, last = [], [], None
    probed = {name: [probe()] for name, probe in probes.items()}
    probing = 0.0
    while len(times) < iters or sum(times) < min_seconds:
        index, weights = _routing(x.shape[0], shape, n_experts, rng, last)
        start = time.perf_counter()
        op.forward(x, index, weights)
        times.append(time.perf_counter() - start)
        last = torch.unique(index).numpy()
        distinct.append(len(last))
        if probing <= PROBE_SHARE * sum(times):
            start = time.perf_counter()
            for name, probe in probes.items():
                probed[name].append(probe())
            probing += time.perf_counter() - start
    return times, distinct, probed


def bench_experts(
    arch: str,
    quant: str,
    tokens: list[int],
    threads: int,
    experts: int | None = None,
    iters: int = 20,
    baselines: bool = True,
    min_seconds: float = MIN_SECONDS,
) -> dict:
    torch.set_num_threads(threads)
    shape = preset_shape(arch)
    n_experts = experts or shape.experts
    pool = read_pool()
    dram = dram_read_gbps(pool=pool)
    op = random_experts(shape, quant, threads, n_experts)
    isa = choose_isa(op.isa)
    probes = {"dram": dram_read_probe(pool)}
    if quant in INTEGER and isa != "float":
        probes["int8"] = int8_peak_probe(isa, threads)
    if quant in INTEGER and isa == "avx512amx":
        probes["amx"] = amx_peak_probe(threads)
    peaks = {name: max(probes[name]() for _ in range(5)) for name in ("int8", "amx") if name in probes}  # best of 5
    per_expert = op.format.nbytes() / n_experts
    rng = np.random.default_rng(2)
    results = []
    for t in tokens:
        x = torch.randn(t, shape.hidden) * 0.1
        op.forward(x, *_routing(t, shape, n_experts, rng))
        before = dram_read_gbps(repeat=3, pool=pool)["best"]
        times, distinct, probed = _timed_calls(op, x, shape, n_experts, rng, probes, iters, min_seconds)
        around = (before + dram_read_gbps(repeat=3, pool=pool)["best"]) / 2
        near, peak, amx_peak = (statistics.median(probed[k]) if k in probed else None for k in ("dram", "int8", "amx"))
        sec = statistics.median(times)
        used = statistics.mean(distinct)
        gbps = used * per_expert / sec / 1e9
        gmacs = t * shape.top_k * 3 * shape.hidden * shape.inter / sec / 1e9
        results.append(
            Result(
                t,
                quant,
                sec,
                gbps,
                near,
                gbps / near,
                around,
                used,
                used * per_expert,
                t * shape.top_k / used,
                gmacs,
                peak,
                gmacs / peak if peak else None,
                amx_peak,
                gmacs / amx_peak if amx_peak else None,
            )
        )
    del pool  # 2 GB, before the baselines make theirs
    out = {
        "arch": arch,
        "shape": asdict(shape),
        "experts_in_memory": n_experts,
        "threads": threads,
        "dram_read_gbps": dram,
        "isa": isa,
        "int8_peak_gmacs": peaks.get("int8"),
        "amx_peak_gmacs": peaks.get("amx"),
        "results": [asdict(r) for r in results],
    }
    if baselines:
        out["baselines"] = torch_baselines(shape, tokens, threads, iters, dram["best"])
    return out


def torch_baselines(shape: Shape, tokens: list[int], threads: int, iters: int, dram: float) -> list[dict]:
    """bf16 `F.linear` per selected expert, and torch's INT4 CPU kernel where this torch has one, on a pool
    of experts large enough (>= 2 GB) that weights come from DRAM."""
    per_expert_bf16 = 3 * shape.hidden * shape.inter * 2
    pool = max(2 * shape.top_k, min(shape.experts, int(2e9 // per_expert_bf16) + 1))
    bf16 = [
        [
            (torch.randn(*s) * 0.02).to(torch.bfloat16)
            for s in ((shape.inter, shape.hidden),) * 2 + ((shape.hidden, shape.inter),)
        ]
        for _ in range(pool)
    ]
    int4 = _int4_pool(shape, pool)
    rng = np.random.default_rng(3)
    out = []
    for name, bytes_per_expert, run in (
        ("torch_bf16_linear", per_expert_bf16, lambda x, e: _bf16_expert(x, bf16[e])),
        (
            "torch_int4pack_mm",
            3 * shape.hidden * shape.inter // 2,
            (lambda x, e: _int4_expert(x, int4[e])) if int4 else None,
        ),
    ):
        if run is None:
            out.append({"name": name, "unavailable": "this torch has no _weight_int4pack_mm_for_cpu"})
            continue
        for t in tokens:
            x = torch.randn(t, shape.hidden).to(torch.bfloat16)
            times, distinct = [], []
            for _ in range(iters):
                index, _ = _routing(t, shape, pool, rng)
                chosen = torch.unique(index).tolist()
                start = time.perf_counter()
                for e in chosen:
                    rows = (index == e).any(dim=1)
                    run(x[rows], e)
                times.append(time.perf_counter() - start)
                distinct.append(len(chosen))
            sec = statistics.median(times[1:])
            gbps = statistics.mean(distinct) * bytes_per_expert / sec / 1e9
            out.append({"name": name, "tokens": t, "seconds_per_layer": sec, "weight_gbps": gbps, "ratio": gbps / dram})
    return out


def _bf16_expert(x: torch.Tensor, w: list[torch.Tensor]) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w[0])) * F.linear(x, w[1]), w[2])


def _int4_pool(shape: Shape, pool: int) -> list | None:
    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if convert is None or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    g = 64
    experts = []
    for _ in range(pool):
        mats = []
        for n, k in ((shape.inter, shape.hidden),) * 2 + ((shape.hidden, shape.inter),):
            packed = convert(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
            sz = (torch.rand(-(-k // g), n, 2) * 0.01).to(torch.bfloat16)
            mats.append((packed, sz))
        experts.append(mats)
    return experts


def _int4_expert(x: torch.Tensor, mats: list) -> torch.Tensor:
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    gate = mm(x, mats[0][0], 64, mats[0][1])
    up = mm(x, mats[1][0], 64, mats[1][1])
    return mm(F.silu(gate) * up, mats[2][0], 64, mats[2][1])
