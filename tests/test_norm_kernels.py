"""The CPU decode lane's RMSNorm and residual add (`kernels/numba/norm.py`) against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hetero_moe.kernels.numba import norm


def reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("t", [1, 3])
def test_add_rms_norm_sums_then_normalises_each_row(t: int) -> None:
    g = torch.Generator().manual_seed(0)
    h, delta = torch.randn(t, 37, generator=g) * 3, torch.randn(t, 37, generator=g)
    w, eps = torch.rand(37, generator=g) + 0.5, 1e-6
    total, normed = norm.add_rms_norm(h.numpy(), delta.numpy(), w.numpy(), eps)
    assert np.array_equal(total, (h + delta).numpy())  # one float32 add: the same bits as torch's
    torch.testing.assert_close(torch.from_numpy(normed).double(), reference(h + delta, w, eps), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(norm.rms_norm(h.numpy(), w.numpy(), eps)).double(),
                               reference(h, w, eps), rtol=1e-5, atol=1e-6)  # fmt: skip
    alone = norm.add_rms_norm(h[-1:].numpy(), delta[-1:].numpy(), w.numpy(), eps)[1]
    assert np.array_equal(alone[0], normed[-1]), "a row's norm depends on the rows beside it"


def test_a_rows_norm_does_not_depend_on_the_rows_beside_it() -> None:
    """Many draws, of one to five rows, strided and not: each row's bits are those it has alone (under fast math a
    loop over rows once rounded its first row differently when it had three)."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        n, rows = int(rng.integers(8, 80)), int(rng.integers(2, 6))
        wide = (rng.standard_normal((rows, n + 24)) * rng.uniform(0.1, 10)).astype(np.float32)
        x, delta = wide[:, 5 : 5 + n], rng.standard_normal((rows, n)).astype(np.float32)
        w = (rng.random(n) + 0.5).astype(np.float32)
        together, (_, summed) = norm.rms_norm(x, w, 1e-6), norm.add_rms_norm(x, delta, w, 1e-6)
        for t in range(rows):
            assert np.array_equal(norm.rms_norm(x[t : t + 1], w, 1e-6)[0], together[t]), (trial, t)
            assert np.array_equal(norm.add_rms_norm(x[t : t + 1], delta[t : t + 1], w, 1e-6)[1][0], summed[t])
