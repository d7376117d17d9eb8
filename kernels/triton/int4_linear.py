"""INT4 linear for smaller cards: weights in our group-wise INT4 layout (`kernels/numba/int4.py`:
`packed [N, Kp / 2] uint8`, byte j of group g holds elements g*G + j and g*G + G/2 + j; `scales
[N, Kp / G]` bf16 or fp16), activations in bf16/fp16/fp32, one K-tile per group so each group's
scale multiplies its partial product once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hetero_moe.kernels.triton.common import DOT_PRECISION


@triton.jit
def _int4_matmul(
    x_ptr,
    w_ptr,
    s_ptr,
    c_ptr,
    M,
    N,
    K,
    n_groups,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    HALF: tl.constexpr = GROUP // 2
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rh = tl.arange(0, HALF)
    row_bytes = n_groups * HALF
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, n_groups):
        k_lo = g * GROUP + rh
        k_hi = k_lo + HALF
        x_lo = tl.load(x_ptr + rm[:, None] * K + k_lo[None, :], mask=(rm[:, None] < M) & (k_lo[None, :] < K), other=0.0)
        x_hi = tl.load(x_ptr + rm[:, None] * K + k_hi[None, :], mask=(rm[:, None] < M) & (k_hi[None, :] < K), other=0.0)
        packed = tl.load(w_ptr + rn[:, None] * row_bytes + g * HALF + rh[None, :], mask=rn[:, None] < N, other=0x88).to(
            tl.int32
        )
        lo = ((packed & 15) - 8).to(x_lo.dtype)
        hi = ((packed >> 4) - 8).to(x_lo.dtype)
        s = tl.load(s_ptr + rn * n_groups + g, mask=rn < N, other=0.0).to(tl.float32)
        part = tl.dot(x_lo, tl.trans(lo), input_precision=DOT_PRECISION, out_dtype=tl.float32)
        part += tl.dot(x_hi, tl.trans(hi), input_precision=DOT_PRECISION, out_dtype=tl.float32)
        acc += part * s[None, :]
    tl.store(
        c_ptr + rm[:, None] * N + rn[None, :],
        acc.to(c_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int, block_m: int = 16, block_n: int = 64
) -> torch.Tensor:
    """`x [..., K]` times the INT4 weight `[N, K]` -> `[..., N]` in x's dtype."""
    if packed.dtype != torch.uint8 or scales.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"int4_linear takes uint8 packed weights and bf16/fp16 scales, got {packed.dtype}, {scales.dtype}"
        )
    if x.dtype not in DOT_PRECISION:
        raise ValueError(f"int4_linear takes bf16, fp16 or fp32 activations, got {x.dtype}")
    n, n_groups = scales.shape
    k = x.shape[-1]
    if packed.shape != (n, n_groups * group // 2) or k > n_groups * group or k <= (n_groups - 1) * group:
        raise ValueError(
            f"shapes do not fit: x {tuple(x.shape)}, packed {tuple(packed.shape)}, "
            f"scales {tuple(scales.shape)}, group {group}"
        )
    if not (packed.is_contiguous() and scales.is_contiguous()):
        raise ValueError("int4_linear needs contiguous weights and scales")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_matmul[grid](
        x2,
        packed,
        scales,
        out,
        m,
        n,
        k,
        n_groups,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        GROUP=group,
        DOT_PRECISION=DOT_PRECISION[x.dtype],
    )
    return out.reshape(*lead, n)
