"""Triton kernels against plain torch references. Without a GPU they run under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")  # on a CPU-only machine conftest.py has chosen the interpreter

from hetero_moe.kernels.quant import (  # noqa: E402
    dequantize_fp8_blocks,
    dequantize_int4,
    quantize_fp8_blocks,
    quantize_int4,
)
from hetero_moe.kernels.triton.fp8_linear import act_quant, fp8_linear  # noqa: E402
from hetero_moe.kernels.triton.int4_linear import int4_linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(("m", "k", "block"), [(1, 72, 32), (3, 300, 128), (17, 128, 128), (5, 7, 32)])
def test_act_quant_matches_reference(m: int, k: int, block: int) -> None:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(DEVICE)
    q, s = act_quant(x, block)
    ref_q, ref_s = quantize_fp8_blocks(x.cpu().T.contiguous(), (block, 1))  # per token per block, transposed
    assert torch.allclose(s.cpu(), ref_s.T.reshape(m, -1), rtol=1e-6)
    if DEVICE == "cuda":  # Triton's CPU interpreter casts to e4m3 wrongly near powers of two (7.95 -> 4)
        assert torch.equal(q.cpu().view(torch.uint8), ref_q.T.contiguous().view(torch.uint8))


@pytest.mark.parametrize(
    ("m", "n", "k", "block"),
    [(1, 40, 72, (32, 32)), (3, 576, 300, (128, 128)), (17, 130, 257, (128, 128)), (64, 96, 64, (32, 32))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_matches_dequantized_reference(
    m: int, n: int, k: int, block: tuple[int, int], dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(m * n + k)
    w, ws = quantize_fp8_blocks(torch.randn(n, k, generator=g), block)
    x = torch.randn(m, k, generator=g)
    out = fp8_linear(x.to(DEVICE, dtype), w.to(DEVICE), ws.to(DEVICE), block, block_m=16)
    # the reference: activations quantized the same way, both dequantized, matmul in float64
    xq, xs = act_quant(x.to(DEVICE, dtype), block[1])  # the activations exactly as the kernel quantizes them
    xd = dequantize_fp8_blocks(xq.cpu(), xs.cpu(), (1, block[1]))
    ref = xd.double() @ dequantize_fp8_blocks(w, ws, block).double().T
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel(out.cpu(), ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    if DEVICE == "cuda":  # the FP8 activation error (the interpreter's e4m3 cast is off, see above)
        assert rel(out.cpu(), x.double() @ dequantize_fp8_blocks(w, ws, block).double().T) < 0.05


@pytest.mark.parametrize(
    ("m", "n", "k", "group"), [(1, 40, 72, 32), (3, 130, 300, 64), (17, 64, 128, 128), (5, 33, 65, 64)]
)
@pytest.mark.parametrize("sdtype", [torch.bfloat16, torch.float16])
def test_int4_linear_matches_dequantized_reference(m: int, n: int, k: int, group: int, sdtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(m + n + k)
    packed, scales = quantize_int4(torch.randn(n, k, generator=g), group, sdtype)
    x = torch.randn(m, k, generator=g)
    out = int4_linear(x.to(DEVICE), packed.to(DEVICE), scales.to(DEVICE), group, block_m=16, block_n=32)
    ref = x.double() @ dequantize_int4(packed, scales, group, k).double().T
    assert out.shape == (m, n) and rel(out.cpu(), ref) < 1e-5


def test_launchers_check_their_inputs() -> None:
    w, ws = quantize_fp8_blocks(torch.randn(40, 72), (32, 32))
    with pytest.raises(ValueError, match="shapes do not fit"):
        fp8_linear(torch.randn(2, 71), w, ws, (32, 32))
    with pytest.raises(ValueError, match="e4m3 weight"):
        fp8_linear(torch.randn(2, 72), w.float(), ws, (32, 32))
    packed, scales = quantize_int4(torch.randn(40, 72), 32, torch.bfloat16)
    with pytest.raises(ValueError, match="shapes do not fit"):
        int4_linear(torch.randn(2, 200), packed, scales, 32)
    with pytest.raises(ValueError, match="bf16, fp16 or fp32 activations"):
        int4_linear(torch.randn(2, 72, dtype=torch.float64), packed, scales, 32)
