"""A MoE block's tokens on the CPU in one call (`block`): the router's choice (`router.select`), the routed experts
(`int8dot.experts`) and the shared experts, one expert every token goes to with weight 1 (the same kernel), added
to them. A decode step makes one call a layer where it made several from Python, each slow once the streamed
weights have evicted the interpreter's code and data from the caches: the same kernels in the same order, the same
bits."""

from __future__ import annotations

import numpy as np
from hetero_moe.kernels.numba.int8dot import apply_experts
from hetero_moe.kernels.numba.router import select
from numba import njit


@njit(nogil=True, cache=True)
def block(
    x, h_rows, shared_h_rows, y_rows, out, threads,
    router_w, bias, routing, top_k, simd13, simd2, routed, shared_simd13, shared_simd2, shared,
) -> int:  # fmt: skip
    """`x [T, H]` float32 -> `out [T, H]`, on `threads` threads (`numba.get_num_threads()`): each token routed by
    `router_w [E, H]`, `bias [E]` and `routing` (`select`'s arguments from `scoring` to `scaling`) to `top_k`
    experts, run with `simd13`, `simd2`, `routed` (`int8dot.apply_experts`'s weights), plus the shared experts of
    `shared_simd13`, `shared_simd2`, `shared` (likewise; None: none). `h_rows [>= T top_k, I]`,
    `shared_h_rows [>= T, I shared]` and `y_rows [>= T top_k, H]` float32: room as `int8dot.experts` takes it
    (`int8dot.scratch`). Returns the number of routed experts used."""
    t = x.shape[0]
    weights = np.empty((t, top_k), np.float32)
    index = np.empty((t, top_k), np.int64)
    scoring, num_group, topk_group, group_score, renorm, eps, scaling = routing
    select(x, router_w, bias, scoring, num_group, topk_group, group_score, renorm, eps, scaling, weights, index)
    used = apply_experts(simd13, simd2, routed, x, index, weights, out, h_rows, y_rows, threads)
    if shared is not None:
        y = np.empty_like(out)
        zero, one = np.zeros((t, 1), np.int64), np.ones((t, 1), np.float32)
        apply_experts(shared_simd13, shared_simd2, shared, x, zero, one, y, shared_h_rows, y_rows, threads)
        out += y
    return used
