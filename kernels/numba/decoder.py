"""A CPU decode step in one call (`step`), from the first decoder layer to the logits: in each layer the residual
add and input norm, the absorbed latent attention (`latent.decode`), the residual add and post-attention norm, then
the dense MLP or the MoE block (`moe.block`); then the final norm and lm_head. A step makes one call where it made
four a layer from Python, each slow once the streamed weights have evicted the interpreter's code and data from the
caches: the same kernels in the same order, the same bits.

The weights of a kind of part come in one typed list a layer (`numba.typed.List`, bound once: Numba takes it in
a call without typing its items again, where a tuple of tuples costs 60 us a call), the `Simd` tokens of each
linear once for all layers of a call (so they must use the same formats; `OneCallLayers` in `engine/runner.py` makes a
call per run of layers that do)."""

from __future__ import annotations

import numpy as np
from hetero_moe.kernels.numba.int8dot import apply_experts, apply_linear
from hetero_moe.kernels.numba.latent import decode
from hetero_moe.kernels.numba.moe import block
from hetero_moe.kernels.numba.norm import add_rms_norm, rms_norm
from numba import njit

DENSE = 0  # a layer's MLP: one gated MLP every token goes to
MOE = 1  # a MoE block: its router, routed experts and shared experts


@njit(nogil=True, cache=True)
def step(
    h, cos, sin, layout, new_rows, rows, ends, threads, kinds, norms, caches,
    stack_simd, q_simd, uk_simd, uv_simd, o_simd, attention,
    dense_simd13, dense_simd2, dense, routed_simd13, routed_simd2, shared_simd13, shared_simd2, blocks, used,
    sample_rows, final_norm, final_eps, head_simd, head,
):  # fmt: skip
    """The residual stream `h [T, H]` float32 of T decode tokens (token t of sequence t) through the decoder layers, on
    `threads` threads (`numba.get_num_threads()`). Layer i: `kinds[i]` (DENSE or MOE), `norms[i] = (input norm weight,
    eps, post-attention norm weight, eps)`, `caches[i] = (latent, pe)` its cache rows, `attention[i]` `latent.decode`'s
    arguments from `stack` to `scaling` less the `Simd` tokens (`*_simd`, shared by all layers); the cache rows
    `new_rows`, `rows`, `ends` and rotary tables `cos`, `sin` as `decode` takes them. The j-th DENSE layer's MLP:
    `dense[j]` (`int8dot.apply_experts`' weights, with `dense_simd13`, `dense_simd2`); the j-th MOE layer's block:
    `blocks[j] = (router_w, bias, routing, top_k, routed, shared)` as `moe.block` takes them, with the `Simd` tokens
    `routed_simd*` and `shared_simd*` (shared None: none). `used[i]`: the number of routed experts a MOE layer used.
    Then the final norm (`final_norm`, `final_eps`) and lm_head (`head_simd`, `head`: `int8dot.apply_linear`'s) of the
    rows `sample_rows` -> their float32 logits; with `head` None (and the other three), the layers only -> the residual
    stream after the last (the layers of a model whose formats change from layer to layer go in several calls)."""
    t = h.shape[0]
    delta = np.empty_like(h)
    d = m = 0
    for i in range(kinds.shape[0]):
        w_in, eps_in, w_post, eps_post = norms[i]
        if i == 0:
            x = rms_norm(h, w_in, eps_in)
        else:
            h, x = add_rms_norm(h, delta, w_in, eps_in)
        latent, pe = caches[i]
        stack, low_rank, kv_norm, kv_eps, uk, uv, o_proj, heads, nope, scaling = attention[i]
        a = decode(
            x, cos, sin, layout, latent, pe, new_rows, rows, ends, threads, stack_simd, stack, q_simd, low_rank,
            kv_norm, kv_eps, uk_simd, uk, uv_simd, uv, o_simd, o_proj, heads, nope, scaling,
        )  # fmt: skip
        h, x = add_rms_norm(h, a, w_post, eps_post)
        delta = np.empty_like(h)
        if kinds[i] == DENSE:
            mlp = dense[d]
            d += 1
            h_rows, y_rows = np.empty((t, mlp[9]), np.float32), np.empty_like(h)
            zero, one = np.zeros((t, 1), np.int64), np.ones((t, 1), np.float32)  # expert 0, weight 1
            apply_experts(dense_simd13, dense_simd2, mlp, x, zero, one, delta, h_rows, y_rows, threads)
        else:
            router_w, bias, routing, top_k, routed, shared = blocks[m]
            m += 1
            h_rows = np.empty((t * top_k, routed[9]), np.float32)
            y_rows = np.empty((t * top_k, h.shape[1]), np.float32)
            used[i] = block(
                x, h_rows, y_rows, delta, threads, router_w, bias, routing, top_k,
                routed_simd13, routed_simd2, routed, shared_simd13, shared_simd2, shared,
            )  # fmt: skip
    h = h + delta
    if head is None:  # layers before the last run's (`OneCallLayers`): the residual stream goes on to the next call
        return h
    return apply_linear(head_simd, head, rms_norm(h[sample_rows], final_norm, final_eps), threads)
