"""Micro-batching: concurrent requests share one model call and one index scan.

A flat index scan reads the whole index from memory once per call whatever the number of queries,
and a CNN forward pass costs much less per image in a batch; so under load, answering the queries
that queued up during the previous call together raises throughput without adding any wait: a
lone request runs at once, as a batch of one, on its own thread (no hand-off to a worker).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Job(Generic[T, R]):
    __slots__ = ("done", "error", "item", "lead", "result", "wake")

    def __init__(self, item: T) -> None:
        self.item = item
        self.result: R | None = None
        self.error: BaseException | None = None
        self.done = False
        self.lead = False  # this job's caller is to run the next batch
        self.wake = threading.Event()  # set when done or when made the leader


class MicroBatcher(Generic[T, R]):
    """Call ``fn`` on up to ``max_batch`` queued items at a time, one batch at a time.

    ``fn`` gets a list of items and returns one result per item, in order. Callers block until
    their own result is ready. There is no worker thread: a caller that finds no batch running runs
    one itself (a lone request: no thread hand-off at all), with the items queued meanwhile; when
    it is done it makes the oldest waiting caller the next leader, so a batch costs one wake-up
    more than its callers' own. If ``fn`` raises on a batch of several items, each item is run
    again alone, so that one caller's bad item fails that caller only, never its batch-mates;
    callers are expected to validate their items first, so this fallback is the exception.
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], max_batch: int, name: str) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._fn = fn
        self._max_batch = max_batch
        self.name = name
        self._queue: deque[_Job[T, R]] = deque()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._running = False  # a leader is running a batch (or about to)
        self._closed = False
        self.batches = 0  # calls of fn so far (for tests and diagnostics)
        self.items = 0
        self.fallbacks = 0  # failed batches answered one item at a time

    def __call__(self, item: T) -> R:
        job: _Job[T, R] = _Job(item)
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(job)
            job.lead = not self._running
            self._running = True
        while not job.done:
            if job.lead:
                job.lead = False
                self._lead()
            else:
                job.wake.wait()
                job.wake.clear()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    @property
    def pending(self) -> int:
        """Items waiting for a batch."""
        with self._lock:
            return len(self._queue)

    def close(self, timeout_s: float = 60.0) -> None:
        """Refuse new items; wait (bounded) until the running and queued batches are answered."""
        with self._idle:
            self._closed = True
            self._idle.wait_for(lambda: not self._running, timeout=timeout_s)

    def _lead(self) -> None:
        """Run one batch from the head of the queue, then pass the lead on (or go idle)."""
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
        try:
            results = self._call([job.item for job in batch])
        except BaseException as exc:  # every caller gets an answer
            if len(batch) == 1:
                batch[0].error = exc
            else:
                self._one_by_one(batch)
        else:
            for job, result in zip(batch, results, strict=True):
                job.result = result
        with self._lock:
            self.batches += 1
            self.items += len(batch)
            for job in batch:
                job.done = True
                job.wake.set()
            if self._queue:
                successor = self._queue[0]
                successor.lead = True
                successor.wake.set()
            else:
                self._running = False
                self._idle.notify_all()

    def _call(self, items: list[T]) -> list[R]:
        results = list(self._fn(items))
        if len(results) != len(items):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        return results

    def _one_by_one(self, batch: list[_Job[T, R]]) -> None:
        """Each job of a failed batch alone: its own result, or its own error."""
        self.fallbacks += 1
        for job in batch:
            try:
                job.result = self._call([job.item])[0]
            except BaseException as exc:
                job.error = exc
