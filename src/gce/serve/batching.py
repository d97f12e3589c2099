"""Micro-batching: concurrent requests share one model call and one index scan.

A flat index scan reads the whole index from memory once per call whatever the number of queries,
and a CNN forward pass costs much less per image in a batch; so under load, answering the queries
that queued up during the previous call together raises throughput without adding any wait: a
lone request runs at once, as a batch of one.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Job(Generic[T, R]):
    __slots__ = ("done", "error", "item", "result")

    def __init__(self, item: T) -> None:
        self.item = item
        self.result: R | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class MicroBatcher(Generic[T, R]):
    """Call ``fn`` on up to ``max_batch`` queued items at a time, on one worker thread.

    ``fn`` gets a list of items and returns one result per item, in order. Callers block until
    their own result is ready. If ``fn`` raises on a batch of several items, each item is run again
    alone, so that one caller's bad item fails that caller only, never its batch-mates; callers are
    expected to validate their items first, so this fallback is the exception, not the rule.
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], max_batch: int, name: str) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._fn = fn
        self._max_batch = max_batch
        self._queue: deque[_Job[T, R]] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self.batches = 0  # calls of fn so far (for tests and diagnostics)
        self.items = 0
        self.fallbacks = 0  # failed batches answered one item at a time
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    def __call__(self, item: T) -> R:
        job: _Job[T, R] = _Job(item)
        with self._ready:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(job)
            self._ready.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    @property
    def pending(self) -> int:
        """Items waiting for the worker."""
        with self._ready:
            return len(self._queue)

    def close(self) -> None:
        """Finish the queued jobs, then stop the worker."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._worker.join(timeout=60)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
            try:
                results = self._call([job.item for job in batch])
            except BaseException as exc:  # the worker lives on
                if len(batch) == 1:
                    batch[0].error = exc
                else:
                    self._one_by_one(batch)
            else:
                for job, result in zip(batch, results, strict=True):
                    job.result = result
            self.batches += 1
            self.items += len(batch)
            for job in batch:
                job.done.set()

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
