"""The search service without HTTP: query parsing, embedding, search, thumbnails, all thread-safe.

The FastAPI app (``gce.serve.app``) is a thin layer over :class:`SearchService`; everything that
can go wrong with a request raises :class:`RequestError` with its 4xx status here.
"""

from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gce import __version__
from gce.data.images import load_rgb
from gce.errors import BadImageError, GceError
from gce.retrieval.filters import FilterError, ItemFilter, parse_filter
from gce.retrieval.index import query_vectors
from gce.serve import queries
from gce.serve.batching import MicroBatcher
from gce.serve.errors import RequestError
from gce.serve.settings import ServeSettings
from gce.serve.uploads import decode_upload


class SearchService:
    """Answers searches against one index with one embedding model.

    ``index`` is a :class:`gce.retrieval.SearchIndex`; ``embedder`` a :class:`gce.retrieval.Embedder`
    of the same model (or ``None``: searches by item id only). Model calls and index scans each run
    one batch at a time, with the requests queued meanwhile (:mod:`gce.serve.batching`);
    at most ``settings.max_parallel_decodes`` uploads are decoded at once, which bounds memory.
    """

    def __init__(
        self,
        index: Any,
        embedder: Any | None,
        settings: ServeSettings | None = None,
        index_dir: str | Path | None = None,
    ) -> None:
        self.index = index
        self.embedder = embedder
        self.settings = settings or ServeSettings()
        self.index_dir = Path(index_dir) if index_dir is not None else None
        if embedder is not None:  # refuse to embed queries with another model than the index's
            index.check_model(embedder.model_id, "the checkpoint")
            embedder.runtime  # noqa: B018  (opened now: an export or a fallback happens at start-up)
        self._index_lock = threading.Lock()  # the index is used by one thread at a time
        batch = self.settings.max_batch
        self._embed = MicroBatcher(self._embed_batch, batch, "gce-serve-embed") if embedder is not None else None
        self._search = MicroBatcher(self._search_batch, batch, "gce-serve-search")
        self._decode_slots = threading.BoundedSemaphore(self.settings.max_parallel_decodes)
        self._thumbnails: OrderedDict[int, bytes] = OrderedDict()
        self._thumbnail_lock = threading.Lock()

    # -- description -------------------------------------------------------------------------------

    @property
    def max_k(self) -> int:
        return min(self.settings.max_k, int(self.index.size))

    def info(self) -> dict[str, Any]:
        index = self.index
        return {
            "version": __version__,
            "model_id": index.model_id,
            "num_learners": int(index.num_learners),
            "embedding_dim": int(index.dim),
            "learner_slices": [[int(a), int(b)] for a, b in _slices(index.learner_slices)],
            "index_type": index.index_type,
            "index_size": int(index.size),  # live items
            "index_deleted": int(getattr(index, "deleted", 0)),
            "image_size": int(self.embedder.image_size) if self.embedder is not None else None,
            "uploads": self.embedder is not None,
            "limits": {
                "max_upload_bytes": self.settings.max_upload_bytes,
                "max_pixels": self.settings.max_pixels,
                "max_k": self.max_k,
                "default_k": min(self.settings.default_k, self.max_k),
            },
        }

    # -- parsing -----------------------------------------------------------------------------------

    def check_k(self, k: int | None, *, exclude_self: bool = False) -> int:
        size = int(self.index.size)
        top = min(self.settings.max_k, size - exclude_self)  # an item query drops the item
        if top < 1:  # an item query on a one-item index: there is nothing else to find
            raise RequestError(422, f"the index has {size} item(s): no other item to search for")
        if k is None:
            return min(self.settings.default_k, top)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= top:
            raise RequestError(422, f"k must be between 1 and {top}, got {k!r}")
        return int(k)

    def parse_learners(self, text: str | None) -> list[int] | None:
        """``"0,2"`` -> ``[0, 2]``; empty or missing -> ``None`` (all learners)."""
        return queries.parse_learners(text, int(self.index.num_learners))

    def parse_weights(self, text: str | None) -> list[float] | None:
        """``"1,0.5,1,1"`` -> one non-negative weight per learner of the model."""
        return queries.parse_weights(text, int(self.index.num_learners))

    def parse_filter(self, texts: Sequence[str] | None) -> ItemFilter | None:
        """The ``filter`` texts of a request (:mod:`gce.retrieval.filters`), ANDed; a bad one is a 400."""
        try:
            return parse_filter(list(texts) if texts else None)
        except FilterError as exc:
            raise RequestError(400, str(exc)) from None

    def check_query(
        self,
        query: np.ndarray,
        learners: Sequence[int] | None,
        weights: Sequence[float] | None,
        filter: ItemFilter | None = None,
    ) -> _SearchJob:
        """Everything about one query that the batched scan would refuse, refused here, before the
        query joins a batch: one request's bad input must never become its batch-mates' error."""
        if learners is not None and weights is not None:
            raise RequestError(422, "give learners or weights, not both")
        count = int(self.index.num_learners)
        chosen = tuple(queries.check_learners(learners, count)) if learners is not None else None
        weighted = tuple(queries.check_weights(weights, count)) if weights is not None else None
        try:  # the scan's own preparation of the query, on this one query: the same rule, no drift
            query_vectors(query, self.index.learner_slices, chosen, weighted)
        except GceError as exc:
            raise RequestError(422, str(exc)) from None
        return _SearchJob(np.asarray(query, dtype=np.float32).reshape(-1), 0, chosen, weighted, filter)

    def item_id(self, item: int) -> int:
        """The id if the index holds it, else a 404."""
        try:
            self.index.item(item)
        except (KeyError, IndexError, ValueError, TypeError):
            deleted = int(getattr(self.index, "deleted", 0))
            gone = f", {deleted} deleted" if deleted else ""
            raise RequestError(404, f"unknown item id {item} (the index has {self.index.size} items{gone})") from None
        return item

    # -- searching ---------------------------------------------------------------------------------

    def search_upload(
        self,
        data: bytes,
        k: int | None,
        learners: list[int] | None,
        weights: list[float] | None,
        filter: ItemFilter | None = None,
    ) -> dict[str, Any]:
        if self.embedder is None or self._embed is None:  # (both are set, or neither)
            raise RequestError(409, "this service was started without a checkpoint: search by item id only")
        k = self.check_k(k)
        started = time.perf_counter()
        with self._decode_slots:  # the decoded image is the big thing: at most this many at once
            image = decode_upload(data, max_bytes=self.settings.max_upload_bytes, max_pixels=self.settings.max_pixels)
            try:
                tensor = self.embedder.transform(image)  # the model's preprocessing: a small tensor
            finally:
                image.close()
        query = self._embed(tensor)
        hits = self._find(query, k, learners, weights, filter)
        return self._response(
            {"type": "upload", "id": None, "thumbnail": None}, k, learners, weights, filter, hits, started
        )

    def search_item(
        self,
        item: int,
        k: int | None,
        learners: list[int] | None,
        weights: list[float] | None,
        filter: ItemFilter | None = None,
    ) -> dict[str, Any]:
        item = self.item_id(item)
        k = self.check_k(k, exclude_self=True)
        started = time.perf_counter()
        with self._index_lock:
            try:
                query = np.asarray(self.index.embedding(item), dtype=np.float32).reshape(-1)
            except KeyError:  # deleted since item_id looked
                raise RequestError(404, f"unknown item id {item}") from None
        hits = [hit for hit in self._find(query, k + 1, learners, weights, filter) if hit.id != item][:k]
        query_info = {"type": "item", "id": item, "thumbnail": thumbnail_url(item)}
        return self._response(query_info, k, learners, weights, filter, hits, started)

    def _find(self, query: np.ndarray, k: int, learners, weights, filter: ItemFilter | None = None) -> list:
        job = replace(self.check_query(query, learners, weights, filter), k=k)
        try:
            return self._search(job)
        except GceError as exc:  # validated above; kept so that a refusal is never a 500
            raise RequestError(422, str(exc)) from None

    # -- the batch functions (each runs on its batcher's worker thread) ------------------------------

    def _embed_batch(self, tensors: list[torch.Tensor]) -> list[np.ndarray]:
        """Embed a batch; for PyTorch padded to a power of two: its CPU backend (oneDNN) keeps compiled
        kernels per input shape, so 32 different batch sizes would hold ~300 MiB more than 6
        (measured). ONNX Runtime needs no padding (which would cost up to 2x the model's work)."""
        assert self.embedder is not None  # this batcher exists only with an embedder
        n = len(tensors)
        size = n
        if getattr(self.embedder.runtime, "pads_batches", True):
            size = min(1 << (n - 1).bit_length(), max(n, self.settings.max_batch))
        batch = torch.stack(tensors + [tensors[-1]] * (size - n))
        return list(np.asarray(self.embedder.embed_tensors(batch)[:n], dtype=np.float32))

    def _search_batch(self, jobs: list[_SearchJob]) -> list[list]:
        """One index scan per distinct (learners, weights, filter) among the queued queries."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for n, job in enumerate(jobs):
            groups[(job.learners, job.weights, job.filter)].append(n)
        results: list[list] = [[] for _ in jobs]
        for (learners, weights, item_filter), members in groups.items():
            k = max(jobs[n].k for n in members)
            queries = np.stack([jobs[n].query for n in members])
            with self._index_lock:
                hits = self.index.search(
                    queries,
                    k,
                    learners=list(learners) if learners is not None else None,
                    weights=list(weights) if weights is not None else None,
                    filter=item_filter,
                )
            for n, found in zip(members, hits, strict=True):
                results[n] = found[: jobs[n].k]
        return results

    def close(self) -> None:
        """Let queued requests finish, then stop the worker threads."""
        for batcher in (self._embed, self._search):
            if batcher is not None:
                batcher.close()

    def _response(
        self, query: dict, k: int, learners, weights, item_filter: ItemFilter | None, hits: list, started: float
    ) -> dict[str, Any]:
        return {
            "query": query,
            "k": k,
            "learners": learners if learners is not None else list(range(int(self.index.num_learners))),
            "weights": weights,
            "filter": item_filter.describe() if item_filter is not None else None,
            "results": [
                {
                    "rank": rank,
                    "id": int(hit.id),
                    "score": float(hit.score),
                    "label": hit.label,
                    "thumbnail": thumbnail_url(int(hit.id)),
                }
                for rank, hit in enumerate(hits, start=1)
            ],
            "took_ms": round((time.perf_counter() - started) * 1000.0, 3),
        }

    # -- thumbnails --------------------------------------------------------------------------------

    def thumbnail(self, item: int) -> bytes:
        """PNG thumbnail of an indexed item; only files named by the index are ever opened."""
        item = self.item_id(item)
        with self._thumbnail_lock:
            cached = self._thumbnails.get(item)
            if cached is not None:
                self._thumbnails.move_to_end(item)
                return cached
        path = self._item_path(item)
        try:
            image = load_rgb(path)
        except BadImageError as exc:
            raise RequestError(404, f"item {item}: image unavailable ({exc.reason})") from None
        size = self.settings.thumbnail_size
        image.thumbnail((size, size), Image.Resampling.LANCZOS if max(image.size) > size else Image.Resampling.NEAREST)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=False)
        data = buffer.getvalue()
        if self.settings.thumbnail_cache:
            with self._thumbnail_lock:
                self._thumbnails[item] = data
                while len(self._thumbnails) > self.settings.thumbnail_cache:
                    self._thumbnails.popitem(last=False)
        return data

    def _item_path(self, item: int) -> Path:
        path = Path(self.index.item(item).path)
        if not path.is_absolute() and self.index_dir is not None and not path.exists():
            path = self.index_dir / path  # paths stored relative to the index folder
        return path


@dataclass(frozen=True)
class _SearchJob:
    query: np.ndarray  # one learner-normalised embedding (D,)
    k: int
    learners: tuple[int, ...] | None
    weights: tuple[float, ...] | None
    filter: ItemFilter | None = None


def thumbnail_url(item: int) -> str:
    return f"/items/{item}/thumbnail"


def _slices(slices: Any) -> list[tuple[int, int]]:
    out = []
    for s in slices:
        if isinstance(s, slice):
            out.append((s.start, s.stop))
        else:
            a, b = s
            out.append((a, b))
    return out
