"""Persistent faiss indexes over ensemble embeddings, searchable on any subset of the learners.

The stored vectors and the learner weights folded into the query are in
:mod:`gce.retrieval.vectors`: for ``flat`` the answer is exact. The approximate types answer the
weighted query approximately with the structure they built for the full embedding (IVF cells and
HNSW links from full-embedding similarity; IVF-PQ codes decode each learner's slice), so recall for
a single learner is lower than for the full embedding: ``gce index build`` prints both
(:mod:`gce.retrieval.faiss_tuning`). The folder's files are :mod:`gce.retrieval.index_files`.
"""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gce.config.vocabulary import INDEX_TYPES
from gce.errors import GceError
from gce.io import user_path, write_json
from gce.retrieval.embedder import normalize_learners, slices_from_json
from gce.retrieval.faiss_build import apply_search_params, build_faiss, load_faiss
from gce.retrieval.faiss_tuning import TARGET_RECALL, BuildReport, choose_setting, measure_settings
from gce.retrieval.files import MANIFEST_CHECKSUM
from gce.retrieval.index_files import (
    REPORT,
    check_build_target,
    load_generation,
    manifest_body,
    previous_manifest,
    write_generation,
    writer_lock,
)
from gce.retrieval.index_manifest import ManifestError, check_model_meta, read_index_manifest
from gce.retrieval.items import ItemTable
from gce.retrieval.vectors import query_vectors, stored_vectors

__all__ = ["SearchHit", "SearchIndex", "build_index"]


@dataclass(frozen=True)
class SearchHit:
    id: int
    score: float
    path: str
    label: str | None


def build_index(
    embeddings: np.ndarray,
    paths: Sequence[str],
    labels: Sequence[str | None] | None,
    out_dir: str | os.PathLike,
    model: dict[str, Any],
    *,
    index_type: str = "flat",
    params: dict[str, Any] | None = None,
    overwrite: bool = False,
    sample: int = 500,
    target_recall: float = TARGET_RECALL,
    seed: int = 0,
    progress: bool = False,
    sources: list[dict[str, Any]] | None = None,
) -> tuple[SearchIndex, BuildReport]:
    """Build an index folder from learner-normalised ``embeddings`` (N x D) and their paths/labels.

    ``model`` holds ``model_id``, ``embedding_dim``, ``num_learners`` and ``learner_slices`` (as
    :meth:`Embedder.metadata` or an embedding store gives them). Approximate types are measured on
    ``sample`` gallery queries and get as default the fastest search setting reaching
    ``target_recall`` (see :class:`BuildReport`).
    """
    meta = _model_meta(model)
    if index_type not in INDEX_TYPES:
        raise GceError(f"unknown index type {index_type!r}; valid types: {', '.join(INDEX_TYPES)}")
    out = user_path(out_dir, "index folder")
    check_build_target(out, overwrite=overwrite)  # before the work, and again under the lock
    slices = slices_from_json(meta["learner_slices"])
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[1] != meta["embedding_dim"]:
        raise GceError(f"embeddings have shape {x.shape}, expected (N, {meta['embedding_dim']})")
    if len(x) == 0:
        raise GceError("no embeddings to index")
    labels = list(labels) if labels is not None else [None] * len(x)
    if len(paths) != len(x) or len(labels) != len(x):
        raise GceError(f"{len(x)} embeddings but {len(paths)} paths and {len(labels)} labels")
    start = time.perf_counter()
    index, used = build_faiss(x, index_type, slices, params, seed=seed, progress=progress)
    build_seconds = time.perf_counter() - start
    rows, n_sample = measure_settings(index, index_type, x, slices, sample=sample, seed=seed)
    chosen = choose_setting(rows, target_recall)
    search_params: dict[str, Any] = {key: chosen[key] for key in ("nprobe", "ef_search") if key in chosen}
    apply_search_params(index, search_params)
    items = ItemTable()
    items.extend(paths, labels)
    body = {
        "index_type": index_type,
        "params": used,
        "search_params": search_params,
        "model": meta,
        "sources": list(sources or []),
    }
    with writer_lock(out):
        check_build_target(out, overwrite=overwrite)  # another build may have finished meanwhile
        manifest = write_generation(out, index, items, body, previous_manifest(out))
        report = BuildReport(
            index_type,
            int(index.ntotal),
            build_seconds,
            int(manifest["files"]["index"]["bytes"]),
            n_sample,
            10,
            rows,
            {key: chosen[key] for key in ("setting",) if key in chosen},
        )
        write_json(out / REPORT, asdict(report), what="build report")
    return SearchIndex(index, items, manifest, out), report


def _model_meta(model: dict[str, Any]) -> dict[str, Any]:
    """The model metadata an index records, validated (one-line errors) and as plain JSON values."""
    try:
        check_model_meta(model)
    except ManifestError as exc:
        raise GceError(f"model metadata: {exc}") from None
    return {
        "model_id": model["model_id"],
        "embedding_dim": int(model["embedding_dim"]),
        "num_learners": int(model["num_learners"]),
        "learner_slices": [[int(a), int(b)] for a, b in model["learner_slices"]],
    }


# -------------------------------------------------------------------------------- searching
def _positive(value: Any, what: str) -> int:
    """A count given through the API: an integer >= 1, or a one-line error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise GceError(f"{what} must be an integer, got {value!r}")
    if int(value) < 1:
        raise GceError(f"{what} must be at least 1, got {value}")
    return int(value)


class SearchIndex:
    """A loaded index folder: the faiss index, the id -> (path, label) table and the manifest."""

    def __init__(self, index, items: ItemTable, manifest: dict[str, Any], path: Path) -> None:
        self.path = Path(path)
        self._set(index, items, manifest)

    def _set(self, index, items: ItemTable, manifest: dict[str, Any]) -> None:
        self._index = index
        self._items = items
        self.manifest = manifest
        model = manifest["model"]
        self.model_id: str = model["model_id"]
        self.dim: int = int(model["embedding_dim"])
        self.num_learners: int = int(model["num_learners"])
        self.learner_slices: list[slice] = slices_from_json(model["learner_slices"])
        self.index_type: str = manifest["index_type"]
        self.search_params: dict[str, Any] = dict(manifest.get("search_params", {}))
        self._direct_map = False

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, index_dir: str | os.PathLike, *, verify: bool = True) -> SearchIndex:
        """Load an index folder; a missing, damaged or inconsistent one raises a one-line error.

        ``verify`` checks the sha256 of every file against the manifest (seconds per GB); without
        it their sizes are checked. The manifest itself is always verified and validated. A load
        during a ``gce index add`` gets the index before or after it (see
        :mod:`gce.retrieval.index_files`).
        """
        folder = user_path(index_dir, "index")
        manifest, index, items = load_generation(folder, verify=verify)
        loaded = cls(index, items, manifest, folder)
        apply_search_params(index, loaded.search_params)
        return loaded

    # ---------------------------------------------------------------- properties
    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    @property
    def faiss_index(self):
        return self._index

    @property
    def items(self) -> ItemTable:
        return self._items

    @property
    def exact(self) -> bool:
        return self.index_type == "flat"

    def check_model(self, model_id: str, what: str = "the model") -> None:
        """Refuse queries embedded by another model than the one the index was built with."""
        if model_id != self.model_id:
            raise GceError(
                f"{self.path}: the index was built with model {self.model_id[:12]}, but {what} is"
                f" model {model_id[:12]}; embed the catalogue with this model or use its index"
            )

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Override the build-time default (more cells probed / a wider graph search: slower, more recall).

        Values above what can make a difference are clamped: ``nprobe`` to the number of cells,
        ``ef_search`` to the number of items (both then visit everything).
        """
        if nprobe is not None and self.index_type not in ("ivf", "ivfpq"):
            raise GceError(f"nprobe applies to ivf and ivfpq indexes, not {self.index_type}")
        if ef_search is not None and self.index_type != "hnsw":
            raise GceError(f"ef_search applies to hnsw indexes, not {self.index_type}")
        if nprobe is not None:
            nprobe = min(_positive(nprobe, "nprobe"), int(load_faiss().extract_index_ivf(self._index).nlist))
        if ef_search is not None:
            ef_search = min(_positive(ef_search, "ef_search"), max(1, self.size))
        params = {"nprobe": nprobe, "ef_search": ef_search}
        apply_search_params(self._index, params)
        self.search_params.update({k: v for k, v in params.items() if v is not None})

    # ---------------------------------------------------------------- search
    def search_arrays(
        self, queries: np.ndarray, k: int, learners: Sequence[int] | None = None, weights: Sequence[float] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)``, each ``(n, min(k, size))``: ``k`` is capped at the number of items (so a
        huge ``k`` costs nothing); ids of -1 (score -inf) where an approximate index found fewer.

        Scores are the weighted mean of the learners' cosine similarities (the plain cosine of the
        whole embedding without weights).
        """
        k = min(_positive(k, "k"), self.size)
        q = query_vectors(queries, self.learner_slices, learners, weights)
        scores, ids = self._index.search(q, k)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return scores, ids.astype(np.int64)

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        learners: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
    ) -> list[list[SearchHit]]:
        """The top-``k`` hits of each query (``N x D`` learner-normalised embeddings), best first."""
        scores, ids = self.search_arrays(queries, k, learners, weights)
        paths, labels = self._items.paths, self._items.labels
        return [
            [SearchHit(int(i), float(s), paths[i], labels[i]) for s, i in zip(srow, irow, strict=True) if i >= 0]
            for srow, irow in zip(scores, ids, strict=True)
        ]

    def item(self, id: int) -> SearchHit:
        i = int(id)
        if not 0 <= i < len(self._items):
            raise KeyError(id)
        return SearchHit(i, 0.0, self._items.paths[i], self._items.labels[i])

    def embedding(self, id: int) -> np.ndarray:
        """The stored embedding of item ``id``, learner-normalised like :meth:`Embedder.embed_images`
        (for ``ivfpq`` the decoded approximation)."""
        i = int(id)
        if not 0 <= i < self.size:
            raise KeyError(id)
        if self.index_type in ("ivf", "ivfpq") and not self._direct_map:
            load_faiss().extract_index_ivf(self._index).make_direct_map()
            self._direct_map = True
        # An explicit numpy buffer: once faiss.contrib.torch_utils is imported (pytorch-metric-learning's
        # inference utilities do), reconstruct() without one returns a torch tensor.
        vector = self._index.reconstruct(i, np.empty(self.dim, dtype=np.float32))
        return normalize_learners(vector[None, :], self.learner_slices)[0]

    # ---------------------------------------------------------------- growing
    def add(
        self,
        embeddings: np.ndarray,
        paths: Sequence[str],
        labels: Sequence[str | None] | None = None,
        *,
        model_id: str,
        source: dict[str, Any] | None = None,
    ) -> range:
        """Append items (same model, same dimension) and rewrite the folder atomically; returns their ids."""
        x = np.asarray(embeddings)
        labels = list(labels) if labels is not None else [None] * len(x)
        self._check_new(x, paths, labels, model_id)  # before the lock: a wrong input fails at once
        with writer_lock(self.path):
            current = read_index_manifest(self.path)
            if current[MANIFEST_CHECKSUM] != self.manifest.get(MANIFEST_CHECKSUM):
                # Another writer published since this object was loaded: add to what is on disk now,
                # so that its items are not lost.
                self._adopt(*load_generation(self.path, verify=True))
                self._check_new(x, paths, labels, model_id)
            first = self.size
            # Work on a copy so that a failed write leaves this object as it was on disk.
            index = load_faiss().clone_index(self._index)
            for start in range(0, len(x), 100_000):
                index.add(stored_vectors(x[start : start + 100_000], self.learner_slices))
            items = ItemTable(list(self._items.paths), list(self._items.labels))
            items.extend(paths, labels)
            body = manifest_body(self.manifest)
            body["sources"] = [*self.manifest.get("sources", []), *([source] if source else [])]
            manifest = write_generation(self.path, index, items, body, self.manifest)
        self._index, self._items, self._direct_map, self.manifest = index, items, False, manifest
        apply_search_params(self._index, self.search_params)
        return range(first, self.size)

    def _check_new(self, x: np.ndarray, paths: Sequence[str], labels: list[str | None], model_id: str) -> None:
        self.check_model(model_id, "the new embeddings'")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise GceError(f"new embeddings have dimension {x.shape[-1] if x.ndim else '?'}, the index {self.dim}")
        if len(paths) != len(x) or len(labels) != len(x):
            raise GceError(f"{len(x)} embeddings but {len(paths)} paths and {len(labels)} labels")

    def _adopt(self, manifest: dict[str, Any], index, items: ItemTable) -> None:
        """Become the generation just loaded; this object's search settings stay if the type did."""
        kept = dict(self.search_params) if manifest["index_type"] == self.index_type else None
        self._set(index, items, manifest)
        if kept is not None:
            self.search_params = kept
        apply_search_params(self._index, self.search_params)

    def __repr__(self) -> str:
        return f"SearchIndex({self.path}, {self.index_type}, {self.size:,} x {self.dim}, K={self.num_learners})"
