"""The absorbed-MLA decode kernel against a float64 torch reference. Without a GPU it runs under
TRITON_INTERPRET=1, so sizes stay small apart from one case at DeepSeek's R=512, P=64."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")  # on a CPU-only machine conftest.py has chosen the interpreter

from hetero_moe.kernels.triton.mla_decode import choose_splits, mla_decode  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# Triton's CPU interpreter keeps bf16 as raw uint16 and its tl.dot multiplies those bits as integers
# (triton 3.9), so bf16 runs on a GPU only; fp16 covers the 16-bit path in the interpreter.
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE == "cpu", reason="interpreter's bf16 tl.dot")),
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def reference(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    latent: torch.Tensor,
    k_pe: torch.Tensor,
    row_start: list[int],
    row_len: list[int],
    scale: float,
) -> torch.Tensor:
    """Plain float64 attention, one query row at a time -> `[B, H, R]`."""
    outs = []
    for b, (start, n) in enumerate(zip(row_start, row_len, strict=True)):
        lat = latent[start : start + n].double().cpu()  # [n, R]
        pe = k_pe[start : start + n].double().cpu()  # [n, P]
        score = scale * (q_lat[b].double().cpu() @ lat.T + q_pe[b].double().cpu() @ pe.T)  # [H, n]
        outs.append(torch.softmax(score, dim=-1) @ lat)
    return torch.stack(outs)


def make(
    b: int, h: int, r: int, p: int, s: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random `q_lat [b, h, r]`, `q_pe [b, h, p]`, `latent [s, r]`, `k_pe [s, p]` on DEVICE in dtype."""
    g = torch.Generator().manual_seed(seed)
    tensors = (torch.randn(b, h, r, generator=g), torch.randn(b, h, p, generator=g))
    tensors += (torch.randn(s, r, generator=g), torch.randn(s, p, generator=g))
    return tuple(t.to(DEVICE, dtype) for t in tensors)


def rows(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def check(
    h: int,
    r: int,
    p: int,
    s: int,
    starts: list[int],
    lens: list[int],
    dtype: torch.dtype,
    splits: int | None = None,
) -> None:
    q_lat, q_pe, latent, k_pe = make(len(starts), h, r, p, s, dtype, seed=h * r + sum(lens))
    scale = (r + p) ** -0.5
    out = mla_decode(q_lat, q_pe, latent, k_pe, rows(starts), rows(lens), scale, splits)
    assert out.dtype == dtype and out.shape == (len(starts), h, r)
    assert rel(out.cpu(), reference(q_lat, q_pe, latent, k_pe, starts, lens, scale)) < TOL[dtype]


@pytest.mark.parametrize(
    ("h", "r", "p", "s", "starts", "lens"),
    [
        (1, 32, 16, 1, [0], [1]),  # one head, one cached token
        (4, 32, 16, 12, [5], [7]),  # a range ending at the cache's last row
        (4, 32, 16, 700, [0, 350, 300], [1, 300, 100]),  # three slots of a pool, the last two overlapping
        (16, 48, 24, 120, [100, 3, 0], [7, 100, 1]),  # R, P not powers of two
        (128, 32, 16, 9, [1, 0], [1, 7]),  # DeepSeek-V3's head count
        (16, 512, 64, 110, [3], [100]),  # DeepSeek-V2-Lite's sizes
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mla_decode_matches_reference(
    h: int, r: int, p: int, s: int, starts: list[int], lens: list[int], dtype: torch.dtype
) -> None:
    check(h, r, p, s, starts, lens, dtype)


@pytest.mark.parametrize("splits", [1, 3, 40])  # 40 splits: more than the 300-row range has 32-row tiles
def test_forced_splits_agree(splits: int) -> None:
    check(4, 32, 16, 400, [0, 90, 7], [300, 1, 100], torch.float32, splits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_tokens_of_one_sequence(dtype: torch.dtype) -> None:
    """Five new tokens of a sequence in slot 40.. of the cache, token i seeing the context and tokens 0..i."""
    context = 60
    check(4, 32, 16, 200, [40] * 5, [context + i + 1 for i in range(5)], dtype)


def test_cache_as_views_of_one_buffer() -> None:
    """The cache as `[S, R + P]` with latent and rope keys as column views, q_pe a slice of a wider query."""
    b, h, r, p, s = 2, 4, 32, 16, 50
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(s, r + p, generator=g).to(DEVICE)
    q = torch.randn(b, h, 48 + p, generator=g).to(DEVICE)  # [B, H, nope + P] with the rope part last
    q_lat = torch.randn(b, h, r, generator=g).to(DEVICE)
    latent, k_pe, q_pe = cache[:, :r], cache[:, r:], q[..., 48:]
    out = mla_decode(q_lat, q_pe, latent, k_pe, rows([3, 0]), rows([40, 50]), 0.2)
    assert rel(out.cpu(), reference(q_lat, q_pe, latent, k_pe, [3, 0], [40, 50], 0.2)) < 1e-5


def test_explicit_splits_skip_rows_outside_the_cache() -> None:
    """Given splits the launcher checks no ranges: rows past the cache are left out, an empty row gives zeros."""
    q_lat, q_pe, latent, k_pe = make(2, 4, 32, 16, 30, torch.float32)
    out = mla_decode(q_lat, q_pe, latent, k_pe, rows([20, 5]), rows([25, 0]), 0.2, splits=2)
    assert rel(out[0].cpu(), reference(q_lat, q_pe, latent, k_pe, [20], [10], 0.2)[0]) < 1e-5
    assert torch.equal(out[1].cpu(), torch.zeros(4, 32))


def test_choose_splits() -> None:
    assert choose_splits(1, 16, 1) == 1
    assert choose_splits(1, 16, 4096) == 64  # 64 rows a split
    assert choose_splits(1, 16, 100_000) == 132  # one program per SM
    assert choose_splits(8, 128, 100_000) == 3  # 64 head groups already
    assert choose_splits(200, 16, 100_000) == 1


def test_launcher_checks_its_inputs() -> None:
    q_lat, q_pe, latent, k_pe = make(2, 4, 32, 16, 30, torch.float32)
    start, length = rows([0, 3]), rows([5, 5])
    with pytest.raises(ValueError, match="shapes do not fit"):
        mla_decode(q_lat, q_pe[:, :3], latent, k_pe, start, length, 1.0)
    with pytest.raises(ValueError, match="shapes do not fit"):
        mla_decode(q_lat, q_pe, latent[:, :16], k_pe, start, length, 1.0)
    with pytest.raises(ValueError, match="shapes do not fit"):
        mla_decode(q_lat, q_pe, latent, k_pe, start[:1], length, 1.0)
    with pytest.raises(ValueError, match=r"q_lat \[B, H, R\]"):
        mla_decode(q_lat[0], q_pe, latent, k_pe, start, length, 1.0)
    with pytest.raises(ValueError, match="one dtype"):
        mla_decode(q_lat, q_pe, latent.bfloat16(), k_pe, start, length, 1.0)
    with pytest.raises(ValueError, match="one dtype"):
        mla_decode(q_lat.double(), q_pe.double(), latent.double(), k_pe.double(), start, length, 1.0)
    with pytest.raises(ValueError, match="int32"):
        mla_decode(q_lat, q_pe, latent, k_pe, start.long(), length, 1.0)
    with pytest.raises(ValueError, match="one device"):
        mla_decode(q_lat, q_pe, latent.to("meta"), k_pe, start, length, 1.0)
    with pytest.raises(ValueError, match="last dimension"):
        mla_decode(q_lat, q_pe, latent.T.contiguous().T, k_pe, start, length, 1.0)
    with pytest.raises(ValueError, match="contiguous row_start"):
        mla_decode(q_lat, q_pe, latent, k_pe, rows([0, 9, 3, 9])[::2], length, 1.0)
    with pytest.raises(ValueError, match="out of bounds"):
        mla_decode(q_lat, q_pe, latent, k_pe, rows([0, 26]), length, 1.0)
    with pytest.raises(ValueError, match="out of bounds"):
        mla_decode(q_lat, q_pe, latent, k_pe, start, rows([5, 0]), 1.0)
    with pytest.raises(ValueError, match="out of bounds"):
        mla_decode(q_lat, q_pe, latent, k_pe, rows([-1, 0]), length, 1.0)
    with pytest.raises(ValueError, match="splits must be"):
        mla_decode(q_lat, q_pe, latent, k_pe, start, length, 1.0, splits=0)


def test_fixed_rows_per_split_make_a_row_independent_of_its_batch() -> None:
    """With `split_rows`, a row's result is the same bits alone and next to a much longer row."""
    g = torch.Generator().manual_seed(7)
    s, h, r, p = 700, 4, 32, 16
    latent, k_pe = torch.randn(s, r, generator=g).to(DEVICE), torch.randn(s, p, generator=g).to(DEVICE)
    q_lat, q_pe = torch.randn(2, h, r, generator=g).to(DEVICE), torch.randn(2, h, p, generator=g).to(DEVICE)
    alone = mla_decode(q_lat[:1], q_pe[:1], latent, k_pe, rows([0]), rows([90]), 0.1, splits=2, split_rows=64)
    batch = mla_decode(q_lat, q_pe, latent, k_pe, rows([0, 100]), rows([90, 600]), 0.1, splits=10, split_rows=64)
    assert torch.equal(alone[0], batch[0])
    ref = reference(q_lat, q_pe, latent, k_pe, [0, 100], [90, 600], 0.1)
    assert rel(batch.cpu(), ref) < 1e-5
    with pytest.raises(ValueError, match="split_rows must be at least 1"):
        mla_decode(q_lat, q_pe, latent, k_pe, rows([0, 0]), rows([1, 1]), 0.1, splits=1, split_rows=0)
