"""One engine worker thread owns the model; requests wait in a bounded queue.

Each job streams its steps back to the event loop that submitted it. A job whose client has gone
is cancelled between two decode steps: its generator is closed and its KV cache freed.
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
    def __init__(self, engine: Engine, max_queue: int, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="hetero-moe-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFullError(f"the server is busy: {self._jobs.maxsize} requests are already waiting") from None
        self.metrics.add("queued", 1)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self.metrics.add("queued", -1)
            if job.cancelled.is_set():
                self.metrics.add("cancelled", 1)
                continue
            self.metrics.add("running", 1)
            try:
                self._generate(job)
            except Exception as e:  # one request's failure must not take the server down
                log.exception("request failed")
                job.push(e)
            finally:
                self.metrics.add("running", -1)

    def _generate(self, job: Job) -> None:
        steps = self.engine.stream(job.prompt_ids, job.params)
        n, first = 0, None
        try:
            for step in steps:
                if job.cancelled.is_set():
                    self.metrics.add("cancelled", 1)
                    return
                n += 1
                if first is None:
                    first = time.monotonic()
                    self.metrics.first_token(first - job.arrived)
                job.push(step)
        finally:
            steps.close()  # frees the sequence's KV cache now, also when cancelled
        self.metrics.finished(len(job.prompt_ids), n, time.monotonic() - first if first else 0.0)
        job.push(DONE)
