"""A MoE layer's router in Numba: the logits of each token against every expert's row, then its scores, the
experts it goes to and their weights, for CPU MoE blocks whose experts run on the quantized kernels (where a
decode step's half-dozen small torch operations, each slow once the streamed weights have evicted the caches,
took longer than the logits themselves).

Each token on its own, in one fixed order, so a token's route does not depend on the tokens batched with it.
Its logits are rounded differently from torch's linear (close to, not the same bits), so near ties may choose
another expert than the torch routers would: this runs only beside quantized experts, never under rules that
promise transformers' bits. Ties choose the lower expert index; the chosen experts come in descending order of
their choice score.
"""

from __future__ import annotations

import math

import numpy as np
from hetero_moe.kernels.numba.common import dot
from numba import njit, prange

SOFTMAX = 0  # scores = softmax of the logits
SIGMOID = 1  # scores = sigmoid of each logit
GROUP_MAX = 0  # a group's score: its best expert's (DeepSeek-V2's group_limited_greedy)
GROUP_TOP2 = 1  # a group's score: the sum of its best two (DeepSeek-V3)


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def logits(x, w, out) -> None:
    """`out[t, e] = x[t] . w[e]` for `x [T, H]`, `w [E, H]` float32, every pair summed the same way (`dot`'s
    vector lanes: `fastmath` here too, as an inlined function takes its caller's flags; without it the sum was
    one chain of additions: a V2-Lite layer's router took 34 us from cache and 37 us from DRAM, now 6 and 13)."""
    for e in prange(w.shape[0]):
        for t in range(x.shape[0]):
            out[t, e] = dot(w[e], x[t])


@njit(inline="always", cache=True)
def _best(values, taken) -> int:
    """Index of the largest of `values` not yet `taken` (the lower index on ties; -inf counts, NaN never wins)."""
    best = -1
    for e in range(values.shape[0]):
        if not taken[e] and (best < 0 or values[e] > values[best]):
            best = e
    return best


@njit(nogil=True, cache=True)
def route(logits, bias, scoring, num_group, topk_group, group_score, renorm, eps, scaling, weights, index) -> None:
    """Per token of `logits [T, E]`: scores (SOFTMAX or SIGMOID); choice = scores + `bias [E]`; when `topk_group`
    < `num_group`, only the experts of the `topk_group` best groups (each scored GROUP_MAX or GROUP_TOP2 on the
    choice) stay candidates; `index[t]` = the top `k` of the choice (k = `index.shape[1]`), `weights[t]` = their
    scores, divided by their sum + `eps` when `renorm`, times `scaling`."""
    t_count, e_count = logits.shape
    k = index.shape[1]
    per_group = e_count // num_group
    scores = np.empty(e_count, np.float32)
    choice = np.empty(e_count, np.float32)
    taken = np.zeros(e_count, np.bool_)
    groups = np.empty(num_group, np.float32)
    group_taken = np.zeros(num_group, np.bool_)
    for t in range(t_count):
        row = logits[t]
        if scoring == SOFTMAX:
            top = row.max()
            total = np.float32(0.0)
            for e in range(e_count):
                scores[e] = np.float32(math.exp(row[e] - top))
                total += scores[e]
            for e in range(e_count):
                scores[e] = scores[e] / total
        else:
            for e in range(e_count):
                scores[e] = np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-row[e])))
        for e in range(e_count):
            choice[e] = scores[e] + bias[e]
        if topk_group < num_group:
            for g in range(num_group):
                part = choice[g * per_group : (g + 1) * per_group]
                first, second = -np.inf, -np.inf
                for v in part:
                    if v > first:
                        first, second = v, first
                    elif v > second:
                        second = v
                groups[g] = first if group_score == GROUP_MAX else first + second
            group_taken[:] = False
            for _ in range(topk_group):
                group_taken[_best(groups, group_taken)] = True
            for g in range(num_group):
                if not group_taken[g]:
                    choice[g * per_group : (g + 1) * per_group] = -np.inf
        taken[:] = False
        total = np.float32(0.0)
        for j in range(k):
            e = _best(choice, taken)
            taken[e] = True
            index[t, j] = e
            weights[t, j] = scores[e]
            total += scores[e]
        for j in range(k):
            if renorm:
                weights[t, j] = weights[t, j] / (total + np.float32(eps))
            weights[t, j] = weights[t, j] * np.float32(scaling)


@njit(nogil=True, cache=True)
def select(x, w, bias, scoring, num_group, topk_group, group_score, renorm, eps, scaling, weights, index) -> None:
    """`logits` then `route`, in one call (a decode step makes one a layer): `x [T, H]`, `w [E, H]` float32;
    the rest as `route` takes them."""
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    logits(x, w, out)
    route(out, bias, scoring, num_group, topk_group, group_score, renorm, eps, scaling, weights, index)
