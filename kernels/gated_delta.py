"""Gated DeltaNet (Qwen3.5-MoE's and Qwen3-Next's linear attention) in plain torch: the short causal
convolution over the mixed q/k/v channels, and the gated delta rule over a recurrent state
`S [H, dk, dv]` per sequence:

    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - exp(g_t) S_{t-1}^T k_t))^T,    o_t = S_t^T q_t

with q and k L2-normalised and q scaled by dk^-1/2. Two forms with transformers' arithmetic step by step
(its `torch_chunk_gated_delta_rule` and `torch_recurrent_gated_delta_rule`), so float32 results match
it: a chunked form for prompts (a UT transform per chunk of 64 tokens, then a scan over chunks) and a
one-token step for decoding, batched over sequences. Everything runs in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64  # tokens per chunk of the chunked form (transformers' chunk_size)


def causal_conv(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution of `x [B, C, T]` continuing from `state [B, C, K-1]` (the inputs
    before it; zeros at a sequence's start) with `weight [C, K]`, then SiLU -> (`[B, C, T]` in x's dtype,
    the new state `[B, C, K-1]`: the last K-1 inputs)."""
    channels, kernel = weight.shape
    if state.shape[-1] != kernel - 1 or state.shape[:2] != x.shape[:2]:
        raise ValueError(f"conv state {tuple(state.shape)} does not fit input {tuple(x.shape)}, kernel {kernel}")
    full = torch.cat((state.to(x.dtype), x), dim=-1)  # [B, C, K-1+T]
    out = F.conv1d(full.to(weight.dtype), weight.unsqueeze(1), groups=channels)  # [B, C, T]
    return F.silu(out).to(x.dtype), full[..., full.shape[-1] - (kernel - 1) :]


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _heads(q: torch.Tensor, k: torch.Tensor, v_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped values: each q/k head serves `v_heads // k_heads` consecutive value heads (dim 2)."""
    k_heads = q.shape[2]
    if k_heads != v_heads:
        q = q.repeat_interleave(v_heads // k_heads, dim=2)
        k = k.repeat_interleave(v_heads // k_heads, dim=2)
    return q, k


def _float32_heads_first(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`[B, T, H, ...]` -> `[B, H, T, ...]`, contiguous float32."""
    return tuple(x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format) for x in xs)


def chunk_gated_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked form over one run of tokens: `q, k [B, T, Hk, dk]`, `v [B, T, H, dv]`, `g` (log decay,
    <= 0) and `beta [B, T, H]`, `state [B, H, dk, dv]` (None: zeros) -> (`[B, T, H, dv]` in q's dtype,
    the state after the last token, float32)."""
    dtype = q.dtype
    batch, length, _, dk = k.shape
    heads, dv = v.shape[-2:]
    q, k, v, beta, g = _float32_heads_first(*_heads(q, k, heads), v, beta, g)
    q, k = l2norm(q), l2norm(k)
    q = q * dk**-0.5
    pad = (chunk - length % chunk) % chunk
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    chunks = (length + pad) // chunk
    v_beta, k_beta = v * beta.unsqueeze(-1), k * beta.unsqueeze(-1)
    q, k, k_beta, v_beta = (x.reshape(batch, heads, chunks, chunk, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    g = g.reshape(batch, heads, chunks, chunk)
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    cum = g.cumsum(dim=3)  # [B, H, n, c]: log decay from the chunk's start
    pair = (cum.unsqueeze(4) - cum.unsqueeze(3)).masked_fill(upper, float("-inf")).exp()  # [B, H, n, c, c]
    ut = (k_beta @ k.transpose(-1, -2)) * pair
    intra = (q @ k.transpose(-1, -2)) * pair
    decayed_k_beta = k_beta * cum.exp().unsqueeze(-1)
    new_v = torch.linalg.solve_triangular(ut, v_beta, upper=False, unitriangular=True)
    k_cum = torch.linalg.solve_triangular(ut, decayed_k_beta, upper=False, unitriangular=True)
    s = torch.zeros(batch, heads, dk, dv, dtype=new_v.dtype, device=new_v.device) if state is None else state.to(new_v)
    out = torch.zeros_like(new_v)
    q = q * cum.exp().unsqueeze(-1)
    k = k * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    chunk_decay = cum[..., -1].exp()[..., None, None]
    for i in range(chunks):
        v_new = new_v[:, :, i] - k_cum[:, :, i] @ s
        out[:, :, i] = q[:, :, i] @ s + intra[:, :, i] @ v_new
        s = s * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(batch, heads, -1, dv)[:, :, :length]
    return out.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format), s


def recurrent_gated_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token (decoding: T = 1, one sequence per batch row), shapes as `chunk_gated_delta`; the
    state is required -> (`[B, T, H, dv]` in q's dtype, the new state, float32)."""
    dtype = q.dtype
    length, dk = k.shape[1], k.shape[-1]
    q, k, v, beta, g = _float32_heads_first(*_heads(q, k, v.shape[-2]), v, beta, g)
    q, k = l2norm(q), l2norm(k)
    q = q / dk**0.5
    s = state.to(v)
    out = torch.zeros_like(v)
    for i in range(length):
        s = s * g[:, :, i].exp()[..., None, None]
        delta = (v[:, :, i] - (s * k[:, :, i].unsqueeze(-1)).sum(dim=-2)) * beta[:, :, i].unsqueeze(-1)
        s = s + k[:, :, i].unsqueeze(-1) * delta.unsqueeze(-2)
        out[:, :, i] = (s * q[:, :, i].unsqueeze(-1)).sum(dim=-2)
    return out.transpose(1, 2).contiguous().to(dtype), s
