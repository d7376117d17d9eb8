"""Decode attention for DeepSeek's multi-head latent attention (MLA) in its absorbed form: every head
attends over one shared compressed key/value per token (MQA style), the latent itself serving as value.

For query row b, head h and the cache rows l = row_start[b] .. row_start[b] + row_len[b] - 1:

    score[b, h, l] = scale * (q_lat[b, h, :] . latent[l, :] + q_pe[b, h, :] . k_pe[l, :])
    out[b, h, :]   = sum_l softmax_l(score[b, h, :]) * latent[l, :]

Shapes: `q_lat [B, H, R]`, `q_pe [B, H, P]`, `latent [S, R]`, `k_pe [S, P]`, `out [B, H, R]`; R is
DeepSeek's kv_lora_rank (512), P its rope dim (64). One (row_start, row_len) pair per query row serves
single-sequence decode, several causal query tokens of one sequence and a batch of sequences held in
slots of one shared cache buffer alike.

Flash-decoding in two kernels: `_mla_split` streams one split of a row's cache range in BLOCK_L tiles for a
group of BLOCK_H heads (one loaded tile serves all of them) with an online softmax in float32 and leaves
the unnormalized partial (acc, max, sumexp); `_mla_combine` merges a row's splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hetero_moe.kernels.triton.common import DOT_PRECISION

_SM_TARGET = 132  # programs to aim for when choosing splits: an H100's SM count
_MIN_ROWS_PER_SPLIT = 64  # fewer rows per split spend more on partials than they gain in parallelism
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _mla_split(
    q_lat_ptr,
    q_pe_ptr,
    latent_ptr,
    k_pe_ptr,
    start_ptr,
    len_ptr,
    acc_ptr,
    max_ptr,
    sum_ptr,
    scale,
    H,
    S,
    stride_qb,
    stride_qh,
    stride_pb,
    stride_ph,
    stride_lat,
    stride_kpe,
    n_splits,
    split_rows,
    R: tl.constexpr,
    P: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One (query row, head group, split): partial acc `[BLOCK_H, R]`, running max and sumexp `[BLOCK_H]`
    over the split's share of the row's cache range, written to `[B, n_splits, H, R]` and `[B, n_splits, H]`."""
    b, hb, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(start_ptr + b)
    length = tl.load(len_ptr + b)
    # this split's rows [lo, hi) of the range, whole tiles except the row's last: a fixed number of rows
    # per split when given (so a row's sums do not depend on the other rows of the batch), else an equal share
    chunk = tl.cdiv(tl.cdiv(length, BLOCK_L), n_splits) * BLOCK_L
    if split_rows > 0:
        chunk = tl.cdiv(split_rows, BLOCK_L) * BLOCK_L
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, length)

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    offs_r = tl.arange(0, BLOCK_R)  # [BLOCK_R]
    offs_p = tl.arange(0, BLOCK_P)  # [BLOCK_P]
    mask_h = offs_h < H
    q = tl.load(  # [BLOCK_H, BLOCK_R]; padded heads and channels are zero
        q_lat_ptr + b * stride_qb + offs_h[:, None] * stride_qh + offs_r[None, :],
        mask=mask_h[:, None] & (offs_r[None, :] < R),
        other=0.0,
    )
    q_pe = tl.load(  # [BLOCK_H, BLOCK_P]
        q_pe_ptr + b * stride_pb + offs_h[:, None] * stride_ph + offs_p[None, :],
        mask=mask_h[:, None] & (offs_p[None, :] < P),
        other=0.0,
    )

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    for l0 in range(lo, hi, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)  # [BLOCK_L], positions in the row's range
        rows = start + offs_l  # cache rows; ones outside [0, S) are skipped, so bad ranges never read out of bounds
        mask_l = (offs_l < hi) & (rows >= 0) & (rows < S)
        rows64 = rows.to(tl.int64)
        kv = tl.load(  # [BLOCK_L, BLOCK_R]: key and value at once
            latent_ptr + rows64[:, None] * stride_lat + offs_r[None, :],
            mask=mask_l[:, None] & (offs_r[None, :] < R),
            other=0.0,
        )
        k_pe = tl.load(  # [BLOCK_L, BLOCK_P]
            k_pe_ptr + rows64[:, None] * stride_kpe + offs_p[None, :],
            mask=mask_l[:, None] & (offs_p[None, :] < P),
            other=0.0,
        )
        s = tl.dot(q, tl.trans(kv), input_precision=DOT_PRECISION, out_dtype=tl.float32)  # [BLOCK_H, BLOCK_L]
        s += tl.dot(q_pe, tl.trans(k_pe), input_precision=DOT_PRECISION, out_dtype=tl.float32)
        s = tl.where(mask_l[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BLOCK_H]; finite once a tile held a valid row
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid row yet: every p is 0, no NaN
        alpha = tl.exp(m_i - m_safe)  # [BLOCK_H]; 0 on the first valid tile (m_i = -inf)
        p = tl.exp(s - m_safe[:, None])  # [BLOCK_H, BLOCK_L]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(
            p.to(kv.dtype), kv, input_precision=DOT_PRECISION, out_dtype=tl.float32
        )  # [BLOCK_H, BLOCK_R]
        m_i = m_new

    part = (b * n_splits + sp) * H + offs_h  # [BLOCK_H], index into [B, n_splits, H]
    tl.store(max_ptr + part, m_i, mask=mask_h)
    tl.store(sum_ptr + part, l_i, mask=mask_h)
    tl.store(
        acc_ptr + part[:, None].to(tl.int64) * R + offs_r[None, :],
        acc,
        mask=mask_h[:, None] & (offs_r[None, :] < R),
    )


@triton.jit
def _mla_combine(
    acc_ptr,
    max_ptr,
    sum_ptr,
    out_ptr,
    H,
    n_splits,
    R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One (query row, head): `out [R] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s`, M the largest m_s.
    Empty splits carry m = -inf, l = 0, acc = 0 and weigh nothing; a row with no valid cache row gives zeros."""
    b, h = tl.program_id(0), tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)  # [BLOCK_S]
    offs_r = tl.arange(0, BLOCK_R)  # [BLOCK_R]
    mask_s = offs_s < n_splits
    part = (b * n_splits + offs_s) * H + h  # [BLOCK_S], index into [B, n_splits, H]
    m = tl.load(max_ptr + part, mask=mask_s, other=float("-inf"))
    l_s = tl.load(sum_ptr + part, mask=mask_s, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    denom = tl.sum(tl.exp(m - m_max) * l_s, axis=0)
    out = tl.zeros([BLOCK_R], dtype=tl.float32)
    for sp in range(0, n_splits):
        idx = (b * n_splits + sp) * H + h
        w = tl.exp(tl.load(max_ptr + idx) - m_max)
        out += w * tl.load(acc_ptr + idx.to(tl.int64) * R + offs_r, mask=offs_r < R, other=0.0)
    out = out / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + (b * H + h).to(tl.int64) * R + offs_r, out.to(out_ptr.dtype.element_ty), mask=offs_r < R)


def choose_splits(batch: int, heads: int, max_len: int, block_h: int = 16) -> int:
    """How many programs share a row's cache range: enough for `_SM_TARGET` programs in all, no fewer than
    `_MIN_ROWS_PER_SPLIT` rows each, at least 1."""
    programs = batch * triton.cdiv(heads, block_h)
    return max(1, min(triton.cdiv(_SM_TARGET, programs), triton.cdiv(max_len, _MIN_ROWS_PER_SPLIT)))


def _check(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    latent: torch.Tensor,
    k_pe: torch.Tensor,
    row_start: torch.Tensor,
    row_len: torch.Tensor,
) -> None:
    if q_lat.dim() != 3 or q_pe.dim() != 3 or latent.dim() != 2 or k_pe.dim() != 2:
        raise ValueError(
            "mla_decode takes q_lat [B, H, R], q_pe [B, H, P], latent [S, R], k_pe [S, P], got "
            f"{tuple(q_lat.shape)}, {tuple(q_pe.shape)}, {tuple(latent.shape)}, {tuple(k_pe.shape)}"
        )
    b, h, r = q_lat.shape
    s, p = k_pe.shape
    if (
        q_pe.shape[:2] != (b, h)
        or latent.shape != (s, r)
        or q_pe.shape[2] != p
        or row_start.shape != (b,)
        or row_len.shape != (b,)
        or min(b, h, r, p, s) == 0
    ):
        raise ValueError(
            f"shapes do not fit: q_lat {tuple(q_lat.shape)}, q_pe {tuple(q_pe.shape)}, latent {tuple(latent.shape)}, "
            f"k_pe {tuple(k_pe.shape)}, row_start {tuple(row_start.shape)}, row_len {tuple(row_len.shape)}"
        )
    if q_lat.dtype not in _DTYPES or not (q_lat.dtype == q_pe.dtype == latent.dtype == k_pe.dtype):
        raise ValueError(
            "mla_decode takes queries and cache of one dtype, bf16, fp16 or fp32, got "
            f"{q_lat.dtype}, {q_pe.dtype}, {latent.dtype}, {k_pe.dtype}"
        )
    if row_start.dtype != torch.int32 or row_len.dtype != torch.int32:
        raise ValueError(f"mla_decode takes int32 row_start and row_len, got {row_start.dtype}, {row_len.dtype}")
    tensors = (q_lat, q_pe, latent, k_pe, row_start, row_len)
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"mla_decode needs all tensors on one device, got {[str(t.device) for t in tensors]}")
    if any(t.stride(-1) != 1 for t in (q_lat, q_pe, latent, k_pe)):
        raise ValueError("mla_decode needs rows contiguous in their last dimension (row strides may be larger)")
    if not (row_start.is_contiguous() and row_len.is_contiguous()):
        raise ValueError("mla_decode needs contiguous row_start and row_len")


def mla_decode(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    latent: torch.Tensor,
    k_pe: torch.Tensor,
    row_start: torch.Tensor,
    row_len: torch.Tensor,
    scale: float,
    splits: int | None = None,
    split_rows: int | None = None,
) -> torch.Tensor:
    """Absorbed-MLA attention of `q_lat [B, H, R]`, `q_pe [B, H, P]` over cache rows
    `row_start[b] .. row_start[b] + row_len[b] - 1` of `latent [S, R]`, `k_pe [S, P]` -> `[B, H, R]` in q_lat's
    dtype. Tensors need only unit stride in their last dimension (so the cache may be two views of one
    `[S, R + P]` buffer).

    `splits=None` picks the split count from the longest row and checks the ranges (1 <= row_len,
    0 <= row_start, row_start + row_len <= S), which costs one device-to-host copy. With `splits` given
    nothing is copied back (CUDA-graph safe) and nothing is checked: cache rows outside [0, S) are skipped,
    and a query row left with none gets zeros.

    `split_rows` fixes the rows each split covers (rounded up to whole tiles; `splits` must then cover
    the longest row): a row's result is then the same bits whatever else is in the batch."""
    _check(q_lat, q_pe, latent, k_pe, row_start, row_len)
    b, h, r = q_lat.shape
    s, p = k_pe.shape
    block_h = 16  # the smallest tl.dot tile; the [BLOCK_H, R] float32 accumulator stays in registers
    if splits is None:
        lo_len, hi_len, lo_start, hi_end = torch.stack(
            [row_len.min(), row_len.max(), row_start.min(), (row_start.long() + row_len).max()]
        ).tolist()
        if lo_len < 1 or lo_start < 0 or hi_end > s:
            raise ValueError(
                f"row ranges out of bounds: row_len >= 1, row_start >= 0 and row_start + row_len <= {s} needed, "
                f"got row_len in [{lo_len}, {hi_len}], row_start >= {lo_start}, end <= {hi_end}"
            )
        splits = choose_splits(b, h, hi_len, block_h)
    elif splits < 1:
        raise ValueError(f"splits must be at least 1, got {splits}")
    if split_rows is not None and split_rows < 1:
        raise ValueError(f"split_rows must be at least 1, got {split_rows}")

    block_r = max(16, triton.next_power_of_2(r))
    block_p = max(16, triton.next_power_of_2(p))
    block_l = 32  # cache rows per tile: [BLOCK_L, R] latent and [BLOCK_L, P] rope keys
    dev = q_lat.device
    acc = torch.empty(b, splits, h, r, dtype=torch.float32, device=dev)  # unnormalized partial outputs
    m = torch.empty(b, splits, h, dtype=torch.float32, device=dev)  # running max of each partial
    l_sum = torch.empty(b, splits, h, dtype=torch.float32, device=dev)  # sum of exp(score - max)
    _mla_split[(b, triton.cdiv(h, block_h), splits)](
        q_lat,
        q_pe,
        latent,
        k_pe,
        row_start,
        row_len,
        acc,
        m,
        l_sum,
        scale,
        h,
        s,
        q_lat.stride(0),
        q_lat.stride(1),
        q_pe.stride(0),
        q_pe.stride(1),
        latent.stride(0),
        k_pe.stride(0),
        splits,
        split_rows or 0,
        R=r,
        P=p,
        BLOCK_H=block_h,
        BLOCK_L=block_l,
        BLOCK_R=block_r,
        BLOCK_P=block_p,
        DOT_PRECISION=DOT_PRECISION[q_lat.dtype],
        num_warps=4 if block_r <= 256 else 8,
    )
    out = torch.empty(b, h, r, dtype=q_lat.dtype, device=dev)
    _mla_combine[(b, h)](
        acc, m, l_sum, out, h, splits, R=r, BLOCK_S=max(16, triton.next_power_of_2(splits)), BLOCK_R=block_r
    )
    return out
