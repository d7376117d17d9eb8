"""Pinned host buffers and the one worker thread that run routed experts on the CPU while a GPU
computes the rest of an MoE block; shared by all MoE blocks of a model, which run one after another."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch


@dataclass
class OverlapStats:
    """Seconds spent, summed over MoE layers, since the last `reset`: in the CPU experts (worker thread)
    and waiting for them (the calling thread, after its GPU work was queued)."""

    experts_s: float = 0.0
    wait_s: float = 0.0
    calls: int = 0

    def reset(self) -> None:
        self.experts_s = self.wait_s = 0.0
        self.calls = 0


class HostStaging:
    """Buffer reuse is safe without extra synchronisation: the worker waits for an event recorded after
    the copies into the input buffers, and that event follows, on the same stream, the previous layer's
    copy out of the output buffer."""

    def __init__(self, device: torch.device) -> None:
        self.device = device  # the GPU the blocks run on
        self.pin = device.type == "cuda"
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="cpu-experts")
        self.buffers: dict[str, torch.Tensor] = {}
        self.stats = OverlapStats()

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A host tensor of `shape`, backed by a grow-only (pinned, on a GPU box) buffer."""
        n = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            buf = torch.empty(max(n, 1), dtype=dtype, pin_memory=self.pin)
            self.buffers[name] = buf
        return buf[:n].view(shape)

    def to_host(self, name: str, t: torch.Tensor) -> torch.Tensor:
        host = self.buffer(name, tuple(t.shape), t.dtype)
        host.copy_(t, non_blocking=True)
        return host

    def close(self) -> None:
        self.executor.shutdown(wait=True)
