"""faiss indexes by type (flat, hnsw, ivf, ivfpq: a registry) and their construction from embeddings."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gce.config.vocabulary import INDEX_TYPES
from gce.errors import GceError
from gce.registry import Registry
from gce.retrieval.vectors import stored_vectors

__all__ = ["INDEX_REGISTRY", "IndexShape", "apply_search_params", "build_faiss", "load_faiss", "search_settings"]


def load_faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a dependency, but say what to do if it is absent
        raise GceError("faiss is not installed: pip install faiss-cpu") from None
    return faiss


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


#: The build parameters each type reads; any other is refused (not silently ignored).
BUILD_PARAMS = {
    "flat": (),
    "hnsw": ("hnsw_m", "ef_construction"),
    "ivf": ("nlist",),
    "ivfpq": ("nlist", "pq_dim", "nbits"),
}
#: Above these, faiss allocates memory in proportion (links per node, candidate lists, codebooks)
#: for no gain in recall: refused before any work.
MAX_HNSW_M = 256
MAX_EF = 4096
MAX_NBITS = 16


def _make_index(index_type: str, dim: int, n: int, slices: Sequence[slice], params: dict[str, Any]):
    if index_type not in INDEX_REGISTRY:
        raise GceError(f"unknown index type {index_type!r}; valid types: {', '.join(INDEX_TYPES)}")
    given = {key: value for key, value in params.items() if value is not None}
    unknown = sorted(set(given) - set(BUILD_PARAMS.get(index_type, ())))
    if unknown:
        valid = ", ".join(BUILD_PARAMS.get(index_type, ())) or "none"
        raise GceError(f"build parameter {unknown[0]!r} does not apply to {index_type} indexes (they take: {valid})")
    return INDEX_REGISTRY[index_type](IndexShape(dim, n, slices, given))


def _param(s: IndexShape, key: str, default: int, high: int, why: str = "", low: int = 1) -> int:
    """A build parameter in ``[low, high]`` (one-line error naming it and ``why`` the bound), or ``default``."""
    value = s.params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= int(value) <= high:
        raise GceError(f"{key} must be an integer from {low} to {high}{why}, got {value!r}")
    return int(value)


@INDEX_REGISTRY.register("flat")
def _flat(s: IndexShape) -> tuple[Any, dict[str, Any]]:
    return load_faiss().IndexFlatIP(s.dim), {}


@INDEX_REGISTRY.register("hnsw")
def _hnsw(s: IndexShape) -> tuple[Any, dict[str, Any]]:
    faiss = load_faiss()
    m = _param(s, "hnsw_m", 32, MAX_HNSW_M, low=2)
    index = faiss.IndexHNSWFlat(s.dim, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = _param(s, "ef_construction", 80, MAX_EF)
    return index, {"hnsw_m": m, "ef_construction": index.hnsw.efConstruction}


def _nlist(s: IndexShape) -> int:
    """IVF types: about sqrt(N) cells, capped so that each trains on >= 39 points (faiss' minimum
    advice); a given number must not exceed N (k-means cannot make more cells than points)."""
    default = max(1, min(round(math.sqrt(s.n)), s.n // 39 or 1))
    return _param(s, "nlist", default, s.n, f" (at most the {s.n:,} items being indexed)")


@INDEX_REGISTRY.register("ivf")
def _ivf(s: IndexShape) -> tuple[Any, dict[str, Any]]:
    faiss, nlist = load_faiss(), _nlist(s)
    return faiss.IndexIVFFlat(faiss.IndexFlatIP(s.dim), s.dim, nlist, faiss.METRIC_INNER_PRODUCT), {"nlist": nlist}


@INDEX_REGISTRY.register("ivfpq")
def _ivfpq(s: IndexShape) -> tuple[Any, dict[str, Any]]:
    # Sub-vectors of 8 dimensions that never straddle two learners (so each learner's part of
    # a score is decoded from its own codes); fewer bits for tiny galleries (k-means needs 2^bits points).
    faiss, nlist = load_faiss(), _nlist(s)
    learner_dim = s.slices[0].stop - s.slices[0].start
    sub = _param(s, "pq_dim", min(8, learner_dim), learner_dim, " (a learner's dimension)")
    if learner_dim % sub:
        sub = math.gcd(learner_dim, sub)
    m = s.dim // sub
    nbits = _param(s, "nbits", max(1, min(8, int(math.log2(max(2, s.n // 4))))), MAX_NBITS)
    if s.n < 2**nbits:  # each sub-quantizer's k-means needs a point per code
        raise GceError(
            f"ivfpq with {nbits}-bit codes needs at least {2**nbits} items to train, got {s.n};"
            f" use --type flat (exact, and as fast at this size)"
        )
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(s.dim), s.dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    return index, {"nlist": nlist, "pq_m": m, "nbits": nbits}


def search_settings(index_type: str, index) -> list[tuple[str, dict[str, int]]]:
    if index_type in ("ivf", "ivfpq"):
        nlist = index.nlist
        values = sorted({p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= nlist} | {min(nlist, 256)})
        return [(f"nprobe={p}", {"nprobe": p}) for p in values]
    if index_type == "hnsw":
        return [(f"efSearch={e}", {"ef_search": e}) for e in (16, 32, 64, 128, 256, 512)]
    return []


def apply_search_params(index, params: dict[str, Any]) -> None:
    faiss = load_faiss()
    if "nprobe" in params and params["nprobe"] is not None:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if "ef_search" in params and params["ef_search"] is not None:
        index.hnsw.efSearch = int(params["ef_search"])


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
    faiss = load_faiss()
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
