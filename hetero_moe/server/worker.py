"""One engine worker thread owns the model and runs the scheduler; requests wait in a bounded queue.

The worker moves jobs from the queue into the scheduler as it has room for them and runs one batched
step after another. Each job streams its steps back to the event loop that submitted it. A job whose
client has gone is dropped between two steps and its KV cache pages freed.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from hetero_moe.engine.engine import Engine, StepOutput
from hetero_moe.engine.sampler import SamplingParams
from hetero_moe.engine.scheduler import Cancelled, Request, Scheduler, SchedulerConfig
from hetero_moe.server.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The queue of waiting requests is full."""


class _Done:
    pass


DONE = _Done()


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)
    first: float | None = None  # when its first token was sent
    sent: int = 0  # tokens sent

    def push(self, item: StepOutput | BaseException | _Done) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    async def steps(self) -> AsyncIterator[StepOutput]:
        """The job's steps as they come; cancels the job if the consumer stops early."""
        try:
            while True:
                item = await self.events.get()
                if isinstance(item, _Done):
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancelled.set()


class EngineWorker:
    def __init__(self, engine: Engine, max_queue: int, metrics: Metrics, batching: SchedulerConfig) -> None:
        self.scheduler = Scheduler(engine, batching)
        self.metrics = metrics
        self.metrics.set(kv_cache_capacity_tokens=self.scheduler.pool.capacity)
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="hetero-moe-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    @property
    def max_sequence(self) -> int:
        """Tokens one request may hold, prompt and generated: the context, or the whole pool if smaller."""
        return min(self.scheduler.engine.max_context, self.scheduler.pool.capacity)

    def submit(self, job: Job) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFullError(f"the server is busy: {self._jobs.maxsize} requests are already waiting") from None
        self.metrics.add("queued", 1)

    def _run(self) -> None:
        sched = self.scheduler
        while True:
            # idle: wait for a job; busy: take what has arrived while the running batch has room for it (the
            # rest waits in the bounded queue)
            while not sched.has_work() or (
                len(sched.running) + len(sched.waiting) < sched.config.max_batch and not self._jobs.empty()
            ):
                job = self._jobs.get()
                if job is None:
                    return
                self._admit(job)
            try:
                sched.step()
            except Exception:  # a bug in the scheduler itself: fail everything in flight, keep serving
                log.exception("scheduler step failed")
                for request in [*sched.running, *sched.waiting]:
                    request.emit(RuntimeError("the engine failed; see the server log"))
                    sched.pool.release(request.pages)
                sched.running.clear()
                sched.waiting.clear()
            self.metrics.set(
                running=len(sched.running),
                queued=self._jobs.qsize() + len(sched.waiting),
                cancelled=sched.cancelled_total,
                preempted=sched.preempted_total,
                kv_cache_used_tokens=sched.pool.used_pages * sched.pool.page_tokens,
                steps=sched.steps_total,
                step_tokens=sched.tokens_total,
                routed_expert_bytes=sched.engine.runner.routed_bytes(),
                decode_steps=sched.decode_steps_total,
                decode_step_tokens=sched.decode_tokens_total,
                decode_routed_expert_bytes=sched.decode_routed_bytes_total,
            )

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.metrics.add("queued", -1)
            self.scheduler.cancelled_total += 1
            job.push(Cancelled("the client went away"))
            return
        request = Request(job.prompt_ids, job.params, lambda item: self._emit(job, item), job.cancelled.is_set)
        try:
            self.scheduler.add(request)
        except Exception as e:  # checked at submission already; a late refusal still reaches its client
            job.push(e)

    def _emit(self, job: Job, item: StepOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            job.push(item)
            return
        now = time.monotonic()
        if job.first is None:
            job.first = now
            self.metrics.first_token(now - job.arrived)
        job.sent += 1
        job.push(item)
        if item.finish_reason is not None:
            self.metrics.finished(len(job.prompt_ids), job.sent, now - job.first)
            job.push(DONE)
