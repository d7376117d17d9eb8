"""The absorbed latent attention's CPU decode preparation (`kernels/numba/latent.py`) against plain float64
references, and its rotary layouts against the torch `Rope`s the per-op path applies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hetero_moe.kernels.numba import latent

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
    outs = []
    for groups in (1, 2, 3):
        out = np.empty((heads, r), np.float32)
        latent.attend(q_latent.numpy(), q_pe.numpy(), cache_latent.numpy(), cache_pe.numpy(), rows.numpy(),
                      scaling, groups, out)  # fmt: skip
        outs.append(out)
        torch.testing.assert_close(torch.from_numpy(out).double(), want, rtol=1e-5, atol=1e-6)
    assert all(np.array_equal(outs[0], o) for o in outs[1:]), "a head's result depends on the thread groups"
