"""The absorbed latent attention's CPU decode preparation (`kernels/numba/latent.py`) against plain float64
references, and its rotary layouts against the torch `Rope`s the per-op path applies; `decode`, a layer's attention
in one call, against the same kernels called one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hetero_moe.kernels.numba import latent, norm
from hetero_moe.kernels.numba.simd import choose_isa

from hetero_moe.ops.cpu_linear import ROWS_PER_TASK, CPUQuantKwargs, HeadLinear, QuantMatrix
from hetero_moe.ops.rope import ComplexRope, HalfRope, InterleavedRope


def tables(t: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[1, T, d]` whose halves repeat, as the rotary modules make them."""
    angles = torch.rand(1, t, d // 2, generator=torch.Generator().manual_seed(seed)) * 6.0
    return torch.cat((angles.cos(), angles.cos()), -1), torch.cat((angles.sin(), angles.sin()), -1)


def ropes(t: int, d: int) -> list:
    cos, sin = tables(t, d)
    half = d // 2
    return [
        ComplexRope(torch.polar(torch.ones(1, t, half), torch.atan2(sin[..., :half], cos[..., :half]))),
        InterleavedRope(cos, sin),
        HalfRope(cos, sin),
    ]


@pytest.mark.parametrize("rope", range(3), ids=["pairs", "pairs-to-halves", "halves"])
@pytest.mark.parametrize("t", [1, 3])
def test_prepare_normalises_rotates_and_splits_as_the_per_op_path(rope: int, t: int) -> None:
    g = torch.Generator().manual_seed(1)
    heads, nope, rope_dim, r, cap = 3, 8, 6, 20, 12
    q = torch.randn(t, heads * (nope + rope_dim), generator=g)
    kv = torch.randn(t, r + rope_dim, generator=g)
    w, eps = torch.rand(r, generator=g) + 0.5, 1e-6
    rot = ropes(t, rope_dim)[rope]
    layout, cos, sin = rot.pairs
    cache_latent, cache_pe = np.zeros((cap, r), np.float32), np.zeros((cap, rope_dim), np.float32)
    new_rows = np.array([7, 2, 10][:t], np.int64)
    q_nope = np.empty((heads * t, nope), np.float32)
    q_pe = np.empty((t, heads, rope_dim), np.float32)
    latent.prepare(q.numpy(), kv.numpy(), heads, nope, w.numpy(), eps, cos, sin, layout,
                   cache_latent, cache_pe, new_rows, q_nope, q_pe)  # fmt: skip
    x = kv[:, :r].double()
    normed = w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    torch.testing.assert_close(torch.from_numpy(cache_latent[new_rows]).double(), normed, rtol=1e-5, atol=1e-6)
    k_pe = rot.apply(kv[:, r:].view(1, 1, t, rope_dim))[0, 0]
    torch.testing.assert_close(torch.from_numpy(cache_pe[new_rows]), k_pe, rtol=1e-5, atol=1e-6)
    qh = q.view(t, heads, nope + rope_dim)
    torch.testing.assert_close(torch.from_numpy(q_nope), qh[..., :nope].transpose(0, 1).reshape(heads * t, nope))
    want = rot.apply(qh[..., nope:].transpose(0, 1)[None])[0].transpose(0, 1)  # [T, h, rope]
    torch.testing.assert_close(torch.from_numpy(q_pe), want, rtol=1e-5, atol=1e-6)


def prepared(y: np.ndarray, w: np.ndarray, cos: np.ndarray, sin: np.ndarray, heads: int, nope: int):
    """`latent.prepare` of the tokens `y [T, heads * (nope + rope) + r + rope]` -> their cache rows (latent,
    rotary part) and queries (nope part `[T, heads, nope]`, rotary part), token by token."""
    t, rope_dim = y.shape[0], 2 * cos.shape[1]
    width = heads * (nope + rope_dim)
    r = y.shape[1] - width - rope_dim
    cache_latent, cache_pe = np.zeros((t, r), np.float32), np.zeros((t, rope_dim), np.float32)
    q_nope, q_pe = np.empty((heads * t, nope), np.float32), np.empty((t, heads, rope_dim), np.float32)
    latent.prepare(y[:, :width], y[:, width:], heads, nope, w, 1e-6, cos, sin, 0,
                   cache_latent, cache_pe, np.arange(t, dtype=np.int64), q_nope, q_pe)  # fmt: skip
    return cache_latent, cache_pe, q_nope.reshape(heads, t, nope).transpose(1, 0, 2), q_pe


def test_prepare_gives_a_token_the_bits_it_has_alone() -> None:
    """Decode tokens prepared together get the cache rows and queries each gets alone (the latent's norm once
    rounded the first of three tokens differently: a tiny DeepSeek-V2's batched decode left its answer alone's)."""
    rng = np.random.default_rng(0)
    heads, nope, rope_dim, r = 4, 8, 4, 20
    for trial in range(100):
        t = int(rng.integers(2, 6))
        y = rng.standard_normal((t, heads * (nope + rope_dim) + r + rope_dim)) * rng.uniform(0.1, 10)
        y = y.astype(np.float32)
        w = rng.standard_normal(r).astype(np.float32)
        cos, sin = (rng.standard_normal((t, rope_dim // 2)).astype(np.float32) for _ in range(2))
        together = prepared(y, w, cos, sin, heads, nope)
        for i in range(t):
            alone = prepared(np.ascontiguousarray(y[i : i + 1]), w, cos[i : i + 1], sin[i : i + 1], heads, nope)
            for a, b in zip(alone, together, strict=True):
                assert np.array_equal(a[0], b[i]), trial


@pytest.mark.parametrize("length", [1, 3, 17])
def test_attend_weights_the_cache_rows_by_each_heads_softmax(length: int) -> None:
    g = torch.Generator().manual_seed(2)
    heads, r, rope_dim, cap, scaling = 5, 24, 6, 40, 0.3
    q_latent, q_pe = torch.randn(heads, r, generator=g), torch.randn(heads, rope_dim, generator=g)
    cache_latent, cache_pe = torch.randn(cap, r, generator=g), torch.randn(cap, rope_dim, generator=g)
    rows = torch.randperm(cap, generator=g)[:length]  # a paged sequence's rows, in no order
    scores = (cache_latent[rows].double() @ q_latent.double().T + cache_pe[rows].double() @ q_pe.double().T).T
    want = torch.softmax(scores * scaling, dim=-1) @ cache_latent[rows].double()  # [h, r]
    padded = latent.padded(rows.numpy())
    outs = []
    for groups in (1, 2, 3):  # the heads in groups, as threads take them
        out = np.empty((heads, r), np.float32)
        scores = np.empty((heads, len(padded)), np.float32)
        for k in range(groups):
            latent.attend(q_latent.numpy(), q_pe.numpy(), cache_latent.numpy(), cache_pe.numpy(), padded, length,
                          np.float32(scaling), k * heads // groups, (k + 1) * heads // groups, scores, out)  # fmt: skip
        outs.append(out)
        torch.testing.assert_close(torch.from_numpy(out).double(), want, rtol=1e-5, atol=1e-6)
    assert all(np.array_equal(outs[0], o) for o in outs[1:]), "a head's result depends on its group"


def quantized(out_dim: int, in_dim: int, seed: int) -> QuantMatrix:
    m = QuantMatrix(out_dim, in_dim, CPUQuantKwargs())
    m.store(torch.randn(out_dim, in_dim, generator=torch.Generator().manual_seed(seed)) * 0.3)
    return m


def one_by_one(
    x, cos, sin, latent_rows, pe_rows, new_rows, seq_rows, stack, q_b, q_norm, kv_norm, uk, uv, o_proj, sizes
):
    """The absorbed decode of `x [T, H]` as `MLAAttention.decode` ran it before `latent.decode`: each kernel called
    from Python, all heads of a token at once."""
    heads, nope, rope_dim, scaling = sizes
    t, r = x.shape[0], latent_rows.shape[1]

    def linear(m, a):
        return m.kernels(None).linear_x(a, m.codes, m.scales, ROWS_PER_TASK)

    y = linear(stack, x)
    split = heads * (nope + rope_dim) if q_b is None else q_norm.shape[0]
    q = y[:, :split] if q_b is None else linear(q_b, norm.rms_norm(y[:, :split], q_norm, 1e-6))
    q_nope, q_pe = np.empty((heads * t, nope), np.float32), np.empty((t, heads, rope_dim), np.float32)
    latent.prepare(q, y[:, split:], heads, nope, kv_norm, 1e-6, cos, sin, latent.ROPE_PAIRS, latent_rows, pe_rows,
                   new_rows, q_nope, q_pe)  # fmt: skip
    # attend's fast-math sums are vectorized for the layouts it is compiled for: each token's query and output
    # contiguous, as `decode` passes them whatever T
    q_latent = np.ascontiguousarray(uk.rows(q_nope).reshape(heads, t, r).transpose(1, 0, 2))
    out = np.zeros((t, heads, r), np.float32)
    for i, rows in enumerate(seq_rows):
        scores = np.empty((heads, -(-len(rows) // latent.BLOCK) * latent.BLOCK), np.float32)
        latent.attend(q_latent[i], q_pe[i], latent_rows, pe_rows, latent.padded(rows), len(rows), np.float32(scaling),
                      0, heads, scores, out[i])  # fmt: skip
    heads_major = np.ascontiguousarray(out.transpose(1, 0, 2)).reshape(heads * t, -1)
    v = uv.rows(heads_major).reshape(heads, t, -1).transpose(1, 0, 2)
    return linear(o_proj, np.ascontiguousarray(v).reshape(t, -1))


@pytest.mark.skipif(choose_isa() == "float", reason="the integer kernels' bound arguments")
@pytest.mark.parametrize("low_rank", [False, True], ids=["query", "low-rank-query"])
@pytest.mark.parametrize("t", [1, 3])
def test_decode_is_its_kernels_called_one_by_one(low_rank: bool, t: int) -> None:
    """`decode` runs a layer's absorbed attention in one call: the bits, cache rows included, of the same kernels
    called one after another from Python, for one sequence's token or several sequences' at once."""
    g = torch.Generator().manual_seed(3)
    heads, nope, rope_dim, r, v_dim, hidden, rank, scaling = 4, 32, 16, 256, 32, 80, 48, 0.1
    q_width = rank if low_rank else heads * (nope + rope_dim)
    stack, o_proj = quantized(q_width + r + rope_dim, hidden, 1), quantized(hidden, heads * v_dim, 2)
    q_b = quantized(heads * (nope + rope_dim), rank, 3) if low_rank else None
    kw = CPUQuantKwargs()
    uk = HeadLinear.quantized(torch.randn(heads, r, nope, generator=g), kw, None)  # [h, r, nope]
    uv = HeadLinear.quantized(torch.randn(heads, v_dim, r, generator=g), kw, None)
    q_norm, kv_norm = (torch.rand(n, generator=g).numpy() + 0.5 for n in (rank, r))
    x = torch.randn(t, hidden, generator=g).numpy()
    cos, sin = (torch.randn(t, rope_dim // 2, generator=g).numpy() for _ in range(2))
    lengths = [5, 9, 3][:t]
    cap = sum(lengths)
    seq_rows = np.split(torch.randperm(cap, generator=g).numpy(), np.cumsum(lengths)[:-1])  # paged: in no order
    new_rows = np.array([rows[-1] for rows in seq_rows])
    caches = [(torch.randn(cap, r, generator=g).numpy(), torch.randn(cap, rope_dim, generator=g).numpy())]
    caches.append(tuple(c.copy() for c in caches[0]))
    want = one_by_one(x, cos, sin, *caches[0], new_rows, seq_rows, stack, q_b, q_norm, kv_norm, uk, uv, o_proj,
                      (heads, nope, rope_dim, scaling))  # fmt: skip

    def bound(m):
        return m.kernels(None).linear_args(m.codes, m.scales, ROWS_PER_TASK)

    q_simd, q_args = bound(q_b) if low_rank else (None, None)
    low = (rank, q_norm, 1e-6, q_args) if low_rank else None
    weights = (*bound(stack), q_simd, low, kv_norm, 1e-6, *uk.kernel_args(), *uv.kernel_args(), *bound(o_proj))
    rows, ends = np.concatenate(seq_rows), np.cumsum(lengths)
    got = latent.decode(x, cos, sin, latent.ROPE_PAIRS, *caches[1], new_rows, rows, ends, 2, *weights, heads, nope,
                        scaling)  # fmt: skip
    assert np.array_equal(got, want)
    assert all(np.array_equal(a, b) for a, b in zip(*caches, strict=True))
