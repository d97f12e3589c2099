"""Retrieval and clustering metrics as typed pure functions (numpy in, Python floats out).

Conventions shared by the retrieval metrics
-------------------------------------------
* **Neighbour lists** (``neighbor_labels``, shape ``(n_query, L)``) hold the labels of each query's
  gallery neighbours, nearest first, in the order of :mod:`gce.evaluation.knn`: decreasing score,
  and **smaller gallery index first among equal scores**. A tie between a same-class and an
  other-class item therefore counts the one with the smaller gallery index first: deterministic,
  neither optimistic nor pessimistic on average.
* **Self-matches** are never in the lists: a query that is itself a gallery item is excluded by
  identity (its own index), while exact duplicates of it stay (they are other images).
* ``num_relevant[q] = R_q``: the number of gallery items of the query's class, the query itself not
  counted (see :func:`num_relevant`). A query with ``R_q = 0`` (a "lone" query: its class has no
  other gallery item) cannot retrieve anything relevant, so it is **excluded** from Recall@K,
  MAP@R and R-Precision: the averages run over ``{q : R_q > 0}`` only. If no query is left, the
  metrics are ``nan``. (pytorch-metric-learning's ``AccuracyCalculator`` excludes them the same way.)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch

from gce.evaluation.ranks import NO_POSITIVE, first_positive_rank  # noqa: F401 (NO_POSITIVE: the docstring examples)

ArrayLike = np.ndarray | torch.Tensor | Sequence[int]

#: Above this ``n_samples x n_clusters``, ``kmeans_backend="auto"`` uses faiss (when installed):
#: sklearn's exact Lloyd iterations on SOP (60k x 11,318) would take tens of minutes.
SKLEARN_KMEANS_LIMIT = 50_000_000


def _np(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _mean_over_retrievable(per_query: np.ndarray, num_relevant: np.ndarray) -> float:
    keep = num_relevant > 0
    return float(per_query[keep].mean()) if keep.any() else float("nan")


# --------------------------------------------------------------------------------- relevance counts
def num_relevant(
    query_labels: ArrayLike, gallery_labels: ArrayLike | None = None, *, query_in_gallery: ArrayLike | None = None
) -> np.ndarray:
    """``R_q`` = number of gallery items with the query's label, the query itself excluded.

    ``gallery_labels=None`` is leave-one-out retrieval (every query is also a gallery item):
    ``R_q = |class(q)| - 1``. With a separate gallery, ``query_in_gallery[q]`` says whether query
    ``q`` is itself one of the gallery items (default: none is).

    >>> num_relevant([0, 0, 1]).tolist()          # label 1 is a lone query
    [1, 1, 0]
    >>> num_relevant([0, 2], [0, 0, 1]).tolist()  # query/gallery
    [2, 0]
    """
    q = _np(query_labels).astype(np.int64)
    same_set = gallery_labels is None
    g = q if gallery_labels is None else _np(gallery_labels).astype(np.int64)
    classes, counts = np.unique(g, return_counts=True)
    slot = np.clip(np.searchsorted(classes, q), 0, max(len(classes) - 1, 0))
    found = (classes[slot] == q) if len(classes) else np.zeros(len(q), dtype=bool)
    r = np.where(found, counts[slot] if len(classes) else 0, 0).astype(np.int64)
    if same_set:
        return r - 1
    if query_in_gallery is not None:
        r -= _np(query_in_gallery).astype(bool).astype(np.int64)
    return r


# -------------------------------------------------------------------------------------- Recall@K
def recall_at_k_from_ranks(
    first_positive_ranks: ArrayLike, ks: Iterable[int], num_relevant: ArrayLike
) -> dict[int, float]:
    """Recall@K from the first-positive rank of each query.

    Recall@K = (1 / |Q'|) * sum_{q in Q'} [rank_q <= K],   Q' = {q : R_q > 0}

    where ``rank_q`` is the 1-based position of the first same-class item among q's neighbours
    (ties ordered by gallery index; the query itself is never a neighbour). Equivalently: the share
    of retrievable queries with at least one same-class item among their K nearest neighbours.

    >>> recall_at_k_from_ranks([1, 3, NO_POSITIVE], [1, 4], [1, 2, 0])
    {1: 0.5, 4: 1.0}
    """
    ranks = _np(first_positive_ranks).astype(np.int64)
    r = _np(num_relevant)
    return {int(k): _mean_over_retrievable((ranks <= k).astype(np.float64), r) for k in sorted(set(ks))}


def recall_at_k(
    neighbor_labels: np.ndarray | torch.Tensor | Sequence[Sequence[int]],
    query_labels: ArrayLike,
    ks: Iterable[int],
    num_relevant: ArrayLike,
) -> dict[int, float]:
    """Recall@K for every K in ``ks`` from neighbour lists (see :func:`recall_at_k_from_ranks`).

    The lists must be at least ``max(ks)`` long, or hold every candidate: a positive beyond the
    list end counts as a miss.

    >>> recall_at_k([[1, 0], [0, 1], [0, 0]], [0, 1, 2], ks=[1, 2], num_relevant=[1, 1, 0])
    {1: 0.0, 2: 1.0}
    """
    return recall_at_k_from_ranks(first_positive_rank(neighbor_labels, query_labels), ks, num_relevant)


# ----------------------------------------------------------------------------- MAP@R, R-Precision
def _relevance_within_r(
    neighbor_labels: ArrayLike, query_labels: ArrayLike, num_relevant: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """``rel[q, i] = [label of neighbour i == label(q)] * [i < R_q]`` and ``R`` as arrays."""
    nl = _np(neighbor_labels)
    r = _np(num_relevant).astype(np.int64)
    if nl.ndim != 2 or len(nl) != len(r):
        raise ValueError("neighbor_labels must be (n_query, L) with one row per query")
    if (r > nl.shape[1]).any():
        raise ValueError(f"the neighbour lists ({nl.shape[1]}) are shorter than the largest R ({r.max()})")
    within_r = np.arange(nl.shape[1])[None, :] < r[:, None]
    return (nl == _np(query_labels)[:, None]) & within_r, r


def r_precision(neighbor_labels: ArrayLike, query_labels: ArrayLike, num_relevant: ArrayLike) -> float:
    """Mean R-Precision (Musgrave et al., "A Metric Learning Reality Check", 2020).

    R-Precision_q = (1 / R_q) * #{i <= R_q : neighbour i of q has q's class}

    averaged over the queries with ``R_q > 0``; the lists need at least ``max R_q`` columns.

    >>> r_precision([[0, 1, 0], [1, 0, 0]], [0, 1], num_relevant=[2, 1])
    0.75
    """
    rel, r = _relevance_within_r(neighbor_labels, query_labels, num_relevant)
    per_query = rel.sum(1) / np.maximum(r, 1)
    return _mean_over_retrievable(per_query, r)


def map_at_r(neighbor_labels: ArrayLike, query_labels: ArrayLike, num_relevant: ArrayLike) -> float:
    """Mean Average Precision at R (Musgrave et al. 2020).

    MAP@R_q = (1 / R_q) * sum_{i=1..R_q} P(i) * rel(i),   P(i) = (1 / i) * sum_{j<=i} rel(j)

    where ``rel(i) = 1`` if the i-th neighbour has the query's class. Averaged over queries with
    ``R_q > 0``. Unlike R-Precision it rewards putting the relevant items first within the top R.

    >>> map_at_r([[0, 1, 0]], [0], num_relevant=[2])   # (1/2) * (1/1 + 0)
    0.5
    """
    rel, r = _relevance_within_r(neighbor_labels, query_labels, num_relevant)
    precision_at_i = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)[None, :]
    per_query = (precision_at_i * rel).sum(1) / np.maximum(r, 1)
    return _mean_over_retrievable(per_query, r)


# ------------------------------------------------------------------------------------- clustering
def kmeans(
    points: ArrayLike,
    n_clusters: int,
    *,
    seed: int = 0,
    n_init: int = 1,
    init: np.ndarray | None = None,
    backend: Literal["auto", "sklearn", "faiss"] = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded k-means: ``(cluster index of every row, centroids)``; the one k-means of the project.

    ``sklearn``: ``KMeans(n_clusters, n_init=n_init, random_state=seed)`` (k-means++ init, Lloyd
    to convergence) on the points in their own float dtype, or one run from the ``init`` centroids
    when given. ``faiss`` (float32): ``faiss.Kmeans`` with 20 iterations, ``seed``, ``n_init``
    redos, which is what makes SOP-sized problems (60k points x 11k clusters) take seconds, not an
    hour. ``auto`` picks faiss when installed, no ``init`` is given and
    ``n_samples * n_clusters > SKLEARN_KMEANS_LIMIT``. Fewer distinct points than clusters leaves
    empty or tiny clusters without a warning; callers that care repair them.
    """
    x = np.ascontiguousarray(_np(points))
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    n_clusters = int(min(n_clusters, len(x)))
    if backend == "auto":
        big = len(x) * n_clusters > SKLEARN_KMEANS_LIMIT
        backend = "faiss" if big and init is None and _has_faiss() else "sklearn"
    if backend == "faiss":
        return _faiss_kmeans(x.astype(np.float32), n_clusters, seed, n_init)
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    km = (
        KMeans(n_clusters=n_clusters, init=init, n_init=1, random_state=seed)
        if init is not None
        else KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = km.fit_predict(x)
    return labels.astype(np.int64), km.cluster_centers_


def _faiss_kmeans(x: np.ndarray, n_clusters: int, seed: int, n_init: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    # min_points_per_centroid=1: DML test sets have ~5-60 images per class, which is fine here.
    km = faiss.Kmeans(
        x.shape[1],
        n_clusters,
        niter=20,
        nredo=n_init,
        seed=seed,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=1 << 30,
    )
    km.train(x)
    assert km.centroids is not None  # set by train()
    return km.index.search(x, 1)[1][:, 0].astype(np.int64), km.centroids


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def nmi(
    embeddings: ArrayLike,
    labels: ArrayLike,
    seed: int = 0,
    *,
    n_init: int = 1,
    kmeans_backend: Literal["auto", "sklearn", "faiss"] = "auto",
) -> tuple[float, np.ndarray]:
    """Normalised mutual information between classes and a k-means clustering of the embeddings.

    k-means (see :func:`kmeans`) with as many clusters as distinct labels, then

        NMI = I(Y; C) / ((H(Y) + H(C)) / 2)

    i.e. ``sklearn.metrics.normalized_mutual_info_score(labels, clusters,
    average_method="arithmetic")``. Returns ``(nmi, clusters)`` so that F1 can reuse the clusters.

    >>> x = np.array([[0.0, 1.0], [0.0, 1.1], [5.0, 0.0], [5.1, 0.0]])
    >>> round(nmi(x, [7, 7, 3, 3])[0], 6)
    1.0
    """
    from sklearn.metrics import normalized_mutual_info_score

    y = _np(labels).astype(np.int64)
    x = np.asarray(_np(embeddings), dtype=np.float32)
    clusters, _ = kmeans(x, len(np.unique(y)), seed=seed, n_init=n_init, backend=kmeans_backend)
    score = normalized_mutual_info_score(y, clusters, average_method="arithmetic")
    return float(score), clusters


def f1_score_pairwise(labels_true: ArrayLike, clusters: ArrayLike) -> float:
    """Pairwise clustering F-measure (as in Oh Song et al., "Lifted Structured Feature Embedding").

    Over all unordered pairs of items: TP = pairs in the same cluster *and* the same class,
    precision P = TP / #pairs in the same cluster, recall R = TP / #pairs in the same class,
    F1 = 2PR / (P + R). From the contingency counts n_ij (class i, cluster j) with row sums a_i and
    column sums b_j:

        TP = sum_ij C(n_ij, 2),  P = TP / sum_j C(b_j, 2),  R = TP / sum_i C(a_i, 2)

    Computed with scikit-learn's ``pair_confusion_matrix`` (a sparse contingency table, so SOP's
    11k x 11k table is never built densely). An undefined ratio (no pair at all on one
    side) counts as 0, and so does F1 when P + R = 0.

    >>> f1_score_pairwise([0, 0, 1, 1], [5, 5, 6, 6])
    1.0
    >>> round(f1_score_pairwise([0, 0, 0, 1], [0, 0, 1, 1]), 4)   # P = 1/2, R = 1/3
    0.4
    """
    from sklearn.metrics.cluster import pair_confusion_matrix

    y = _np(labels_true).astype(np.int64)
    c = _np(clusters).astype(np.int64)
    if y.shape != c.shape:
        raise ValueError("labels_true and clusters must have the same length")
    # Ordered pairs (each unordered pair twice): [[TN, FP], [FN, TP]], from a sparse contingency table.
    (_, fp), (fn, tp) = pair_confusion_matrix(y, c).tolist()
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
