"""Q4_0 experts read in place from a GGUF file against the same experts repacked (INT4, group 32, fp16
scales), in one process: one token to 6 of 64 experts of a random layer per call, alternating the two
layouts every 5 calls, 200 calls each. Checks first that both give the same bits.

    python benchmarks/gguf_in_place.py ~/.cache/hetero-moe-peer/v2lite-q4_0.gguf --threads 2

Prints the median time of a call (gate/up and down) and the expert bytes it reads per second.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numba
import numpy as np
from hetero_moe.kernels.numba import int8dot
from hetero_moe.kernels.numba.common import group_by_expert
from hetero_moe.kernels.numba.int4 import SCALE_FP16

from hetero_moe.loader.gguf_file import GGUFFile

TOP_K, REPEATS, RUN = 6, 40, 5


def repacked(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 rows `[E, O, nb * 18]` -> INT4 codes `[E, O, nb * 16]` and fp16 scale bits `[E, O, nb]`."""
    blocks = raw.reshape(*raw.shape[:2], -1, 18)
    codes = np.ascontiguousarray(blocks[..., 2:]).reshape(*raw.shape[:2], -1)
    return codes, np.ascontiguousarray(blocks[..., :2]).view(np.uint16)[..., 0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    numba.set_num_threads(args.threads)
    g = GGUFFile.open(args.gguf)
    names = sorted({n.split(".")[1] for n in g.tensors if n.endswith("ffn_gate_exps.weight")}, key=int)
    layers = []
    for n in names:
        gate, up, down = (
            np.ascontiguousarray(g.tensors[f"blk.{n}.ffn_{p}_exps.weight"].data) for p in ("gate", "up", "down")
        )
        layers.append({"raw": (gate, up, down), "rep": (repacked(gate), repacked(up), repacked(down))})
    experts, inter = layers[0]["raw"][0].shape[:2]
    hidden = layers[0]["raw"][2].shape[1]
    backend = int8dot.select_backend()
    kernels = {True: backend.kernels("q4_0", 32, SCALE_FP16), False: backend.kernels("int4", 32, SCALE_FP16)}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, hidden)).astype(np.float32)

    def call(in_place: bool, layer: dict, index: np.ndarray) -> np.ndarray:
        token, _, seg, expert = group_by_expert(index, experts)
        k = kernels[in_place]
        if in_place:
            gate, up, down = layer["raw"]
            w13 = s13 = (gate, up)
            w2 = s2 = down
        else:
            (gw, gs), (uw, us), (w2, s2) = layer["rep"]
            w13, s13 = (gw, uw), (gs, us)
        h = np.empty((len(token), inter), np.float32)
        k.gate_up(k.activations(x), token, seg, expert, w13, s13, 32, h)
        y = np.empty((len(token), hidden), np.float32)
        k.down(k.activations(h), seg, expert, w2, s2, 32, y)
        return y

    def route() -> np.ndarray:
        return np.sort(rng.permutation(experts)[:TOP_K])[None].astype(np.int64)

    for layer in layers:  # warm up (the pages in, the kernels compiled), and the same bits
        index = route()
        if not np.array_equal(call(True, layer, index), call(False, layer, index)):
            raise SystemExit("in place and repacked differ")
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(REPEATS):
        for in_place in (True, False):
            for _ in range(RUN):
                layer, index = layers[rng.integers(len(layers))], route()
                start = time.perf_counter()
                call(in_place, layer, index)
                times[in_place].append(time.perf_counter() - start)
    nbytes = TOP_K * 3 * inter * hidden // 32 * 18
    for in_place, name in ((True, "in place"), (False, "repacked")):
        median = float(np.median(times[in_place]))
        print(f"{name}: median {median * 1e3:.3f} ms a call, {nbytes / median / 1e9:.1f} GB/s of expert bytes")


if __name__ == "__main__":
    main()
