"""Logits of a token sequence fed chunk by chunk (teacher forcing), through the same runner, KV cache
pool and batch metadata as `Engine.step`: for measuring quantization error and checking exactness."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hetero_moe.engine.kv_cache import Batch, KVPool
from hetero_moe.engine.runner import ModelRunner


class TeacherForced:
    """One sequence with its own small pool: `feed(ids)` runs the next chunk and returns the float32 logits
    `[V]` of its last token."""

    PAGE = 16

    def __init__(self, runner: ModelRunner, capacity: int) -> None:
        pages = -(-capacity // self.PAGE)
        self.runner = runner
        self.pool = KVPool(runner.new_buffers(pages * self.PAGE), pages, self.PAGE, runner.cache_device)
        self.pages: list[int] = []
        self.tokens: list[int] = []

    def feed(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = [int(t) for t in ids]
        start = len(self.tokens)
        self.tokens += ids
        if not self.pool.reserve(self.pages, len(self.tokens)):
            raise ValueError(f"{len(self.tokens)} tokens exceed the capacity of {self.pool.capacity}")
        batch = Batch.of(self.pool, [(self.tokens, self.pages, start, len(ids))])
        return self.runner.forward(batch, self.pool.buffers)[0]
