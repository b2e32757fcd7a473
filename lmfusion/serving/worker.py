"""One model, one worker thread, a bounded queue, and batching of compatible image requests.

The model is not thread-safe and a CPU/GPU runs one sampling call at a time best, so every
request becomes a `Job` that one background thread runs. Image jobs with the same sampling
settings (steps, guidance, scheduler) that are waiting together are merged into one sampler
call: the sampler batches prompts and CFG branches in one forward per step, and seeds each
image with its own RNG, so an image is the same alone or in a batch. Batches form from what
queued up while the previous call ran; nothing waits on purpose for company.

A slot in the queue is held from `submit` until the job is taken to run, or is cancelled (the
client timed out or went away). A running job cannot be interrupted mid-call by this class;
a job that streams (text) checks its `cancelled` flag between tokens.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The queue holds `max_queue` waiting jobs; the client should retry later."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work; waiting work is cancelled with this."""


@dataclass(frozen=True)
class ImageWork:
    """n images of one prompt; image k is seeded with seed + k. With `source` (a [3, S, S] image)
    the prompt is an edit instruction and the n images are edits of it."""

    prompt: str
    n: int
    seed: int
    steps: int
    guidance_scale: float
    scheduler: str | None  # None: the model's own
    source: Any = field(default=None, compare=False)
    image_guidance_scale: float | None = None  # edits only
    strength: float = 1.0  # edits only: < 1 starts from the noised source (SDEdit)

    @property
    def batch_key(self) -> tuple:
        """Requests that can share one sampler call: edits only with edits (their prefix and
        guidance branches differ from text-to-image's), and each with the same settings."""
        return (self.steps, self.guidance_scale, self.scheduler, self.source is not None, self.image_guidance_scale,
                self.strength)


@dataclass(eq=False)
class Job:
    """One request's work: an image request (batchable) or any other call on the model."""

    image: ImageWork | None = None
    call: Callable[[threading.Event], Any] | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class WorkerStats:
    jobs_done: int = 0
    batches: int = 0
    images: int = 0
    largest_batch: int = 0
    rejected: int = 0
    cancelled: int = 0


class ModelWorker:
    """Runs jobs one batch at a time on a background thread.

    run_images: maps a list of `ImageWork` (one batch) to one list of images per work item.
    """

    def __init__(self, run_images: Callable[[Sequence[ImageWork]], list[list]], max_queue: int = 64,
                 max_batch_images: int = 16, batching: bool = True):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if max_batch_images < 1:
            raise ValueError(f"max_batch_images must be >= 1, got {max_batch_images}")
        self.run_images = run_images
        self.max_queue, self.max_batch_images, self.batching = max_queue, max_batch_images, batching
        self.stats = WorkerStats()
        self._pending: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._condition = threading.Condition()
        self._stopping = False
        # Not a daemon: the interpreter waits for the running batch at exit. A daemon thread
        # still inside torch when Python finalizes is killed mid-C++ call and aborts the process.
        self._thread = threading.Thread(target=self._loop, name="lmfusion-model-worker")

    # ------------------------------------------------------------------ client side
    def start(self) -> None:
        self._thread.start()

    def submit_images(self, work: ImageWork) -> Job:
        return self._submit(Job(image=work))

    def submit_call(self, call: Callable[[threading.Event], Any]) -> Job:
        """Run `call(cancelled_event)` on the worker thread; its return value is the result."""
        return self._submit(Job(call=call))

    def _submit(self, job: Job) -> Job:
        with self._condition:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self._pending.append(job)
            self._condition.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Give up on a job: a waiting one leaves the queue at once, a running one is flagged."""
        job.cancelled.set()
        with self._condition:
            if job in self._pending:
                self._pending.remove(job)
                self.stats.cancelled += 1
                job.future.cancel()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def begin_shutdown(self) -> None:
        """Take no new jobs and cancel the waiting ones; the running batch finishes."""
        with self._condition:
            self._stopping = True
            while self._pending:
                job = self._pending.popleft()
                job.cancelled.set()
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(ShuttingDown("the server shut down before this request ran"))
            for job in self._running:  # streams stop at their next token
                job.cancelled.set()
            self._condition.notify_all()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker thread to end (after `begin_shutdown`, once the running batch is done)."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stop(self, timeout: float | None = None) -> None:
        self.begin_shutdown()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ worker side
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            finally:
                with self._condition:
                    self._running = []

    def _next_batch(self) -> list[Job] | None:
        with self._condition:
            while not self._pending and not self._stopping:
                self._condition.wait()
            if not self._pending:
                return None
            first = self._pending.popleft()
            batch = [first]
            if first.image is not None and self.batching:
                room = self.max_batch_images - first.image.n
                for job in list(self._pending):
                    if job.image is not None and job.image.batch_key == first.image.batch_key and job.image.n <= room:
                        self._pending.remove(job)
                        batch.append(job)
                        room -= job.image.n
            # A job cancelled just before this point has a cancelled future: skip it.
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            self._running = batch
            return batch

    def _run(self, batch: list[Job]) -> None:
        if not batch:
            return
        try:
            if batch[0].image is not None:
                results = self.run_images([job.image for job in batch])
                self.stats.batches += 1
                self.stats.images += sum(job.image.n for job in batch)
                self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            else:
                results = [batch[0].call(batch[0].cancelled)]
        except Exception as error:  # the handlers turn it into a response; the worker lives on
            for job in batch:
                job.future.set_exception(error)
            return
        self.stats.jobs_done += len(batch)
        for job, result in zip(batch, results):
            job.future.set_result(result)
