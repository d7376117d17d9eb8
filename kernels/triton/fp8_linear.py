"""DeepSeek's FP8 linear: e4m3 weights with one float32 scale per (bn x bk) block, activations
quantized per token per bk channels, products accumulated in float32 block by block.

`y[m, n] = sum_kb xs[m, kb] * ws[n // bn, kb] * sum_{k in kb} xq[m, k] * wq[n, k]`
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0


@triton.jit
def _act_quant(x_ptr, q_ptr, s_ptr, K, n_kb, BLOCK_K: tl.constexpr):
    row, kb = tl.program_id(0), tl.program_id(1)
    offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * K + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.max(tl.abs(x), axis=0) / 448.0
    s = tl.where(s > 0, s, 1.0)
    tl.store(q_ptr + row * K + offs, (x / s).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * n_kb + kb, s)


@triton.jit
def _fp8_matmul(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    c_ptr,
    M,
    N,
    K,
    n_kb,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, n_kb):
        k = kb * BLOCK_K + rk
        a = tl.load(a_ptr + rm[:, None] * K + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rn[:, None] * K + k[None, :], mask=(rn[:, None] < N) & (k[None, :] < K), other=0.0)
        a_s = tl.load(as_ptr + rm * n_kb + kb, mask=rm < M, other=0.0)
        b_s = tl.load(bs_ptr + pid_n * n_kb + kb)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.float32) * a_s[:, None] * b_s
    tl.store(
        c_ptr + rm[:, None] * N + rn[None, :],
        acc.to(c_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


def act_quant(x: torch.Tensor, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [M, K]` -> (e4m3 `[M, K]`, float32 scales `[M, ceil(K / block_k)]`)."""
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"act_quant takes a contiguous [M, K] tensor, got {tuple(x.shape)}")
    m, k = x.shape
    n_kb = triton.cdiv(k, block_k)
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, n_kb, dtype=torch.float32, device=x.device)
    _act_quant[(m, n_kb)](x, q, s, k, n_kb, BLOCK_K=block_k)
    return q, s


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], block_m: int = 64
) -> torch.Tensor:
    """`x [M, K]` (bf16/fp16/fp32) times e4m3 `weight [N, K]` with block `scale [ceil(N/bn), ceil(K/bk)]`
    -> `[M, N]` in x's dtype."""
    if weight.dtype != torch.float8_e4m3fn or scale.dtype != torch.float32:
        raise ValueError(f"fp8_linear takes an e4m3 weight and float32 scales, got {weight.dtype}, {scale.dtype}")
    n, k = weight.shape
    bn, bk = block
    if x.shape[-1] != k or tuple(scale.shape) != (triton.cdiv(n, bn), triton.cdiv(k, bk)):
        raise ValueError(
            f"shapes do not fit: x {tuple(x.shape)}, weight {(n, k)}, scale {tuple(scale.shape)}, block {block}"
        )
    if not (weight.is_contiguous() and scale.is_contiguous()):
        raise ValueError("fp8_linear needs contiguous weight and scales")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    xq, xs = act_quant(x2, bk)
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, bn))
    _fp8_matmul[grid](xq, xs, weight, scale, out, m, n, k, triton.cdiv(k, bk), BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk)
    return out.reshape(*lead, n)
