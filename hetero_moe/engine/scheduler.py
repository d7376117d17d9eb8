"""Continuous batching: which requests run in the next step, and how many of their tokens.

Requests join and leave the running batch at every step. Each step runs one token for each request
that is decoding, and up to `prefill_chunk` prompt tokens, in arrival order, for those still
prefilling, so running decodes keep flowing while a long prompt is read.

A request starts from the longest run of cached pages its tokens begin with (the prefix cache,
`kv_cache.KVPool`). When a step needs a page of the KV cache pool and none is free, the youngest running
request is preempted: its pages are released and it goes back to the front of the queue, to recompute
its cache from its tokens (what is still cached excepted) when it is admitted again (its output so far
stays sent).

A model with linear-attention layers also gives each running request a slot of their per-sequence state
(`engine/state.py`), from admission into the running batch until it leaves it.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from hetero_moe.engine.kv_cache import KVPool
from hetero_moe.engine.request import Request
from hetero_moe.engine.state import StateSlots

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 16  # requests in the running batch at most
    # tokens the KV cache pool holds, all requests together; None: the context times max_batch, or what the
    # free memory holds after loading (`kv_cache.default_pool_tokens`)
    kv_cache_tokens: int | None = None
    prefill_chunk: int = 512  # prompt tokens per step, all prefilling requests together
    page_tokens: int = 16  # tokens per page of the pool
    prefix_cache: bool = True  # reuse the cache pages of earlier requests' identical prefixes
    # host memory for pages evicted from a pool on a GPU (prefix cache); None: 4 GB on a GPU, none on a CPU
    host_cache_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch", "kv_cache_tokens", "prefill_chunk", "page_tokens"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1) and not (name == "kv_cache_tokens" and value is None):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.host_cache_bytes is not None and not (
            isinstance(self.host_cache_bytes, int) and self.host_cache_bytes >= 0
        ):
            raise ValueError(f"host_cache_bytes must be an integer >= 0, got {self.host_cache_bytes!r}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.page_tokens:
            raise ValueError(f"kv_cache_tokens ({self.kv_cache_tokens}) must hold at least one page")


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: KVPool, slots: StateSlots | None = None) -> None:
        self.config, self.pool = config, pool
        self.slots = slots  # one per request the running batch holds; None: the model keeps no such state
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.preempted_total = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Request, int]]:
        """Admit waiting requests while the batch has room; then (request, tokens to run) for this step,
        with their pages reserved: decodes and prefill chunks in admission order, preempting the youngest
        requests when the pool runs out."""
        while self.waiting and len(self.running) < self.config.max_batch:
            request = self.waiting.popleft()
            if self.slots is not None:
                request.slot = self.slots.take()
            self.running.append(request)
        planned: list[tuple[Request, int]] = []
        budget = self.config.prefill_chunk
        for request in list(self.running):
            if request not in self.running:  # preempted for an older request this step
                continue
            if not request.pages:  # admitted (again): start from the longest cached prefix
                request.pages, request.keys = self.pool.match(request.tokens)
                request.computed = request.cached_tokens = len(request.pages) * self.pool.page_tokens
            n = request.pending if request.pending == 1 else min(request.pending, budget)
            if n == 0:
                continue
            while not self.pool.reserve(request.pages, request.computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is request:
                    break
            else:
                planned.append((request, n))
                if request.pending > 1:
                    budget -= n
        return planned

    def remove(self, request_id: int) -> Request | None:
        """Take a request out, running or waiting, and free its pages; None if it is not here."""
        for queue in (self.running, self.waiting):
            for request in queue:
                if request.id == request_id:
                    queue.remove(request)
                    self.pool.release(request.pages)
                    self._release_slot(request)
                    return request
        return None

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.pool.release(request.pages)
        self._release_slot(request)
        request.computed, request.keys = 0, []
        self.waiting.appendleft(request)
        self.preempted_total += 1
        log.info("preempted a request of %d tokens: the KV cache pool is full", len(request.tokens))

    def _release_slot(self, request: Request) -> None:
        if request.slot is not None:
            self.slots.release(request.slot)
            request.slot = None
