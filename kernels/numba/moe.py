"""A MoE block's tokens on the CPU in one call (`block`): the router's choice (`router.select`), the routed experts
and the shared experts, one expert every token goes to with weight 1, added to them, in the same two parallel
regions (`int8dot.experts_shared`). A decode step makes one call a layer where it made several from Python, each
slow once the streamed weights have evicted the interpreter's code and data from the caches: the same kernels in the
same order, the same bits."""

from __future__ import annotations

import numpy as np
from hetero_moe.kernels.numba.int8dot import TASKS_PER_THREAD, apply_experts, experts_shared
from hetero_moe.kernels.numba.router import select
from numba import njit


@njit(nogil=True, cache=True)
def block(
    x, h_rows, y_rows, out, threads,
    router_w, bias, routing, top_k, simd13, simd2, routed, shared_simd13, shared_simd2, shared,
) -> int:  # fmt: skip
    """`x [T, H]` float32 -> `out [T, H]`, on `threads` threads (`numba.get_num_threads()`): each token routed by
    `router_w [E, H]`, `bias [E]` and `routing` (`select`'s arguments from `scoring` to `scaling`) to `top_k`
    experts, run with `simd13`, `simd2`, `routed` (`int8dot.apply_experts`'s weights), plus the shared experts of
    `shared_simd13`, `shared_simd2`, `shared` (likewise; None: none) in the same parallel regions
    (`int8dot.experts_shared`). `h_rows [>= T top_k, I]` and `y_rows [>= T top_k, H]` float32: room as
    `int8dot.experts` takes it (`int8dot.scratch`). Returns the number of routed experts used."""
    t = x.shape[0]
    weights = np.empty((t, top_k), np.float32)
    index = np.empty((t, top_k), np.int64)
    scoring, num_group, topk_group, group_score, renorm, eps, scaling = routing
    select(x, router_w, bias, scoring, num_group, topk_group, group_score, renorm, eps, scaling, weights, index)
    if shared is None:
        return apply_experts(simd13, simd2, routed, x, index, weights, out, h_rows, y_rows, threads)
    both = (simd13, simd2, routed, shared_simd13, shared_simd2, shared)
    return experts_shared(*both, x, index, weights, TASKS_PER_THREAD * threads, out, h_rows, y_rows)
