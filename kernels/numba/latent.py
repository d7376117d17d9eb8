"""Absorbed latent attention (DeepSeek's MLA) for decode tokens on the CPU, float32, in Numba: the small steps
between the quantized projections (`int8dot.py`) in one call instead of dozens of small torch operations.
`prepare`, per token: the latent's RMSNorm and the rotary key into the cache rows, and the query split per
head, its nope part in the row order the per-head W_UK kernel takes, its rope part rotated. `attend`, per
token and group of heads: their scores against its sequence's cache rows, the softmax, and the latent rows
weighted by it, each cache row read once for all of them. `absorbed_heads`: each token's W_UK, `attend` and W_UV,
a group of heads a parallel task. `decode`: a layer's attention for its decode tokens in one call, from the
projections of its input to o_proj.

Rotary layouts (`ROPE_*`), `cos` and `sin` holding one value per pair: `ROPE_PAIRS` (DeepSeek-V2: adjacent
pairs rotated in place), `ROPE_PAIRS_TO_HALVES` (DeepSeek-V3 interleaved: adjacent pairs in, the rotated
first elements then the rotated second ones out), `ROPE_HALVES` (the Llama layout: element i pairs with
i + d / 2). A token's result does not depend on the tokens batched with it; the rounding is close to, not
the same as, the per-op torch path's.
"""

from __future__ import annotations

import numpy as np
from hetero_moe.kernels.numba.int8dot import apply_linear, check_matrices, matrix_rows
from hetero_moe.kernels.numba.norm import rms_norm, rms_norm_row
from numba import njit, prange

ROPE_PAIRS = 0
ROPE_PAIRS_TO_HALVES = 1
ROPE_HALVES = 2


@njit(inline="always", cache=True)
def _rotate(x, cos, sin, layout: int, out) -> None:
    """`x [d]` rotated into `out [d]`; `cos`, `sin` `[d / 2]`."""
    half = cos.shape[0]
    for i in range(half):
        if layout == ROPE_HALVES:
            a, b = x[i], x[half + i]
        else:
            a, b = x[2 * i], x[2 * i + 1]
        first = a * cos[i] - b * sin[i]
        second = b * cos[i] + a * sin[i]
        if layout == ROPE_PAIRS:
            out[2 * i], out[2 * i + 1] = first, second
        else:
            out[i], out[half + i] = first, second


@njit(nogil=True, cache=True)  # no fast math: a row's norm and rotation the same bits however many rows (`norm.py`)
def prepare(q, kv, heads, nope, norm_w, eps, cos, sin, layout, latent, pe, new_rows, q_nope, q_pe) -> None:
    """Decode tokens t < T: `q [T, heads * (nope + rope)]` and `kv [T, r + rope]` from the projections;
    `norm_w [r]` and `eps` the latent's RMSNorm; `cos`, `sin` `[T, rope / 2]` at each token's position.
    Writes `latent[new_rows[t]]` (normalised) and `pe[new_rows[t]]` (rotated), `q_nope [heads * T, nope]`
    (head-major: row `j * T + t`) and `q_pe [T, heads, rope]` (rotated)."""
    t_count, r = kv.shape[0], latent.shape[1]
    rope = pe.shape[1]
    width = nope + rope
    for t in range(t_count):
        row = new_rows[t]
        rms_norm_row(kv[t, :r], norm_w, eps, latent[row])
        _rotate(kv[t, r:], cos[t], sin[t], layout, pe[row])
        for j in range(heads):
            q_nope[j * t_count + t] = q[t, j * width : j * width + nope]
            _rotate(q[t, j * width + nope : (j + 1) * width], cos[t], sin[t], layout, q_pe[t, j])


BLOCK = 4  # cache rows `attend` takes at a time: each head's query is loaded once for all of them


@njit(inline="always", fastmath=True, cache=True)
def _dots(cache, r0, r1, r2, r3, q):
    """The dot products of `q [d]` with the cache rows r0..r3 of `cache [R, d]`."""
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for c in range(q.shape[0]):
        s0 += cache[r0, c] * q[c]
        s1 += cache[r1, c] * q[c]
        s2 += cache[r2, c] * q[c]
        s3 += cache[r3, c] * q[c]
    return s0, s1, s2, s3


@njit(inline="always", fastmath=True, cache=True)
def _scores(q_latent, q_pe, latent, pe, rows, i, j, scores) -> None:
    """Head j's scores against the cache rows `rows[i : i + BLOCK]`."""
    r0, r1, r2, r3 = rows[i], rows[i + 1], rows[i + 2], rows[i + 3]
    a0, a1, a2, a3 = _dots(latent, r0, r1, r2, r3, q_latent[j])
    b0, b1, b2, b3 = _dots(pe, r0, r1, r2, r3, q_pe[j])
    scores[j, i], scores[j, i + 1], scores[j, i + 2], scores[j, i + 3] = a0 + b0, a1 + b1, a2 + b2, a3 + b3


@njit(nogil=True, cache=True)
def padded(rows):
    """A sequence's cache rows `rows [L]` padded to whole blocks of BLOCK, its last row repeated, as `attend`
    takes them."""
    length = rows.shape[0]
    out = np.empty(-(-length // BLOCK) * BLOCK, np.int64)
    out[:length] = rows
    out[length:] = rows[length - 1]
    return out


@njit(nogil=True, fastmath=True, cache=True)
def attend(q_latent, q_pe, latent, pe, rows, length, scaling, first, last, scores, out) -> None:
    """A decode token's absorbed attention for heads `first .. last - 1`, float32, on one thread: `q_latent [h, r]`
    and `q_pe [h, rope]` (rotated) over its sequence's cache rows `rows[:length]` of `latent [R, r]` and `pe [R,
    rope]` (`rows` `padded`) -> `out [h, r]`, the latent rows weighted by `softmax(scaling * (latent q_latent + pe
    q_pe))` per head; `scores [h, len(rows)]` their scratch. Each cache row is read once for all the heads, and a
    head's result does not depend on which others go with it."""
    n = rows.shape[0]
    for i in range(0, n, BLOCK):
        for j in range(first, last):
            _scores(q_latent, q_pe, latent, pe, rows, i, j, scores)
    for j in range(first, last):
        top = scores[j, 0]
        for i in range(1, length):
            top = max(top, scores[j, i])
        total = np.float32(0.0)
        for i in range(n):
            scores[j, i] = np.exp((scores[j, i] - top) * scaling) if i < length else np.float32(0.0)
            total += scores[j, i]
        inv = np.float32(1.0) / total
        for i in range(n):
            scores[j, i] *= inv
        out[j] = 0.0
    for i in range(0, n, BLOCK):
        r0, r1, r2, r3 = rows[i], rows[i + 1], rows[i + 2], rows[i + 3]
        for j in range(first, last):
            p0, p1, p2, p3 = scores[j, i], scores[j, i + 1], scores[j, i + 2], scores[j, i + 3]
            for c in range(latent.shape[1]):
                out[j, c] += p0 * latent[r0, c] + p1 * latent[r1, c] + p2 * latent[r2, c] + p3 * latent[r3, c]


@njit(nogil=True, parallel=True, cache=True)  # no fast math: W_UK's and W_UV's rows the bits of `apply_linear`'s
def absorbed_heads(uk_simd, uk, uv_simd, uv, q_nope, q_pe, latent, pe, rows, ends, scaling, groups, v) -> None:
    """Decode tokens t < T from their queries to their values, in one parallel region over each token's heads in
    `groups` groups: W_UK (`uk_simd`, `uk`: `int8dot.matrix_rows`' matrices, one a head) of `q_nope [heads * T,
    nope]` (head-major), `attend` of the result and `q_pe [T, heads, rope]` over the token's cache rows
    `rows[ends[t - 1] : ends[t]]`, then W_UV (`uv`) into `v [T, heads, v]`: the bits of the three called one after
    another, in a third of the regions (each a V2-Lite layer's 16-20 us beyond its bytes)."""
    t_count, head_count = q_pe.shape[0], q_pe.shape[1]
    r = latent.shape[1]
    check_matrices(uk_simd, uk, q_nope)
    check_matrices(uv_simd, uv, np.zeros((1, r), np.float32))
    for task in prange(t_count * groups):
        t, group = task // groups, task % groups
        first, last = group * head_count // groups, (group + 1) * head_count // groups
        start = 0 if t == 0 else ends[t - 1]
        seq_rows = padded(rows[start : ends[t]])
        q_latent = np.empty((head_count, r), np.float32)
        out = np.empty((head_count, r), np.float32)
        scores = np.empty((head_count, seq_rows.shape[0]), np.float32)
        for j in range(first, last):
            matrix_rows(uk_simd, uk, j, q_nope[j * t_count + t : j * t_count + t + 1], q_latent[j : j + 1])
        length = ends[t] - start
        attend(q_latent, q_pe[t], latent, pe, seq_rows, length, np.float32(scaling), first, last, scores, out)
        for j in range(first, last):
            matrix_rows(uv_simd, uv, j, out[j : j + 1], v[t, j : j + 1])


@njit(nogil=True, cache=True)
def decode(
    x, cos, sin, layout, latent, pe, new_rows, rows, ends, threads,
    stack_simd, stack, q_simd, low_rank, kv_norm, kv_eps, uk_simd, uk, uv_simd, uv, o_simd, o_proj,
    heads, nope, scaling,
):  # fmt: skip
    """Decode tokens `x [T, H]` float32 (token t of sequence t) through absorbed latent attention -> `[T, H]`, on
    `threads` threads (`numba.get_num_threads()`, which jitted code cannot cache). The linears are
    `int8dot.apply_linear`'s (a `Simd` and a tuple each): the projections `stack` (the query's, or its low-rank
    one, then the latent's and the rotary key's, stacked), with a low-rank query `low_rank = (rank, norm weight,
    eps, q_b_proj)` (else None, and `q_simd` too); `prepare` with the latent's norm `kv_norm`, `kv_eps` and the
    rotary tables `cos`, `sin` `[T, rope / 2]`, into cache rows `new_rows [T]` of `latent` and `pe`;
    `absorbed_heads` (W_UK `uk`, one matrix a head; `attend` over token t's rows `rows[ends[t - 1] : ends[t]]`;
    W_UV `uv`) in a group of heads a thread; `o_proj`. One call a layer where there were a dozen from Python,
    each slow once the streamed weights have evicted the interpreter's code and data from the caches: the same
    kernels in the same order, the same bits."""
    t, rope = x.shape[0], pe.shape[1]
    y = apply_linear(stack_simd, stack, np.ascontiguousarray(x), threads)
    if low_rank is None:
        split = heads * (nope + rope)
        q = y[:, :split]
    else:
        split, q_norm, q_eps, q_b = low_rank
        q = apply_linear(q_simd, q_b, rms_norm(y[:, :split], q_norm, q_eps), threads)
    q_nope = np.empty((heads * t, nope), np.float32)
    q_pe = np.empty((t, heads, rope), np.float32)
    prepare(q, y[:, split:], heads, nope, kv_norm, kv_eps, cos, sin, layout, latent, pe, new_rows, q_nope, q_pe)
    v = np.empty((t, heads, uv[2].shape[1]), np.float32)
    absorbed_heads(uk_simd, uk, uv_simd, uv, q_nope, q_pe, latent, pe, rows, ends, scaling, threads, v)
    return apply_linear(o_simd, o_proj, v.reshape(t, -1), threads)
