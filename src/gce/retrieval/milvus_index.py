"""A gce index whose items live in a Milvus collection (a server, a cluster or a milvus-lite file).

The index folder holds only ``manifest.json`` (format :data:`FORMAT`: the URI, the collection, the
model, the vector layout, the default search setting and the next free id); the collection holds
the items (:mod:`gce.retrieval.milvus_schema`). :class:`MilvusIndex` answers the same calls as
:class:`gce.retrieval.SearchIndex`, with the same scores: the weighted mean of the learners' cosines
(:mod:`gce.retrieval.vectors`).

Writes (``add``, ``delete``) hold the folder's write lock. ``add`` reserves its ids in the manifest
before it inserts, so a crash leaves a gap, never a reused id. Each write ends with a strongly
consistent count, so later searches (bounded consistency, fast) see it.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gce.errors import GceError
from gce.io import user_path
from gce.retrieval.embedder import normalize_learners, slices_from_json
from gce.retrieval.files import read_manifest, write_checked_manifest
from gce.retrieval.filters import ItemFilter
from gce.retrieval.index import SearchHit, refuse_missing_paths, refuse_other_model
from gce.retrieval.index_files import writer_lock
from gce.retrieval.index_manifest import MANIFEST, ManifestError, check_model_meta
from gce.retrieval.milvus_schema import (
    MAX_K,
    check_gce_collection,
    connect,
    filter_expression,
    ids_by_path,
    insert_items,
    search_params,
)
from gce.retrieval.vectors import learner_weights, query_vectors

__all__ = ["FORMAT", "MilvusIndex", "read_milvus_manifest", "write_milvus_manifest"]

FORMAT = "gce-milvus-index-1"
#: A learner-subset search takes this many candidates per chosen learner (times k) before the merge.
CANDIDATES = 4


def read_milvus_manifest(folder: Path) -> dict[str, Any]:
    body = read_manifest(folder / MANIFEST, "gce Milvus index", FORMAT, checksummed=True)
    try:
        check_model_meta(body.get("model"))
        for key in ("uri", "collection", "index_type", "layout"):
            if not isinstance(body.get(key), str) or not body[key]:
                raise ManifestError(f"{key} must be a non-empty string")
        if isinstance(body.get("next_id"), bool) or not isinstance(body.get("next_id"), int) or body["next_id"] < 0:
            raise ManifestError("next_id must be a non-negative integer")
    except ManifestError as exc:
        raise GceError(f"{folder / MANIFEST}: damaged manifest ({exc})") from None
    return body


def write_milvus_manifest(folder: Path, body: dict[str, Any]) -> dict[str, Any]:
    values = {**body, "format": FORMAT, "backend": "milvus"}
    write_checked_manifest(folder / MANIFEST, values)
    return values


def _ids(values: Any) -> list[int]:
    try:
        items = list(values)
    except TypeError:
        raise GceError(f"ids must be a list of integers, got {values!r}") from None
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral | np.integer):
            raise GceError(f"ids must be integers, got {v!r}")
    return [int(v) for v in items]


class MilvusIndex:
    """An index folder whose manifest points at a Milvus collection (see the module doc)."""

    backend = "milvus"

    def __init__(self, folder: Path, manifest: dict[str, Any], client) -> None:
        self.path = Path(folder)
        self._client = client
        self._set(manifest)
        self._size = self._count()

    def _set(self, manifest: dict[str, Any]) -> None:
        self.manifest = manifest
        model = manifest["model"]
        self.model_id: str = model["model_id"]
        self.dim: int = int(model["embedding_dim"])
        self.num_learners: int = int(model["num_learners"])
        self.learner_slices: list[slice] = slices_from_json(model["learner_slices"])
        self.index_type: str = manifest["index_type"]
        self.layout: str = manifest["layout"]
        self.uri: str = manifest["uri"]
        self.collection: str = manifest["collection"]
        self.search_params: dict[str, Any] = dict(manifest.get("search_params", {}))

    @classmethod
    def open(cls, folder: str | os.PathLike) -> MilvusIndex:
        path = user_path(folder, "index")
        manifest = read_milvus_manifest(path)
        client = connect(manifest["uri"])
        check_gce_collection(client, manifest["collection"], manifest["model"]["model_id"])
        client.load_collection(manifest["collection"])
        return cls(path, manifest, client)

    # ---------------------------------------------------------------- properties
    @property
    def size(self) -> int:
        return self._size

    @property
    def exact(self) -> bool:
        return self.index_type == "flat"

    @property
    def deleted(self) -> int:
        """Items deleted so far (their ids are never given again)."""
        return int(self.manifest.get("deleted", 0))

    def _count(self) -> int:
        rows = self._client.query(self.collection, filter="", output_fields=["count(*)"], consistency_level="Strong")
        return int(rows[0]["count(*)"])

    def check_model(self, model_id: str, what: str = "the model") -> None:
        refuse_other_model(self.path, self.model_id, model_id, what)

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        if nprobe is not None and self.index_type != "ivf":
            raise GceError(f"nprobe applies to ivf indexes, not {self.index_type}")
        if ef_search is not None and self.index_type != "hnsw":
            raise GceError(f"ef_search applies to hnsw indexes, not {self.index_type}")
        if nprobe is not None:
            self.search_params["nprobe"] = min(int(nprobe), int(self.manifest["params"].get("nlist", nprobe)))
        if ef_search is not None:
            self.search_params["ef_search"] = min(int(ef_search), 32_768)

    # ---------------------------------------------------------------- search
    def search_arrays(
        self,
        queries: np.ndarray,
        k: int,
        learners: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
        *,
        filter: ItemFilter | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)``, each ``(n, min(k, size))``, ids -1 (score -inf) where fewer were found."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise GceError(f"k must be an integer >= 1, got {k!r}")
        k = min(int(k), self.size)
        if k > MAX_K:
            raise GceError(f"k = {k:,}: a Milvus search returns at most {MAX_K:,} results")
        q = query_vectors(queries, self.learner_slices, learners, weights)
        w = learner_weights(self.num_learners, learners, weights)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        if k == 0:
            return scores, ids
        expr = filter_expression(filter)
        if self.layout == "learners" and not self.exact and (w == 0).any():  # flat: the masked query is exact
            found = self._search_learners(normalize_learners(q, self.learner_slices), w, k, expr)
        else:
            found = self._search_field("vector", q, k, expr)
        for row, hits in enumerate(found):
            hits = hits[:k]
            ids[row, : len(hits)] = [i for i, _ in hits]
            scores[row, : len(hits)] = [s for _, s in hits]
        return scores, ids

    def _search_field(self, field: str, q: np.ndarray, limit: int, expr: str) -> list[list[tuple[int, float]]]:
        params = search_params(self.index_type, self.search_params, limit)
        out: list[list[tuple[int, float]]] = []
        for start in range(0, len(q), 1024):  # nq per request, well under Milvus' limit
            result = self._client.search(
                self.collection,
                data=q[start : start + 1024].tolist(),
                anns_field=field,
                filter=expr,
                limit=limit,
                search_params=params,
                output_fields=[],
            )
            out += [[(int(h["id"]), float(h["distance"])) for h in hits] for hits in result]
        return out

    def _search_learners(self, qn: np.ndarray, w: np.ndarray, k: int, expr: str) -> list[list[tuple[int, float]]]:
        """Each chosen learner's own field, its top ``CANDIDATES * k``; the union re-scored exactly
        with the weights (the weighted mean of the learners' cosines) and cut to ``k``."""
        chosen = [j for j in range(self.num_learners) if w[j] > 0]
        limit = min(self.size, MAX_K, CANDIDATES * k if len(chosen) > 1 else k)
        per = [
            self._search_field(f"learner_{j}", np.ascontiguousarray(qn[:, self.learner_slices[j]]), limit, expr)
            for j in chosen
        ]
        if len(chosen) == 1:
            return [[(i, float(np.float32(w[chosen[0]] * s))) for i, s in hits] for hits in per[0]]
        candidates = sorted({i for lists in per for hits in lists for i, _ in hits})
        vectors = self._learner_vectors(candidates, chosen)
        out = []
        for row in range(len(qn)):
            ids = sorted({i for lists in per for i, _ in lists[row]} & vectors.keys())  # deleted meanwhile: gone
            total = np.zeros(len(ids), dtype=np.float64)
            for j in chosen:
                g = np.stack([vectors[i][j] for i in ids])
                total += w[j] * (g @ qn[row, self.learner_slices[j]].astype(np.float64))
            order = np.lexsort((np.asarray(ids), -total))[:k]
            out.append([(ids[o], float(np.float32(total[o]))) for o in order])
        return out

    def _learner_vectors(self, ids: list[int], learners: list[int]) -> dict[int, dict[int, np.ndarray]]:
        fields = [f"learner_{j}" for j in learners]
        rows: list[dict[str, Any]] = []
        for start in range(0, len(ids), 1000):
            rows += self._client.get(self.collection, ids=ids[start : start + 1000], output_fields=fields)
        return {int(r["id"]): {j: np.asarray(r[f"learner_{j}"], dtype=np.float64) for j in learners} for r in rows}

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        learners: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
        *,
        filter: ItemFilter | None = None,
    ) -> list[list[SearchHit]]:
        scores, ids = self.search_arrays(queries, k, learners, weights, filter=filter)
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        items = self._items(wanted)
        return [
            [SearchHit(int(i), float(s), *items[int(i)]) for s, i in zip(srow, irow, strict=True) if i >= 0]
            for srow, irow in zip(scores, ids, strict=True)
        ]

    def _items(self, ids: list[int]) -> dict[int, tuple[str, str | None]]:
        out: dict[int, tuple[str, str | None]] = {}
        for start in range(0, len(ids), 1000):
            rows = self._client.query(
                self.collection,
                filter=f"id in {ids[start : start + 1000]}",
                output_fields=["path", "label", "has_label"],
            )
            out.update({int(r["id"]): (r["path"], r["label"] if r["has_label"] else None) for r in rows})
        return out

    def item(self, id: int) -> SearchHit:
        found = self._items([int(id)])
        if int(id) not in found:
            raise KeyError(id)
        return SearchHit(int(id), 0.0, *found[int(id)])

    def embedding(self, id: int) -> np.ndarray:
        """The stored embedding of item ``id``, learner-normalised (as the faiss back end returns it)."""
        rows = self._client.get(self.collection, ids=[int(id)], output_fields=["vector"])
        if not rows:
            raise KeyError(id)
        vector = np.asarray(rows[0]["vector"], dtype=np.float32)[None, :]
        return normalize_learners(vector, self.learner_slices)[0]

    # ---------------------------------------------------------------- writing
    def add(
        self,
        embeddings: np.ndarray,
        paths: Sequence[str],
        labels: Sequence[str | None] | None = None,
        *,
        model_id: str,
        source: dict[str, Any] | None = None,
        progress: bool = False,
    ) -> range:
        """Insert items (same model and dimension); returns their ids (new, never used before)."""
        x = np.asarray(embeddings)
        labels = list(labels) if labels is not None else [None] * len(x)
        self.check_model(model_id, "the new embeddings'")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise GceError(f"new embeddings have dimension {x.shape[-1] if x.ndim else '?'}, the index {self.dim}")
        if len(paths) != len(x) or len(labels) != len(x):
            raise GceError(f"{len(x)} embeddings but {len(paths)} paths and {len(labels)} labels")
        with writer_lock(self.path):
            manifest = read_milvus_manifest(self.path)
            first = int(manifest["next_id"])
            body = {**manifest, "next_id": first + len(x)}
            body["sources"] = [*manifest.get("sources", []), *([source] if source else [])]
            body = write_milvus_manifest(self.path, body)  # reserved before the insert: never reused
            self.insert_rows(x, paths, labels, first, progress=progress)
            self._set(body)
            self._size = self._count()
        return range(first, first + len(x))

    def insert_rows(
        self, x: np.ndarray, paths: Sequence[str], labels: Sequence[str | None], first: int, *, progress: bool = False
    ) -> None:
        insert_items(
            self._client, self.collection, self.layout, self.learner_slices, x, paths, labels, first, progress=progress
        )

    def delete(self, ids: Sequence[int]) -> int:
        """Remove items by id; an unknown id is a one-line error and nothing is removed."""
        wanted = sorted(set(_ids(ids)))
        if not wanted:
            raise GceError("no ids to delete")
        with writer_lock(self.path):
            present = set(self._items(wanted))
            missing = [i for i in wanted if i not in present]
            if missing:
                raise GceError(
                    f"unknown id {missing[0]} ({len(missing)} of {len(wanted)} not in the index); nothing deleted"
                )
            for start in range(0, len(wanted), 1000):
                self._client.delete(self.collection, ids=wanted[start : start + 1000])
            self._size = self._count()
            manifest = read_milvus_manifest(self.path)
            self._set(
                write_milvus_manifest(self.path, {**manifest, "deleted": int(manifest.get("deleted", 0)) + len(wanted)})
            )
        return len(wanted)

    def ids_of_paths(self, paths: Sequence[str]) -> list[int]:
        """The ids of the live items stored under ``paths``; a path no live item has is a one-line
        error naming the first few (as :meth:`SearchIndex.ids_of_paths`)."""
        found = ids_by_path(self._client, self.collection, [str(p) for p in paths])
        missing = [p for p in dict.fromkeys(str(p) for p in paths) if p not in found]
        refuse_missing_paths(self.path, missing)
        return sorted({i for ids in found.values() for i in ids})

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return (
            f"MilvusIndex({self.path}: {self.uri} {self.collection}, {self.index_type}, {self.size:,} x {self.dim},"
            f" K={self.num_learners}, {self.layout})"
        )
