"""Persistent faiss indexes over ensemble embeddings, searchable on any subset of the learners.

Stored vectors
--------------
An ensemble embedding is the concatenation of K unit vectors (one per learner). The index stores
it divided by sqrt(K), a unit vector, so the inner product of two stored vectors is their cosine
similarity, which equals the mean of the K learners' cosines.

Learner weights without rebuilding
----------------------------------
With weights ``w`` (summing to 1), the score of gallery item ``g`` for query ``q`` is
``sum_k w_k <q_k, g_k>``, the weighted mean of the learners' cosines. Because the gallery vector is
``g / sqrt(K)``, this is one inner product with the rescaled query ``q' = concat(w_k sqrt(K) q_k)``:
the same index answers every weighting. For ``flat`` the answer is exact. The approximate types
answer the weighted query approximately with the structure they built for the full embedding
(IVF cells and HNSW links from full-embedding similarity; IVF-PQ codes decode each learner's
slice), so recall for a single learner is lower than for the full embedding: ``gce index build``
prints both.

Index folder
------------
``manifest.json`` (written last, atomically) names the generation's files with their sha256:
``index.<gen>.faiss`` and ``items.<gen>.npz``. ``add`` writes the next generation and then swaps
the manifest, so a killed write leaves the previous, complete index; files of other generations
are deleted afterwards.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gce.config.vocabulary import INDEX_TYPES
from gce.errors import DatasetError, GceError
from gce.io import sha256_file
from gce.registry import Registry
from gce.retrieval.embedder import normalize_learners, slices_from_json
from gce.retrieval.files import (
    check_checksum,
    commit_file,
    read_manifest,
    write_json_atomic,
)
from gce.retrieval.items import ItemTable

__all__ = ["INDEX_TYPES", "BuildReport", "SearchHit", "SearchIndex", "build_index", "query_vectors"]

MANIFEST = "manifest.json"
FORMAT = "gce-index-1"
#: Recall@10 (against exact search) that the build-time tuning aims for.
TARGET_RECALL = 0.95


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a dependency, but say what to do if it is absent
        raise GceError("faiss is not installed: pip install faiss-cpu") from None
    return faiss


@dataclass(frozen=True)
class SearchHit:
    id: int
    score: float
    path: str
    label: str | None


@dataclass
class BuildReport:
    """What ``build`` measured: per search setting, recall@k against exact search and speed."""

    index_type: str
    size: int
    build_seconds: float
    index_bytes: int
    sample: int
    k: int
    rows: list[dict[str, Any]]
    chosen: dict[str, Any]

    def format_table(self) -> str:
        lines = [
            (
                f"{self.index_type} index: {self.size:,} vectors, built in {self.build_seconds:.1f} s,"
                f" {self.index_bytes / 2**20:.1f} MiB"
            )
        ]
        if self.rows:
            lines.append(
                f"recall@{self.k} against exact search on {self.sample} gallery items as queries"
                f" (each one's own id left out); queries/s: one batch of them, fastest of 3:"
            )
            lines.append(f"  {'setting':<14} {'recall@' + str(self.k):>10} {'learner 0 only':>15} {'queries/s':>10}")
            for row in self.rows:
                mark = "  <- default" if row["setting"] == self.chosen.get("setting") else ""
                lines.append(
                    f"  {row['setting']:<14} {row['recall']:>10.3f} {row['recall_learner0']:>15.3f}"
                    f" {row['qps']:>10,.0f}{mark}"
                )
        return "\n".join(lines)


# -------------------------------------------------------------------------------- vectors
def stored_vectors(embeddings: np.ndarray, slices: Sequence[slice]) -> np.ndarray:
    """Learner-normalised embeddings scaled to unit length (what the faiss index holds)."""
    return normalize_learners(embeddings, slices) / np.float32(math.sqrt(len(slices)))


def learner_weights(
    num_learners: int, learners: Sequence[int] | None = None, weights: Sequence[float] | None = None
) -> np.ndarray:
    """Per-learner weights summing to 1 from a learner subset or explicit weights (one-line errors)."""
    if learners is not None and weights is not None:
        raise GceError("give learners or weights, not both")
    if weights is not None:
        w = np.asarray(list(weights), dtype=np.float64)
        if w.shape != (num_learners,):
            raise GceError(f"weights: expected {num_learners} values (one per learner), got {len(w)}")
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise GceError(f"weights must be non-negative numbers, not all zero, got {list(weights)}")
    elif learners is not None:
        chosen = [int(k) for k in learners]
        if not chosen:
            raise GceError("learners: give at least one learner")
        bad = [k for k in chosen if not 0 <= k < num_learners]
        if bad:
            raise GceError(f"learners: {bad[0]} is not a learner of this model (it has learners 0..{num_learners - 1})")
        w = np.zeros(num_learners)
        w[chosen] = 1.0
    else:
        w = np.ones(num_learners)
    return w / w.sum()


def query_vectors(
    queries: np.ndarray,
    slices: Sequence[slice],
    learners: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
) -> np.ndarray:
    """Queries as the index searches them: learner-normalised, learner k scaled by ``w_k sqrt(K)``."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    dim = slices[-1].stop
    if q.ndim != 2 or q.shape[1] != dim:
        raise GceError(f"queries must be (N, {dim}) embeddings of this index's model, got shape {np.shape(queries)}")
    if not np.isfinite(q).all():
        raise GceError("queries contain NaN or infinite values")
    w = learner_weights(len(slices), learners, weights)
    q = normalize_learners(q, slices)
    for s, wk in zip(slices, w, strict=True):
        q[:, s] *= np.float32(wk * math.sqrt(len(slices)))
    return q


# -------------------------------------------------------------------------------- building
@dataclass(frozen=True)
class IndexShape:
    """What an index type is built from: dimensions, gallery size, learner slices, build parameters."""

    dim: int
    n: int
    slices: Sequence[slice]
    params: dict[str, Any]


#: index type -> (empty faiss index, the build parameters it used)
IndexFactory = Callable[[IndexShape], tuple[Any, dict[str, Any]]]
INDEX_REGISTRY: Registry[IndexFactory] = Registry("index type", "--type", INDEX_TYPES)


def _make_index(index_type: str, dim: int, n: int, slices: Sequence[slice], params: dict[str, Any]):
    if index_type not in INDEX_REGISTRY:
        raise GceError(f"unknown index type {index_type!r}; valid types: {', '.join(INDEX_TYPES)}")
    return INDEX_REGISTRY[index_type](IndexShape(dim, n, slices, params))


@INDEX_REGISTRY.register("flat")
def _flat(s: IndexShape) -> tuple[Any, dict[str, Any]]:
    return _faiss().IndexFlatIP(s.dim), {}


@INDEX_REGISTRY.register("hnsw")
def _hnsw(s: IndexShape) -> tuple[Any, dict[str, Any]]:
    faiss = _faiss()
    m = int(s.params.get("hnsw_m", 32))
    index = faiss.IndexHNSWFlat(s.dim, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = int(s.params.get("ef_construction", 80))
    return index, {"hnsw_m": m, "ef_construction": index.hnsw.efConstruction}


def _nlist(s: IndexShape) -> int:
    """IVF types: about sqrt(N) cells, capped so that each trains on >= 39 points (faiss' minimum advice)."""
    return int(s.params.get("nlist") or max(1, min(round(math.sqrt(s.n)), s.n // 39 or 1)))


@INDEX_REGISTRY.register("ivf")
def _ivf(s: IndexShape) -> tuple[Any, dict[str, Any]]:
    faiss, nlist = _faiss(), _nlist(s)
    return faiss.IndexIVFFlat(faiss.IndexFlatIP(s.dim), s.dim, nlist, faiss.METRIC_INNER_PRODUCT), {"nlist": nlist}


@INDEX_REGISTRY.register("ivfpq")
def _ivfpq(s: IndexShape) -> tuple[Any, dict[str, Any]]:
    # Sub-vectors of 8 dimensions that never straddle two learners (so each learner's part of
    # a score is decoded from its own codes); fewer bits for tiny galleries (k-means needs 2^bits points).
    faiss, nlist = _faiss(), _nlist(s)
    learner_dim = s.slices[0].stop - s.slices[0].start
    sub = int(s.params.get("pq_dim", 8))
    if learner_dim % sub:
        sub = math.gcd(learner_dim, sub)
    m = s.dim // sub
    nbits = int(s.params.get("nbits") or max(1, min(8, int(math.log2(max(2, s.n // 4))))))
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(s.dim), s.dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    return index, {"nlist": nlist, "pq_m": m, "nbits": nbits}


def _search_settings(index_type: str, index) -> list[tuple[str, dict[str, int]]]:
    if index_type in ("ivf", "ivfpq"):
        nlist = index.nlist
        values = sorted({p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= nlist} | {min(nlist, 256)})
        return [(f"nprobe={p}", {"nprobe": p}) for p in values]
    if index_type == "hnsw":
        return [(f"efSearch={e}", {"ef_search": e}) for e in (16, 32, 64, 128, 256, 512)]
    return []


def apply_search_params(index, params: dict[str, Any]) -> None:
    faiss = _faiss()
    if "nprobe" in params and params["nprobe"] is not None:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if "ef_search" in params and params["ef_search"] is not None:
        index.hnsw.efSearch = int(params["ef_search"])


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth, strict=True))
    return hits / max(1, int((truth >= 0).sum()))


def _drop_self(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for i, row in enumerate(ids):
        row = row[(row != own[i]) & (row >= 0)][:k]
        out[i, : len(row)] = row
    return out


def _topk_without_self(index, queries: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    return _drop_self(index.search(queries, k + 1)[1], own, k)


def exact_topk(
    queries: np.ndarray, embeddings: np.ndarray, slices: Sequence[slice], k: int, chunk: int = 100_000
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of (already rescaled) queries against stored forms of ``embeddings``,
    a gallery chunk at a time (no second copy of a large gallery)."""
    faiss = _faiss()
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(embeddings), chunk):
        part = stored_vectors(embeddings[start : start + chunk], slices)
        s, i = faiss.knn(np.ascontiguousarray(queries), part, min(k, len(part)), metric=faiss.METRIC_INNER_PRODUCT)
        best_s, best_i = np.hstack([best_s, s]), np.hstack([best_i, i + start])
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    return best_s, best_i


def measure_settings(
    index,
    index_type: str,
    embeddings: np.ndarray,
    slices: Sequence[slice],
    *,
    sample: int = 500,
    k: int = 10,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """Recall@k (full embedding and learner 0 alone) against exact search, and batch queries/s,
    for each search setting of an approximate index. Queries are sampled gallery items, each
    one's own id left out of both lists."""
    settings = _search_settings(index_type, index)
    if not settings:
        return [], 0
    rng = np.random.default_rng(seed)
    own = np.sort(rng.choice(len(embeddings), size=min(sample, len(embeddings)), replace=False))
    full_q = query_vectors(embeddings[own], slices)
    one_q = query_vectors(embeddings[own], slices, learners=[0])
    truth_full = _drop_self(exact_topk(full_q, embeddings, slices, k + 1)[1], own, k)
    truth_one = _drop_self(exact_topk(one_q, embeddings, slices, k + 1)[1], own, k)
    rows = []
    for name, params in settings:
        apply_search_params(index, params)
        seconds = math.inf
        for _ in range(3):  # the fastest of three: one timing on a busy machine is noise
            start = time.perf_counter()
            found = _topk_without_self(index, full_q, own, k)
            seconds = min(seconds, time.perf_counter() - start)
        rows.append(
            {
                "setting": name,
                **params,
                "recall": _recall(found, truth_full),
                "recall_learner0": _recall(_topk_without_self(index, one_q, own, k), truth_one),
                "qps": len(own) / max(seconds, 1e-9),
            }
        )
    return rows, len(own)


def _choose(rows: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The fastest setting at or above ``target`` recall, else the most accurate one."""
    if not rows:
        return {}
    good = [r for r in rows if r["recall"] >= target]
    return max(good, key=lambda r: r["qps"]) if good else max(rows, key=lambda r: (r["recall"], r["qps"]))


def build_faiss(
    embeddings: np.ndarray,
    index_type: str,
    slices: Sequence[slice],
    params: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    progress: bool = False,
):
    """A faiss index of the stored forms of learner-normalised ``embeddings``, converted a chunk at
    a time. IVF types train k-means on at most 64 points per cell (PQ: at least 256 x 39)."""
    faiss = _faiss()
    params = dict(params or {})
    n, dim = embeddings.shape
    index, used = _make_index(index_type, dim, n, slices, params)
    if not index.is_trained:
        per_cell = 64
        need = max(index.nlist * per_cell, 256 * 39 if index_type == "ivfpq" else 0)
        rng = np.random.default_rng(seed)
        rows = np.arange(n) if n <= need else np.sort(rng.choice(n, size=need, replace=False))
        faiss.extract_index_ivf(index).cp.seed = seed  # reproducible k-means
        index.train(stored_vectors(embeddings[rows], slices))
    step = 100_000
    from tqdm.auto import tqdm

    for start in tqdm(
        range(0, n, step), desc=f"adding to {index_type}", disable=not progress or n <= step, leave=False, unit="chunk"
    ):
        index.add(stored_vectors(embeddings[start : start + step], slices))
    return index, used


# -------------------------------------------------------------------------------- the folder
def _check_model_meta(meta: dict[str, Any]) -> None:
    for key in ("model_id", "embedding_dim", "num_learners", "learner_slices"):
        if key not in meta:
            raise GceError(f"model metadata lacks {key!r}")


def _write_generation(folder: Path, index, items: ItemTable, manifest: dict[str, Any]) -> None:
    faiss = _faiss()
    folder.mkdir(parents=True, exist_ok=True)
    gen = int(manifest.get("generation", -1)) + 1
    names = {"index": f"index.{gen}.faiss", "items": f"items.{gen}.npz"}
    pid = os.getpid()
    tmp_index = folder / f".{names['index']}.tmp-{pid}"
    tmp_items = folder / f".{names['items']}.tmp-{pid}"
    try:
        faiss.write_index(index, str(tmp_index))
        tmp_items.write_bytes(items.to_bytes())
        commit_file(tmp_index, folder / names["index"])
        commit_file(tmp_items, folder / names["items"])
    except (OSError, RuntimeError) as exc:
        tmp_index.unlink(missing_ok=True)
        tmp_items.unlink(missing_ok=True)
        raise GceError(f"cannot write the index to {folder}: {exc}; the previous index is kept") from None
    files = {
        key: {"name": name, "sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
        for key, name in names.items()
    }
    write_json_atomic(
        folder / MANIFEST, {**manifest, "format": FORMAT, "generation": gen, "files": files, "size": int(index.ntotal)}
    )
    keep = set(names.values()) | {MANIFEST}
    for path in folder.iterdir():  # older generations and temporaries of killed writers
        if path.name not in keep and (path.name.startswith(("index.", "items.", ".index.", ".items.", f".{MANIFEST}"))):
            path.unlink(missing_ok=True)


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
    _check_model_meta(model)
    if index_type not in INDEX_TYPES:
        raise GceError(f"unknown index type {index_type!r}; valid types: {', '.join(INDEX_TYPES)}")
    out = Path(out_dir)
    if (out / MANIFEST).exists() and not overwrite:
        raise GceError(f"{out} already holds an index; use gce index add, or overwrite it")
    if out.exists() and not out.is_dir():
        raise GceError(f"{out} exists and is not a folder")
    slices = slices_from_json(model["learner_slices"])
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[1] != int(model["embedding_dim"]):
        raise GceError(f"embeddings have shape {x.shape}, expected (N, {model['embedding_dim']})")
    if len(x) == 0:
        raise GceError("no embeddings to index")
    labels = list(labels) if labels is not None else [None] * len(x)
    if len(paths) != len(x) or len(labels) != len(x):
        raise GceError(f"{len(x)} embeddings but {len(paths)} paths and {len(labels)} labels")
    start = time.perf_counter()
    index, used = build_faiss(x, index_type, slices, params, seed=seed, progress=progress)
    build_seconds = time.perf_counter() - start
    rows, n_sample = measure_settings(index, index_type, x, slices, sample=sample, seed=seed)
    chosen = _choose(rows, target_recall)
    search_params: dict[str, Any] = {key: chosen[key] for key in ("nprobe", "ef_search") if key in chosen}
    apply_search_params(index, search_params)
    items = ItemTable()
    items.extend(paths, labels)
    manifest = {
        "index_type": index_type,
        "params": used,
        "search_params": search_params,
        "model": {key: model[key] for key in ("model_id", "embedding_dim", "num_learners", "learner_slices")},
        "sources": list(sources or []),
        "generation": -1,
    }
    if overwrite and (out / MANIFEST).exists():
        with contextlib.suppress(DatasetError):
            manifest["generation"] = int(read_manifest(out / MANIFEST, "gce index", FORMAT).get("generation", -1))
    _write_generation(out, index, items, manifest)
    report = BuildReport(
        index_type,
        int(index.ntotal),
        build_seconds,
        int((out / _current_files(out)["index"]).stat().st_size),
        n_sample,
        10,
        rows,
        {key: chosen[key] for key in ("setting",) if key in chosen},
    )
    loaded = SearchIndex(index, items, read_manifest(out / MANIFEST, "gce index", FORMAT), out)
    write_json_atomic(out / "build_report.json", asdict(report))
    return loaded, report


def _current_files(folder: Path) -> dict[str, str]:
    manifest = read_manifest(folder / MANIFEST, "gce index", FORMAT)
    return {key: value["name"] for key, value in manifest["files"].items()}


# -------------------------------------------------------------------------------- searching
class SearchIndex:
    """A loaded index folder: the faiss index, the id -> (path, label) table and the manifest."""

    def __init__(self, index, items: ItemTable, manifest: dict[str, Any], path: Path) -> None:
        self._index = index
        self._items = items
        self.manifest = manifest
        self.path = Path(path)
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

        ``verify`` checks the sha256 of every file against the manifest (seconds per GB).
        """
        faiss = _faiss()
        folder = Path(index_dir)
        if not folder.is_dir():
            raise DatasetError(f"{folder}: no such index folder")
        manifest = read_manifest(folder / MANIFEST, "gce index", FORMAT)
        try:
            files = {key: folder / manifest["files"][key]["name"] for key in ("index", "items")}
            _check_model_meta(manifest["model"])
            manifest["index_type"], int(manifest["size"])
        except (KeyError, TypeError, ValueError, GceError) as exc:
            raise DatasetError(f"{folder / MANIFEST}: damaged manifest (missing or bad {exc})") from None
        for key, path in files.items():
            if verify:
                check_checksum(path, manifest["files"][key]["sha256"])
            elif not path.is_file():
                raise DatasetError(f"{path}: missing (listed in the manifest)")
        try:
            index = faiss.read_index(str(files["index"]))
        except RuntimeError as exc:
            raise DatasetError(
                f"{files['index']}: cannot be read by faiss ({str(exc).splitlines()[0][:200]})"
            ) from None
        items = ItemTable.load(files["items"])
        size, dim = int(manifest["size"]), int(manifest["model"]["embedding_dim"])
        if index.ntotal != size or len(items) != size or index.d != dim:
            raise DatasetError(
                f"{folder}: inconsistent index (manifest: {size} x {dim}, faiss: {index.ntotal} x"
                f" {index.d}, item table: {len(items)})"
            )
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
        """Override the build-time default (more cells probed / a wider graph search: slower, more recall)."""
        if nprobe is not None and self.index_type not in ("ivf", "ivfpq"):
            raise GceError(f"nprobe applies to ivf and ivfpq indexes, not {self.index_type}")
        if ef_search is not None and self.index_type != "hnsw":
            raise GceError(f"ef_search applies to hnsw indexes, not {self.index_type}")
        params = {"nprobe": nprobe, "ef_search": ef_search}
        apply_search_params(self._index, params)
        self.search_params.update({k: v for k, v in params.items() if v is not None})

    # ---------------------------------------------------------------- search
    def search_arrays(
        self, queries: np.ndarray, k: int, learners: Sequence[int] | None = None, weights: Sequence[float] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)``, each ``(n, k)``; ids of -1 (score -inf) where fewer than k items exist.

        Scores are the weighted mean of the learners' cosine similarities (the plain cosine of the
        whole embedding without weights).
        """
        if int(k) < 1:
            raise GceError(f"k must be at least 1, got {k}")
        q = query_vectors(queries, self.learner_slices, learners, weights)
        scores, ids = self._index.search(q, int(k))
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
            _faiss().extract_index_ivf(self._index).make_direct_map()
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
        self.check_model(model_id, "the new embeddings'")
        x = np.asarray(embeddings)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise GceError(f"new embeddings have dimension {x.shape[-1] if x.ndim else '?'}, the index {self.dim}")
        labels = list(labels) if labels is not None else [None] * len(x)
        if len(paths) != len(x) or len(labels) != len(x):
            raise GceError(f"{len(x)} embeddings but {len(paths)} paths and {len(labels)} labels")
        first = self.size
        faiss = _faiss()
        # Work on a copy so that a failed write leaves this object as it was on disk.
        index = faiss.clone_index(self._index)
        for start in range(0, len(x), 100_000):
            index.add(stored_vectors(x[start : start + 100_000], self.learner_slices))
        items = ItemTable(list(self._items.paths), list(self._items.labels))
        items.extend(paths, labels)
        manifest = {key: value for key, value in self.manifest.items() if key not in ("files", "size")}
        manifest["sources"] = [*self.manifest.get("sources", []), *([source] if source else [])]
        _write_generation(self.path, index, items, manifest)
        self._index, self._items, self._direct_map = index, items, False
        self.manifest = read_manifest(self.path / MANIFEST, "gce index", FORMAT)
        apply_search_params(self._index, self.search_params)
        return range(first, self.size)

    def __repr__(self) -> str:
        return f"SearchIndex({self.path}, {self.index_type}, {self.size:,} x {self.dim}, K={self.num_learners})"
