"""The Numba INT4 quantizer gives the bits of the plain torch one (`kernels/quant.py:quantize_int4`):
packed bytes and scales equal, over awkward shapes, every group size, scale and input dtype, and the
values where a shortcut would show: zero rows, exact and near ties, subnormal and overflowing scales."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hetero_moe.kernels.numba.quantize import bf16_bits, fp16_bits, quantize_int4_fast
from hetero_moe.kernels.quant import quantize_int4
from numba import njit

SHAPES = [(1, 1), (7, 100), (40, 72), (3, 300), (130, 257)]
GROUPS = [32, 64, 128]
SCALE_DTYPES = [torch.bfloat16, torch.float16]
INPUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# row magnitudes: zero, subnormal float32 (bf16 scales subnormal or clamped to tiny), fp16-subnormal
# scales, ordinary, and past fp16's range (its scale overflows to inf)
MAGNITUDES = [0.0, 1e-44, 1e-41, 1e-38, 1e-9, 1e-7, 1e-5, 3e-3, 1.0, 40.0, 5e3, 1e6, 1e20, 1e37]


def assert_same(w: torch.Tensor, group: int, sdtype: torch.dtype) -> None:
    packed, scales = quantize_int4_fast(w, group, sdtype)
    ref_packed, ref_scales = quantize_int4(w, group, sdtype)
    assert packed.dtype == torch.uint8 and scales.dtype == sdtype
    assert packed.shape == ref_packed.shape and scales.shape == ref_scales.shape
    assert torch.equal(scales.view(torch.uint16), ref_scales.view(torch.uint16))
    assert torch.equal(packed, ref_packed)


def rows_of_magnitudes(out_dim: int, in_dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """randn rows scaled by MAGNITUDES in turn (from a seed-chosen start), finite in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    limit = torch.finfo(dtype).max / 8
    mags = [m for m in MAGNITUDES if m < limit]
    start = seed % len(mags)
    row_mag = torch.tensor([mags[(start + r) % len(mags)] for r in range(out_dim)], dtype=torch.float64)
    w = torch.randn(out_dim, in_dim, generator=g, dtype=torch.float64) * row_mag[:, None]
    return w.to(dtype)


@pytest.mark.parametrize("wdtype", INPUT_DTYPES)
@pytest.mark.parametrize("sdtype", SCALE_DTYPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("out_dim", "in_dim"), SHAPES)
def test_matches_reference(out_dim: int, in_dim: int, group: int, sdtype: torch.dtype, wdtype: torch.dtype) -> None:
    seed = out_dim * 1000 + in_dim + group + INPUT_DTYPES.index(wdtype)
    assert_same(rows_of_magnitudes(out_dim, in_dim, wdtype, seed), group, sdtype)


@pytest.mark.parametrize("wdtype", INPUT_DTYPES)
@pytest.mark.parametrize("sdtype", SCALE_DTYPES)
def test_every_magnitude_and_zero_groups(sdtype: torch.dtype, wdtype: torch.dtype) -> None:
    """Every magnitude in one matrix, with zeroed groups inside otherwise ordinary rows."""
    w = rows_of_magnitudes(2 * len(MAGNITUDES), 300, wdtype, seed=1)
    w[1, 64:128] = 0  # one zero group in a nonzero row
    w[3, 256:] = 0  # the ragged last group zero
    for group in GROUPS:
        assert_same(w, group, sdtype)


@pytest.mark.parametrize("wdtype", INPUT_DTYPES)
@pytest.mark.parametrize("sdtype", SCALE_DTYPES)
def test_exact_ties_round_to_even(sdtype: torch.dtype, wdtype: torch.dtype) -> None:
    """Groups whose amax is 7 s (so the scale is exactly s, a power of two) holding s (k + 1/2):
    every tie from -6.5 to 6.5, also checked against the expected nibbles themselves."""
    group = 32
    ks = torch.arange(-7, 7, dtype=torch.float64) + 0.5  # 14 ties
    row = torch.cat((torch.tensor([7.0]), ks, torch.zeros(group - 1 - len(ks), dtype=torch.float64)))
    powers = [-20, -10, -3, 0, 4, 10]
    w = torch.stack([row * 2.0**e for e in powers]).to(wdtype)  # [6, 32], exact in every input dtype
    assert_same(w, group, sdtype)
    packed, scales = quantize_int4_fast(w, group, sdtype)
    assert torch.equal(scales.double().squeeze(1), torch.tensor([2.0**e for e in powers], dtype=torch.float64))
    q = torch.cat((packed & 0xF, packed >> 4), dim=1).long() - 8  # [6, 32], element order
    even = torch.round(ks).long()  # half to even: -6.5 -> -6, -5.5 -> -6, ..., 0.5 -> 0, 1.5 -> 2
    assert torch.equal(q[:, 1 : 1 + len(ks)], even.expand(len(powers), -1))
    assert (q[:, 0] == 7).all()


@pytest.mark.parametrize("sdtype", SCALE_DTYPES)
def test_near_ties_divide_as_ieee(sdtype: torch.dtype) -> None:
    """float32 values one ulp either side of s (k + 1/2), s with a full scale mantissa: here `w / s`
    and `w * (1 / s)` round differently in a few percent of cases, so a reciprocal would show."""
    g = torch.Generator().manual_seed(5)
    groups, group = 96, 64
    s = (torch.rand(groups, generator=g, dtype=torch.float64) * 3 + 0.01).to(sdtype).double()  # [G]
    k = torch.randint(-7, 7, (groups, group // 3), generator=g).double() + 0.5
    tie = (s[:, None] * k).float()  # [G, n]
    down, up = tie.nextafter(torch.tensor(-1.0e30)), tie.nextafter(torch.tensor(1.0e30))
    body = torch.stack((down, tie, up), dim=-1).view(groups, -1)  # [G, 3n]
    amax = (7 * s).float()[:, None]  # exact, so the stored scale is s itself
    w = torch.cat((amax, body, torch.zeros(groups, group - 1 - body.shape[1])), dim=1).reshape(4, -1)
    assert_same(w, group, sdtype)
    assert torch.equal(quantize_int4_fast(w, group, sdtype)[1].double().flatten(), s)


def test_other_dtypes_and_layouts() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(72, 40, generator=g, dtype=torch.float64)
    assert_same(w, 32, torch.bfloat16)  # float64: rounded to float32 first, as the reference does
    assert_same(w.float().t(), 32, torch.float16)  # not contiguous
    assert_same(w.float()[:, :37], 64, torch.bfloat16)
    assert_same(torch.zeros(3, 0), 32, torch.bfloat16)


def test_rejects_bad_input() -> None:
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int4_fast(w[None], 32, torch.bfloat16)
    with pytest.raises(ValueError, match="even"):
        quantize_int4_fast(w, 33, torch.bfloat16)
    with pytest.raises(ValueError, match="scale dtype"):
        quantize_int4_fast(w, 32, torch.float32)
    with pytest.raises(ValueError, match="floating-point"):
        quantize_int4_fast(torch.ones(4, 64, dtype=torch.int32), 32, torch.bfloat16)


@njit(cache=True)
def round_all(patterns, kind: int, out) -> None:
    for i in range(patterns.shape[0]):
        f = np.int64(patterns[i])
        out[i] = bf16_bits(f) if kind == 0 else fp16_bits(f)


def near_ties(drop_bits) -> np.ndarray:
    """For every float32 exponent e (0..254) and every value of the mantissa bits kept when rounding
    drops `drop_bits(e)` of them: the patterns just under, at and over the tie, and the top of the
    range. Non-negative finite values only."""
    out = []
    for e in range(255):
        drop = min(drop_bits(e), 23)
        tops = (e << 23) | (np.arange(1 << (23 - drop), dtype=np.int64) << drop)
        tie = 1 << (drop - 1)
        out.append((tops[:, None] + np.array([0, tie - 1, tie, tie + 1, (1 << drop) - 1])).ravel())
    return np.concatenate(out)


@pytest.mark.parametrize(("kind", "dtype"), [(0, torch.bfloat16), (1, torch.float16)])
def test_scale_rounding_bits(kind: int, dtype: torch.dtype) -> None:
    """The integer float32 -> bf16 / fp16 rounding equals torch's on non-negative finite values: a
    stride through all of them, and every tie and its neighbours (fp16 subnormals drop more bits).
    All 2^31 patterns were checked once, when this was written."""
    drop_bits = (lambda e: 16) if kind == 0 else (lambda e: 13 if e >= 113 else 126 - e)
    patterns = np.concatenate((np.arange(0, 0x7F800000, 997, dtype=np.int64), near_ties(drop_bits), [0x7F800000]))
    patterns = patterns[(patterns >= 0) & (patterns <= 0x7F800000)].astype(np.uint32)
    out = np.empty(patterns.shape[0], np.uint16)
    round_all(patterns, kind, out)
    ref = torch.from_numpy(patterns.view(np.float32)).to(dtype).view(torch.uint16).numpy()
    bad = np.nonzero(out != ref)[0]
    assert bad.size == 0, [(hex(patterns[i]), hex(ref[i]), hex(out[i])) for i in bad[:5]]


def test_fp16_subnormal_boundaries() -> None:
    """fp16 scales around the subnormal range and its edges through the whole quantizer."""
    s32 = torch.tensor([2.0**-25, 2.0**-24, 1.5 * 2.0**-25, 2.0**-14 * (1 - 2.0**-12), 65504.0, 65520.0])
    w = torch.cat([torch.full((1, 32), float(x)) * torch.linspace(-7, 7, 32) for x in s32.tolist()])
    for wdtype, sdtype in itertools.product([torch.float32, torch.bfloat16], SCALE_DTYPES):
        assert_same(w.to(wdtype), 32, sdtype)
