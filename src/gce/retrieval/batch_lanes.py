"""Batches through the model on several threads at once, for throughput (``gce embed``).

One ONNX Runtime session with T intra-op threads splits every operator of a batch T ways and
waits for the slowest part; MobileNet-sized operators are too small for that to pay, and when the
image-decoding processes take a core, one descheduled thread stalls the whole batch. T sessions'
worth of single-threaded runs, one batch each, do the same work without those waits: on the 2-core
machine, 2 lanes x 1 thread embedded 1.09x as many preprocessed images per second as 1 session x
2 threads, and gce embed end to end gained more (docs/retrieval.md). A single query (search, serve)
keeps the multi-threaded session: its latency is what counts there.

Lanes are used for an ONNX Runtime session on CPU with more than one thread; every other runtime
runs its batches one after the other, as before. The single-threaded session runs the same file,
checked against the multi-threaded one on the parity batch with the export bound, so the
embeddings agree with those of the checked session to that bound (bitwise on the models measured).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

from gce.retrieval.runtimes import RUNTIMES, RuntimeUnavailable, parity_difference

if TYPE_CHECKING:
    from gce.retrieval.embedder import Embedder
    from gce.retrieval.runtimes import Runtime

__all__ = ["BatchLanes"]


class BatchLanes:
    """Embeds batches on ``lanes`` threads (results in submission order, at most ``lanes`` in
    flight beyond the one being collected); ``with`` it, or ``close()`` it."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.runtime: Runtime = embedder.runtime
        self.lanes = 1
        self._pool: ThreadPoolExecutor | None = None
        if self.runtime.name == "onnx" and self.runtime.threads > 1 and embedder.device.type == "cpu":
            single = _single_threaded(embedder, self.runtime)
            if single is not None:
                self.runtime, self.lanes = single, self.runtime.threads
                self._pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="gce-embed-lane")
        self._pending: deque[tuple[Future[np.ndarray], np.ndarray]] = deque()

    def submit(self, batch: torch.Tensor, ids: np.ndarray, done: Callable[[np.ndarray, np.ndarray], None]) -> None:
        """Embed ``batch`` (items ``ids``); ``done(embeddings, ids)`` is called for it, in order,
        from this thread, once it and every batch before it are embedded."""
        if self._pool is None:  # the embedder's own runtime, one batch after the other
            done(self.embedder.embed_tensors(batch), ids)
            return
        self._pending.append((self._pool.submit(self.embedder.embed_tensors, batch, self.runtime), ids))
        while len(self._pending) > self.lanes:
            self._collect(done)

    def drain(self, done: Callable[[np.ndarray, np.ndarray], None]) -> None:
        """Wait for every submitted batch, passing each to ``done`` in order."""
        while self._pending:
            self._collect(done)

    def _collect(self, done: Callable[[np.ndarray, np.ndarray], None]) -> None:
        future, ids = self._pending.popleft()
        done(future.result(), ids)

    def close(self) -> None:
        if self._pool is not None:
            for future, _ in self._pending:
                future.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> BatchLanes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _single_threaded(embedder: Embedder, checked: Runtime) -> Runtime | None:
    """A 1-thread session of ``checked``'s file that agrees with it on the parity batch, or None."""
    from gce.retrieval.export import PARITY_LIMIT

    try:
        single = RUNTIMES["onnx"](checked.path, embedder.device, threads=1)  # type: ignore[attr-defined]
    except RuntimeUnavailable:
        return None
    return single if parity_difference(embedder, single, checked) <= PARITY_LIMIT else None
