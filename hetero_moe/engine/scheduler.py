"""Continuous batching: requests join and leave the running batch at every step, and share one KV
cache pool.

Every `step()` runs one forward over the tokens of all running requests: one token for each that is
decoding, and up to `prefill_chunk` prompt tokens, in arrival order, for those still prefilling, so
running decodes keep flowing while a long prompt is read. Every MoE layer therefore sees all tokens of
the step together and reads each selected expert once.

The pool (`KVPool`) is paged: each request owns whole pages, taken as its tokens arrive. When a step
needs a page and none is free, the youngest running request is preempted: its pages are freed and it
goes back to the front of the queue, to recompute its cache from its tokens when it is admitted again
(its output so far stays sent). A request that could never fit the pool alone is refused when added.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hetero_moe.engine.engine import ContextLengthError, Decoding, Engine, StepOutput
from hetero_moe.engine.sampler import SamplingParams
from hetero_moe.ops.attention import Rows, SeqSlice
from hetero_moe.settings import available_memory

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Sent to a request's `emit` when it is dropped because `cancelled()` said so."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 16  # requests in the running batch at most
    kv_cache_tokens: int = 65536  # tokens the KV cache pool holds, all requests together
    prefill_chunk: int = 512  # prompt tokens per step, all prefilling requests together
    page_tokens: int = 16  # tokens per page of the pool

    def __post_init__(self) -> None:
        for name in ("max_batch", "kv_cache_tokens", "prefill_chunk", "page_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.kv_cache_tokens < self.page_tokens:
            raise ValueError(f"kv_cache_tokens ({self.kv_cache_tokens}) must hold at least one page")


class KVPool:
    """Per decoder layer one cache buffer of `pages x page_tokens` token rows, shared by all requests;
    a request's tokens live in the pages it owns, in order."""

    def __init__(self, buffers: list, pages: int, page_tokens: int, device: torch.device | None = None) -> None:
        self.buffers = buffers
        self.pages, self.page_tokens = pages, page_tokens
        self.device = device or torch.device("cpu")  # where gathered row indices go: the buffers' device
        self._free = list(range(pages - 1, -1, -1))  # a stack: low pages first, so one request's run

    @property
    def capacity(self) -> int:
        return self.pages * self.page_tokens

    @property
    def used_pages(self) -> int:
        return self.pages - len(self._free)

    def reserve(self, owned: list[int], tokens: int) -> bool:
        """Grow `owned` to hold `tokens` tokens; False (nothing taken) when too few pages are free."""
        need = -(-tokens // self.page_tokens) - len(owned)
        if need > len(self._free):
            return False
        owned.extend(self._free.pop() for _ in range(max(need, 0)))
        return True

    def release(self, owned: list[int]) -> None:
        self._free.extend(reversed(owned))
        owned.clear()

    def rows(self, owned: list[int], begin: int, end: int) -> Rows:
        """Buffer rows of a request's tokens `begin .. end - 1`: a range when they are contiguous."""
        p = self.page_tokens
        first, last = begin // p, (end - 1) // p
        pages = owned[first : last + 1]
        if pages == list(range(pages[0], pages[0] + len(pages))):
            base = pages[0] * p - first * p
            return slice(base + begin, base + end)
        rows = (torch.tensor(pages)[:, None] * p + torch.arange(p)).flatten()
        return rows[begin - first * p : end - first * p].to(self.device)


GPU_RESERVE = 2 << 30  # bytes left free on a GPU after the default pool: activations, allocator slack
CPU_SHARE = 0.25  # of the available DRAM the default pool may take when the cache lives there


def default_pool_tokens(runner, wanted: int) -> int:
    """`wanted` tokens of KV cache, or fewer if this box's free memory holds fewer: the GPU's free memory
    less a reserve, a quarter of the available DRAM; whole pages of 16 tokens, at least one page."""
    per_token: dict[torch.device, int] = {}
    for layer in runner.layers:
        dev = layer.self_attn.device
        per_token[dev] = per_token.get(dev, 0) + layer.self_attn.cache_bytes(1, runner.dtype)
    tokens = wanted
    for dev, nbytes in per_token.items():
        if dev.type == "cuda":
            free = torch.cuda.mem_get_info(dev)[0] - GPU_RESERVE
        else:
            available = available_memory()
            free = available * CPU_SHARE if available is not None else tokens * nbytes
        tokens = min(tokens, int(free // nbytes))
    if tokens < 16:
        raise ValueError(
            "no memory is left for the KV cache after loading the model; give --kv-cache-tokens, "
            "a smaller model placement, or free memory"
        )
    return tokens // 16 * 16


@dataclass
class Request:
    """One generation. `emit` receives each step (the last has a finish reason) or an exception (`Cancelled`
    when `cancelled()`, polled between steps, said so), on the scheduler's thread."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[StepOutput | BaseException], None]
    cancelled: Callable[[], bool] = lambda: False
    tokens: list[int] = field(default_factory=list)  # prompt and generated tokens, all bound for the cache
    computed: int = 0  # leading tokens already in the cache
    pages: list[int] = field(default_factory=list)
    decoding: Decoding | None = None


class Scheduler:
    def __init__(self, engine: Engine, config: SchedulerConfig) -> None:
        self.engine, self.config = engine, config
        pages = config.kv_cache_tokens // config.page_tokens
        runner = engine.runner
        buffers = runner.new_buffers(pages * config.page_tokens)
        self.pool = KVPool(buffers, pages, config.page_tokens, runner.layers[0].self_attn.device)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.cancelled_total = 0
        self.preempted_total = 0
        self.steps_total = 0  # forwards run
        self.tokens_total = 0  # tokens they ran
        # decode-only steps (one token per request, no prompt chunk): the batched roofline's own counts
        self.decode_steps_total = 0
        self.decode_tokens_total = 0
        self.decode_routed_bytes_total = 0

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Refuse what can never run: a bad prompt, or more cache than the whole pool."""
        self.engine.check_prompt(prompt_ids)
        need = min(len(prompt_ids) + params.max_tokens, self.engine.max_context)
        if need > self.pool.capacity:
            raise ContextLengthError(
                f"the request needs up to {need} tokens of KV cache (prompt and max_tokens); the server's pool "
                f"holds {self.pool.capacity} (--kv-cache-tokens); lower max_tokens or shorten the prompt"
            )

    def add(self, request: Request) -> None:
        self.check(request.prompt_ids, request.params)
        request.tokens = list(request.prompt_ids)
        request.decoding = Decoding(self.engine, request.prompt_ids, request.params)
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> None:
        """Admit, plan, run one forward over the planned tokens, sample and emit."""
        self._drop_cancelled()
        while self.waiting and len(self.running) < self.config.max_batch:
            self.running.append(self.waiting.popleft())
        planned = self._plan()
        if not planned:
            return
        ids, positions, seqs, rows, sampled = [], [], [], [], []
        for request, n in planned:
            start = request.computed
            seqs.append(
                SeqSlice(
                    len(ids),
                    n,
                    start,
                    self.pool.rows(request.pages, start, start + n),
                    self.pool.rows(request.pages, 0, start + n),
                )
            )
            ids += request.tokens[start : start + n]
            positions += range(start, start + n)
            if start + n == len(request.tokens):  # its last token: sample the next one
                rows.append(len(ids) - 1)
                sampled.append(request)
        runner = self.engine.runner
        streamed = runner.routed_bytes()
        try:
            logits = runner.forward_batch(torch.tensor(ids), torch.tensor(positions), self.pool.buffers, seqs, rows)
        except Exception as e:  # fail this batch's requests, keep serving
            log.exception("batch of %d requests failed", len(planned))
            for request, _ in planned:
                self._finish(request, e)
            return
        self.steps_total += 1
        self.tokens_total += len(ids)
        if len(ids) == len(planned):  # decodes only
            self.decode_steps_total += 1
            self.decode_tokens_total += len(ids)
            self.decode_routed_bytes_total += runner.routed_bytes() - streamed
        for request, n in planned:
            request.computed += n
        for request, row in zip(sampled, logits, strict=True):
            step = request.decoding.step(row)
            request.tokens.append(step.token_id)
            if step.finish_reason is not None:
                self._finish(request, step)
            else:
                request.emit(step)

    def _plan(self) -> list[tuple[Request, int]]:
        """(request, tokens to run) for this step, with their pages reserved; decodes and prefill chunks
        in admission order, preempting the youngest requests when the pool runs out."""
        planned: list[tuple[Request, int]] = []
        budget = self.config.prefill_chunk
        for request in list(self.running):
            if request not in self.running:  # preempted for an older request this step
                continue
            n = len(request.tokens) - request.computed
            if n > 1:
                n = min(n, budget)
                if n == 0:
                    continue
            while not self.pool.reserve(request.pages, request.computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is request:
                    break
            else:
                planned.append((request, n))
                if len(request.tokens) - request.computed > 1:
                    budget -= n
        return planned

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.pool.release(request.pages)
        request.computed = 0
        self.waiting.appendleft(request)
        self.preempted_total += 1
        log.info("preempted a request of %d tokens: the KV cache pool is full", len(request.tokens))

    def _drop_cancelled(self) -> None:
        for queue in (self.running, self.waiting):
            for request in [r for r in queue if r.cancelled()]:
                queue.remove(request)
                self.pool.release(request.pages)
                self.cancelled_total += 1
                request.emit(Cancelled("the client went away"))

    def _finish(self, request: Request, last: StepOutput | BaseException) -> None:
        self.running.remove(request)
        self.pool.release(request.pages)
        request.emit(last)
