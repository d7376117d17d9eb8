"""One engine worker thread owns the engine and steps it; requests wait in a bounded queue.

The worker moves jobs from the queue into the engine while the running batch has room for them, and
steps the engine. Each job's tokens go back to the event loop that submitted it. A job whose client
has gone is aborted between two steps, which frees its KV cache pages.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

from hetero_moe.engine.engine import Engine, EngineStats
from hetero_moe.engine.request import Cancelled, Event, StepOutput
from hetero_moe.engine.sampler import SamplingParams
from hetero_moe.server import openai_format as fmt
from hetero_moe.server.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The queue of waiting requests is full."""


class _Done:
    pass


DONE = _Done()


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop | None  # the HTTP handler's; None for a job of another thread (`sink`)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    sink: queue.Queue | None = None  # (job, item) pairs, for a job of the Python API while serving
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)
    first: float | None = None  # when its first token was sent
    sent: int = 0  # tokens sent
    cached_tokens: int = 0  # of its prompt, read from the prefix cache

    def usage(self, completion_tokens: int) -> dict:
        return fmt.usage(len(self.prompt_ids), completion_tokens, self.cached_tokens)

    def push(self, item: StepOutput | BaseException | _Done) -> None:
        if self.sink is not None:
            self.sink.put((self, item))
        else:
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
    def __init__(self, engine: Engine, max_queue: int, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.stats: EngineStats = engine.stats()  # after the last step: what /metrics shows
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._active: dict[int, Job] = {}  # request id -> job, for the requests in the engine
        self._thread = threading.Thread(target=self._run, name="hetero-moe-engine", daemon=True)
        self._driven: tuple[Engine, ...] = ()

    def start(self, *others: Engine) -> None:
        """Start stepping; from now on `stream` on this engine, and on `others` (engines over the same model),
        comes here: one thread runs the model. A model another running server steps is refused: two threads
        would run it at once, and when one server stopped, the Python API would step it beside the other."""
        driven = (self.engine, *others)
        if any(engine.driver is not None for engine in driven):
            raise RuntimeError("this model is already served by a running server in this process; stop that one first")
        self._driven = driven
        for engine in driven:
            engine.driver = self
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)
        for engine in self._driven:
            engine.driver = None

    def stream(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> Iterator[tuple[int, StepOutput]]:
        """`Engine.stream` for another thread of this process (the Python API while a server runs on the same
        engine): its requests wait in the queue (for room, if it is full) and run in the batch beside the
        server's. Closing the iterator early cancels what is left."""
        sink: queue.Queue = queue.Queue()
        jobs = [Job(list(p), sp, None, sink=sink) for p, sp in zip(prompts, params, strict=True)]
        index = {id(job): i for i, job in enumerate(jobs)}
        try:
            for job in jobs:
                self._jobs.put(job)
            left = len(jobs)
            while left:
                job, item = sink.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _Done):
                    left -= 1
                else:
                    yield index[id(job)], item
        finally:
            for job in jobs:
                job.cancelled.set()

    @property
    def queued(self) -> int:
        """Requests waiting: in the queue, or in the engine without a place in the running batch."""
        return self._jobs.qsize() + self.stats.waiting

    def submit(self, job: Job) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFullError(f"the server is busy: {self._jobs.maxsize} requests are already waiting") from None

    def _run(self) -> None:
        engine = self.engine
        while True:
            # idle: wait for a job; busy: take what has arrived while the running batch has room for it (the
            # rest waits in the bounded queue)
            while not engine.has_work() or (len(self._active) < engine.config.max_batch and not self._jobs.empty()):
                job = self._jobs.get()
                if job is None:
                    return
                self._admit(job)
            self._abort_cancelled()
            try:
                events = engine.step()
            except Exception:  # a bug in the engine itself: fail everything in flight, keep serving
                log.exception("engine step failed")
                events = engine.fail_all(RuntimeError("the engine failed; see the server log"))
            self.stats = engine.stats()  # before the tokens go out: a client that has them sees their step counted
            for event in events:
                self._deliver(event)

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.metrics.add("cancelled_waiting", 1)
            job.push(Cancelled("the client went away"))
            return
        try:
            request_id = self.engine.add_request(job.prompt_ids, job.params)
        except Exception as e:  # checked at submission already; a late refusal still reaches its client
            job.push(e)
            return
        self._active[request_id] = job

    def _abort_cancelled(self) -> None:
        for request_id, job in list(self._active.items()):
            if job.cancelled.is_set():
                self.engine.abort(request_id)
                del self._active[request_id]
                job.push(Cancelled("the client went away"))

    def _deliver(self, event: Event) -> None:
        job = self._active[event.request_id]
        job.cached_tokens = event.cached_tokens
        if event.finished:
            del self._active[event.request_id]
        if isinstance(event.output, BaseException):
            job.push(event.output)
            return
        now = time.monotonic()
        if job.first is None:
            job.first = now
            self.metrics.first_token(now - job.arrived)
        job.sent += 1
        job.push(event.output)
        if event.finished:
            self.metrics.finished(len(job.prompt_ids), job.sent, now - job.first)
            job.push(DONE)
