"""Rotary position embeddings in the four layouts the supported models use.

Each is built once per forward from the model's rotary module output and applied to `[1, h, T, d]`
query or key tensors; the arithmetic follows transformers' functions exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from hetero_moe.kernels.numba.latent import ROPE_HALVES, ROPE_PAIRS, ROPE_PAIRS_TO_HALVES


class Rope(Protocol):
    def apply(self, x: torch.Tensor) -> torch.Tensor: ...


def _halves(cos: torch.Tensor, sin: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The first half of `[1, T, d]` tables whose halves repeat (one value per pair), `[T, d / 2]` float32."""
    half = cos.shape[-1] // 2
    return tuple(np.ascontiguousarray(t[0, :, :half].float().numpy()) for t in (cos, sin))


@dataclass(frozen=True)
class HalfRope:
    """Llama layout: the first and second halves of the rotated dims form the pairs. Partial rotary (GLM-4.5,
    MiniMax-M2, DeepSeek-V3.2's indexer): when cos and sin cover fewer dims than the head, only the first
    ones rotate and the rest pass through."""

    cos: torch.Tensor  # [1, T, d_rot]
    sin: torch.Tensor  # [1, T, d_rot]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        rot = self.cos.shape[-1]
        if rot < x.shape[-1]:
            return torch.cat((self.apply(x[..., :rot]), x[..., rot:]), dim=-1)
        cos, sin = self.cos.unsqueeze(1), self.sin.unsqueeze(1)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * cos) + (rotated * sin)

    @functools.cached_property
    def pairs(self) -> tuple[int, np.ndarray, np.ndarray]:
        """For `kernels/numba/latent.py`: its layout code and per-pair cos and sin `[T, d_rot / 2]`, once per
        forward (every layer reads them)."""
        return (ROPE_HALVES, *_halves(self.cos, self.sin))


@dataclass(frozen=True)
class SplitHalfRope:
    """gpt-oss's layout: the halves pair up as in Llama's, but the rotary module gives each frequency once
    (cos and sin `[1, T, d / 2]`): `(x1 cos - x2 sin, x2 cos + x1 sin)`."""

    cos: torch.Tensor  # [1, T, d / 2]
    sin: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos.unsqueeze(1), self.sin.unsqueeze(1)
        first, second = torch.chunk(x, 2, dim=-1)
        return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


@dataclass(frozen=True)
class InterleavedRope:
    """DeepSeek-V3 layout: adjacent pairs (x0, x1), (x2, x3), ... share one frequency."""

    cos: torch.Tensor  # [1, T, d], cat(freqs, freqs)
    sin: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        half = self.cos.shape[-1] // 2
        cos, sin = self.cos[..., :half].unsqueeze(1), self.sin[..., :half].unsqueeze(1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    @functools.cached_property
    def pairs(self) -> tuple[int, np.ndarray, np.ndarray]:
        return (ROPE_PAIRS_TO_HALVES, *_halves(self.cos, self.sin))


@dataclass(frozen=True)
class ComplexRope:
    """DeepSeek-V2 layout: adjacent pairs rotated as complex numbers, in float32."""

    freqs_cis: torch.Tensor  # [1, T, d / 2], complex

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * self.freqs_cis.unsqueeze(1)).flatten(3).type_as(x)

    @functools.cached_property
    def pairs(self) -> tuple[int, np.ndarray, np.ndarray]:
        f = self.freqs_cis[0]
        return ROPE_PAIRS, np.ascontiguousarray(f.real.float().numpy()), np.ascontiguousarray(f.imag.float().numpy())
