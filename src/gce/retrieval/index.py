"""Persistent faiss indexes over ensemble embeddings, searchable on any subset of the learners.

The stored vectors and the learner weights folded into the query are in
:mod:`gce.retrieval.vectors`: for ``flat`` the answer is exact. The approximate types answer the
weighted query approximately with the structure they built for the full embedding (IVF cells and
HNSW links from full-embedding similarity; IVF-PQ codes decode each learner's slice), so recall for
a single learner is lower than for the full embedding: ``gce index build`` prints both
(:mod:`gce.retrieval.faiss_tuning`). The folder's files are :mod:`gce.retrieval.index_files`.

Ids are positions in the faiss index and in the item table, given in order and never reused. A
delete marks ids as deleted (tombstones, stored in the item table of a new generation) and every
search from then on passes faiss a selector that leaves them out (:mod:`gce.retrieval.index_select`),
as a metadata filter (:mod:`gce.retrieval.filters`) does. Tombstones rather than ``remove_ids``:
faiss HNSW cannot remove a node at all (and its graph would lose the paths through it), IVF and
flat removal would renumber or need an id map per type; one mechanism keeps every type's ids
stable and flat search exact (faiss scores exactly the selected vectors). Deleted vectors keep
their space until the index is rebuilt from its embeddings.
"""

from __future__ import annotations

import numbers
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gce.errors import GceError
from gce.io import user_path
from gce.retrieval.embedder import normalize_learners, slices_from_json
from gce.retrieval.faiss_build import apply_search_params, load_faiss
from gce.retrieval.files import MANIFEST_CHECKSUM
from gce.retrieval.filters import ItemFilter
from gce.retrieval.index_files import load_generation, manifest_body, write_generation, writer_lock
from gce.retrieval.index_manifest import read_index_manifest
from gce.retrieval.index_select import selected_search
from gce.retrieval.items import ItemTable
from gce.retrieval.vectors import query_vectors, stored_vectors

__all__ = ["SearchHit", "SearchIndex", "query_vectors"]


@dataclass(frozen=True)
class SearchHit:
    id: int
    score: float
    path: str
    label: str | None


# -------------------------------------------------------------------------------- searching
def _positive(value: Any, what: str) -> int:
    """A count given through the API: an integer >= 1, or a one-line error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise GceError(f"{what} must be an integer, got {value!r}")
    if int(value) < 1:
        raise GceError(f"{what} must be at least 1, got {value}")
    return int(value)


def refuse_other_model(index_path: Path, index_model_id: str, model_id: str, what: str) -> None:
    """The one-line refusal of embeddings of another model than an index's (every back end)."""
    if model_id != index_model_id:
        raise GceError(
            f"{index_path}: the index was built with model {index_model_id[:12]}, but {what} is"
            f" model {model_id[:12]}; embed the catalogue with this model or use its index"
        )


def refuse_missing_paths(index_path: Path, missing: Sequence[str]) -> None:
    """The one-line refusal of paths that no live item of an index has (naming the first three)."""
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        shown = ", ".join(repr(p) for p in missing[:3]) + more
        raise GceError(f"{len(missing)} path(s) are not live items of {index_path}: {shown}")


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
        self._kept: OrderedDict[ItemFilter | None, np.ndarray] = OrderedDict()  # ids each filter lets through

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
        """The number of live items (deleted ones not counted)."""
        return self._items.live

    @property
    def deleted(self) -> int:
        """The number of deleted items (their ids are never given again)."""
        return len(self._items.deleted)

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
        refuse_other_model(self.path, self.model_id, model_id, what)

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
            ef_search = min(_positive(ef_search, "ef_search"), max(1, int(self._index.ntotal)))
        params = {"nprobe": nprobe, "ef_search": ef_search}
        apply_search_params(self._index, params)
        self.search_params.update({k: v for k, v in params.items() if v is not None})

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
        """``(scores, ids)``, each ``(n, min(k, m))`` where ``m`` is the number of live items that pass
        ``filter`` (all live items without one): a huge ``k`` costs nothing; ids of -1 (score -inf)
        where an approximate index found fewer.

        Scores are the weighted mean of the learners' cosine similarities (the plain cosine of the
        whole embedding without weights). With a filter (:func:`gce.retrieval.parse_filter`), a
        flat index answers exactly as a search over the passing items alone would.
        """
        k = _positive(k, "k")
        if filter is not None and not isinstance(filter, ItemFilter):
            what = type(filter).__name__
            raise GceError(f"filter must be an ItemFilter (from gce.retrieval.parse_filter), got {what}")
        q = query_vectors(queries, self.learner_slices, learners, weights)
        keep = self._keep(filter)
        if keep is None:  # nothing deleted, no filter: the plain search
            scores, ids = self._index.search(q, min(k, self.size))
        else:
            k = min(k, int(np.count_nonzero(keep)))
            if k == 0:
                return np.zeros((len(q), 0), dtype=np.float32), np.zeros((len(q), 0), dtype=np.int64)
            scores, ids = selected_search(self._index, self.index_type, q, k, keep)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return scores, ids.astype(np.int64)

    def _keep(self, filter: ItemFilter | None) -> np.ndarray | None:
        """True for the live ids that pass ``filter`` (``None``: every stored id passes). The last few
        masks are kept: a service asks for the same filters again and again."""
        if filter is None and not self._items.deleted:
            return None
        keep = self._kept.get(filter)
        if keep is None:
            keep = self._items.live_mask()
            if filter is not None:
                keep &= filter.mask(self._items.paths, self._items.labels)
            self._kept[filter] = keep
            while len(self._kept) > _KEPT_MASKS:
                self._kept.popitem(last=False)
        self._kept.move_to_end(filter)
        return keep

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        learners: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
        *,
        filter: ItemFilter | None = None,
    ) -> list[list[SearchHit]]:
        """The top-``k`` hits of each query (``N x D`` learner-normalised embeddings), best first, among
        the live items that pass ``filter`` (see :meth:`search_arrays`)."""
        scores, ids = self.search_arrays(queries, k, learners, weights, filter=filter)
        paths, labels = self._items.paths, self._items.labels
        return [
            [SearchHit(int(i), float(s), paths[i], labels[i]) for s, i in zip(srow, irow, strict=True) if i >= 0]
            for srow, irow in zip(scores, ids, strict=True)
        ]

    def item(self, id: int) -> SearchHit:
        """The path and label of a live item; ``KeyError`` for an unknown or deleted id."""
        i = int(id)
        if not self._items.is_live(i):
            raise KeyError(id)
        return SearchHit(i, 0.0, self._items.paths[i], self._items.labels[i])

    def embedding(self, id: int) -> np.ndarray:
        """The stored embedding of item ``id``, learner-normalised like :meth:`Embedder.embed_images`
        (for ``ivfpq`` the decoded approximation); ``KeyError`` for an unknown or deleted id."""
        i = int(id)
        if not self._items.is_live(i):
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
            first = len(self._items)  # after the highest id ever given, deleted ones included
            # Work on a copy so that a failed write leaves this object as it was on disk.
            index = load_faiss().clone_index(self._index)
            for start in range(0, len(x), 100_000):
                index.add(stored_vectors(x[start : start + 100_000], self.learner_slices))
            items = ItemTable(list(self._items.paths), list(self._items.labels), self._items.deleted)
            items.extend(paths, labels)
            body = manifest_body(self.manifest)
            body["sources"] = [*self.manifest.get("sources", []), *([source] if source else [])]
            manifest = write_generation(self.path, index, items, body, self.manifest)
        self._index, self._items, self._direct_map, self.manifest = index, items, False, manifest
        self._kept.clear()
        apply_search_params(self._index, self.search_params)
        return range(first, len(items))

    # ---------------------------------------------------------------- deleting
    def delete(self, ids: Sequence[int]) -> int:
        """Delete items by id and rewrite the folder atomically (a new generation: a killed delete
        leaves the index as it was); returns how many were deleted. An unknown or already deleted
        id is a one-line error and nothing is written. Ids are never reused."""
        wanted = self._live_ids(ids)  # before the lock: a wrong id fails at once
        with writer_lock(self.path):
            current = read_index_manifest(self.path)
            if current[MANIFEST_CHECKSUM] != self.manifest.get(MANIFEST_CHECKSUM):
                # Another writer published meanwhile: delete from what is on disk now (see add).
                self._adopt(*load_generation(self.path, verify=True))
                wanted = self._live_ids(ids)
            items = self._items.with_deleted(wanted)
            body = manifest_body(self.manifest)
            manifest = write_generation(self.path, self._index, items, body, self.manifest, same_index=True)
        self._items, self.manifest = items, manifest
        self._kept.clear()
        return len(wanted)

    def ids_of_paths(self, paths: Sequence[str]) -> list[int]:
        """The ids of the live items stored under ``paths`` (as stored: the paths the index lists);
        a path that no live item has is a one-line error naming the first few."""
        ids, missing = self._items.live_ids_of(paths)
        refuse_missing_paths(self.path, missing)
        return ids

    def _live_ids(self, ids: Sequence[int]) -> list[int]:
        try:
            return self._items.check_live(ids)
        except GceError as exc:
            raise GceError(f"{self.path}: {exc}; nothing was deleted") from None

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


#: Filter masks a SearchIndex keeps (one byte per item each).
_KEPT_MASKS = 8
