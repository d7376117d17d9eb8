"""The engine: one loop for every entry point (the server's worker, `LLM.generate` and `LLM.chat`, the
CLI's `generate`, `chat`, `batch` and `profile`, `bench decode`).

`step()` schedules (which requests, how many tokens each), runs one forward over all those tokens,
then samples, detokenizes and checks the stops of each request whose last token ran. A batch of one is
the same code as a batch of 32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from hetero_moe.engine.kv_cache import Batch, HostTier, KVPool, cache_bytes_per_token, default_pool_tokens
from hetero_moe.engine.request import ContextLengthError, Decoding, Event, Request, StepOutput
from hetero_moe.engine.runner import ModelRunner
from hetero_moe.engine.sampler import SamplingParams
from hetero_moe.engine.scheduler import Scheduler, SchedulerConfig
from hetero_moe.engine.state import StateSlots
from hetero_moe.ops.linear_attention import token_mixer

log = logging.getLogger(__name__)


class Driver(Protocol):
    """A thread that alone steps an engine (the server's worker) and takes other threads' requests."""

    def stream(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> Iterator[tuple[int, StepOutput]]: ...


@dataclass(frozen=True)
class EngineStats:
    running: int  # requests in the running batch
    waiting: int  # requests admitted but not running (the batch is full, or preempted)
    kv_cache_used_tokens: int
    kv_cache_capacity_tokens: int
    cancelled_total: int
    preempted_total: int
    steps_total: int  # forwards run
    step_tokens_total: int  # tokens they ran
    routed_expert_bytes_total: int  # weight bytes the routed experts streamed
    # decode-only steps (one token per request, no prompt chunk): the batched roofline's own counts
    decode_steps_total: int
    decode_step_tokens_total: int
    decode_routed_expert_bytes_total: int
    # the prefix cache
    prefix_lookups_total: int  # requests admitted that looked for a cached prefix
    prefix_hit_tokens_total: int  # prompt tokens taken from it instead of computed
    prefix_cached_pages: int  # pages whose content is kept for reuse
    prefix_evictions_total: int  # cached pages whose memory was needed for others
    host_tier_pages_loaded_total: int  # pages copied back from the host tier instead of recomputed


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        max_context: int,
        config: SchedulerConfig,
    ) -> None:
        self.runner, self.tokenizer, self.eos_ids, self.max_context = runner, tokenizer, eos_ids, max_context
        if runner.recurrent and config.prefix_cache:
            log.info(
                "prefix cache off: this model's linear-attention layers keep a state per sequence, "
                "which cached pages do not hold"
            )
            config = dataclasses.replace(config, prefix_cache=False)
        tokens = config.kv_cache_tokens
        if tokens is None:
            per_token = cache_bytes_per_token(runner.layers, runner.dtype)
            wanted, mapped = config.max_batch * max_context, runner.placed.mapped_bytes()
            tokens = default_pool_tokens(per_token, wanted, mapped, runner.state_bytes(config.max_batch))
        self.config = config = dataclasses.replace(config, kv_cache_tokens=tokens)
        pages = tokens // config.page_tokens
        buffers = runner.new_buffers(pages * config.page_tokens, slots=config.max_batch)
        self.pool = KVPool(
            buffers,
            pages,
            config.page_tokens,
            runner.cache_device,
            prefix_cache=config.prefix_cache,
            salt=cache_salt(runner),
            host=host_tier(runner, config),
        )
        # the linear-attention layers' state: a slot for each request of the running batch
        self.scheduler = Scheduler(config, self.pool, StateSlots(config.max_batch) if runner.recurrent else None)
        # a thread that steps this engine for everyone (the server's worker): `stream` hands its requests over
        self.driver: Driver | None = None
        self._ids = itertools.count()
        self._requests: dict[int, Request] = {}
        self._counts = dict.fromkeys(
            ("cancelled", "steps", "tokens", "decode_steps", "decode_tokens", "decode_routed_bytes"), 0
        )

    @property
    def max_sequence(self) -> int:
        """Tokens one request may hold, prompt and generated: the context, or the whole pool if smaller."""
        return min(self.max_context, self.pool.capacity)

    def check_prompt(self, prompt_ids: Sequence[int], max_tokens: int = 1) -> None:
        """Refuse what can never run: an empty prompt, ids outside the vocabulary, or a prompt that leaves
        no room for `max_tokens` new tokens (at least one) in the context or the whole KV cache pool."""
        if not prompt_ids:
            raise ContextLengthError("the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.runner.vocab_size]
        if bad:
            raise ContextLengthError(f"token id {bad[0]} is outside the vocabulary of {self.runner.vocab_size}")
        if len(prompt_ids) >= self.max_context:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_context}, "
                "with room for at least one new token"
            )
        need = min(len(prompt_ids) + max_tokens, self.max_context)
        if need > self.pool.capacity:
            raise ContextLengthError(
                f"the request needs up to {need} tokens of KV cache (prompt and max_tokens); the pool holds "
                f"{self.pool.capacity} (--kv-cache-tokens); lower max_tokens or shorten the prompt"
            )

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> int:
        """Queue a request; its id names it in `step`'s events and to `abort`."""
        prompt_ids = list(prompt_ids)
        self.check_prompt(prompt_ids, params.max_tokens)
        limit = min(len(prompt_ids) + params.max_tokens, self.max_context)
        decoding = Decoding(self.tokenizer, self.eos_ids, self.runner.vocab_size, limit, prompt_ids, params)
        request = Request(next(self._ids), prompt_ids, decoding)
        self._requests[request.id] = request
        self.scheduler.add(request)
        return request.id

    def abort(self, request_id: int) -> bool:
        """Drop a request, running or waiting, and free its cache; False if it is not here (any more)."""
        request = self.scheduler.remove(request_id)
        if request is None:
            return False
        del self._requests[request_id]
        self._counts["cancelled"] += 1
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Event]:
        """Schedule, run one forward, sample: the new token (or the error) of each request that got one."""
        planned = self.scheduler.schedule()
        if not planned:
            return []
        parts = [(r.tokens, r.pages, r.computed, n) for r, n in planned]
        batch = Batch.of(self.pool, parts, [r.slot or 0 for r, _ in planned])
        streamed = self.runner.routed_bytes()
        try:
            logits = self.runner.forward(batch, self.pool.buffers)
        except Exception as e:  # fail this batch's requests, keep serving
            log.exception("a batch of %d requests failed", len(planned))
            return [self._end(request, e) for request, _ in planned]
        self._count(batch, self.runner.routed_bytes() - streamed)
        sampled = [request for request, n in planned if request.computed + n == len(request.tokens)]
        for request, n in planned:
            request.computed += n
            self.pool.commit(request.pages, request.keys, request.tokens, request.computed)
        return [self._sample(request, row) for request, row in zip(sampled, logits, strict=True)]

    def fail_all(self, error: BaseException) -> list[Event]:
        """End every request in the engine with `error` (after a failure of the engine itself)."""
        return [self._end(request, error) for request in list(self._requests.values())]

    def stats(self) -> EngineStats:
        c = self._counts
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_cache_used_tokens=self.pool.used_pages * self.pool.page_tokens,
            kv_cache_capacity_tokens=self.pool.capacity,
            cancelled_total=c["cancelled"],
            preempted_total=self.scheduler.preempted_total,
            steps_total=c["steps"],
            step_tokens_total=c["tokens"],
            routed_expert_bytes_total=self.runner.routed_bytes(),
            decode_steps_total=c["decode_steps"],
            decode_step_tokens_total=c["decode_tokens"],
            decode_routed_expert_bytes_total=c["decode_routed_bytes"],
            prefix_lookups_total=self.pool.lookups,
            prefix_hit_tokens_total=self.pool.hit_tokens,
            prefix_cached_pages=self.pool.cached_pages,
            prefix_evictions_total=self.pool.evictions,
            host_tier_pages_loaded_total=self.pool.host.loaded if self.pool.host else 0,
        )

    def stream(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> Iterator[tuple[int, StepOutput]]:
        """Run `prompts` (token ids) together; yields (prompt index, step) as tokens come. Closing the
        iterator early aborts what is left. While a driver steps this engine (a server is running on it),
        the requests go to the driver and are batched with everyone else's: one thread steps an engine."""
        if self.driver is not None:
            return self.driver.stream(prompts, params)
        return self._stream(prompts, params)

    def _stream(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> Iterator[tuple[int, StepOutput]]:
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        index = {rid: i for i, rid in enumerate(ids)}
        left = set(ids)
        try:
            while left:
                for event in self.step():
                    if event.request_id not in index:
                        continue
                    if isinstance(event.output, BaseException):
                        raise event.output
                    if event.finished:
                        left.discard(event.request_id)
                    yield index[event.request_id], event.output
        finally:
            for rid in left:
                self.abort(rid)

    def close(self) -> None:
        """Stop the model's worker threads; the engine cannot step afterwards."""
        self.runner.close()

    def _sample(self, request: Request, logits) -> Event:
        try:
            out = request.decoding.step(logits)
        except Exception as e:  # a failure of this request's own sampling ends it alone
            log.exception("sampling failed for request %d", request.id)
            return self._end(request, e)
        request.tokens.append(out.token_id)
        if out.finish_reason is not None:
            return self._end(request, out)
        return Event(request.id, out, request.cached_tokens)

    def _end(self, request: Request, last: StepOutput | BaseException) -> Event:
        if self._requests.pop(request.id, None) is not None:
            self.scheduler.remove(request.id)
        return Event(request.id, last, request.cached_tokens)

    def _count(self, batch: Batch, routed_bytes: int) -> None:
        c = self._counts
        c["steps"] += 1
        c["tokens"] += len(batch.ids)
        if batch.decode_only:
            c["decode_steps"] += 1
            c["decode_tokens"] += len(batch.ids)
            c["decode_routed_bytes"] += routed_bytes


def cache_salt(runner: ModelRunner) -> bytes:
    """What the content of a cache page depends on besides its tokens: the model (its config), the cache
    dtype, and each layer's attention op and placement."""
    attention = [(type(m).__name__, str(m.device), getattr(m, "absorb", False)) for m in runner.mixers]
    text = repr((runner.config.to_json_string(), str(runner.dtype), attention))
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


HOST_TIER_DEFAULT = 4 << 30  # bytes of host memory for pages evicted from a pool on a GPU


def host_tier(runner: ModelRunner, config: SchedulerConfig) -> HostTier | None:
    """The host tier of a pool on a GPU (or of any pool, given `host_cache_bytes` explicitly)."""
    nbytes = config.host_cache_bytes
    if nbytes is None:
        nbytes = HOST_TIER_DEFAULT if runner.cache_device.type == "cuda" else 0
    per_page = sum(cache_bytes_per_token(runner.layers, runner.dtype).values()) * config.page_tokens
    pages = nbytes // per_page
    if not config.prefix_cache or pages == 0:
        return None
    cpu = torch.device("cpu")
    buffers = [token_mixer(x).new_cache(pages * config.page_tokens, runner.dtype, cpu) for x in runner.layers]
    return HostTier(buffers, pages, config.page_tokens)
