"""The vectors a gce index stores and searches: learner-normalised, unit length, learner weights
folded into the query.

An ensemble embedding is the concatenation of K unit vectors (one per learner). The index stores
it divided by sqrt(K), a unit vector, so the inner product of two stored vectors is their cosine
similarity, which equals the mean of the K learners' cosines.

With weights ``w`` (summing to 1), the score of gallery item ``g`` for query ``q`` is
``sum_k w_k <q_k, g_k>``, the weighted mean of the learners' cosines. Because the gallery vector is
``g / sqrt(K)``, this is one inner product with the rescaled query ``q' = concat(w_k sqrt(K) q_k)``:
the same index answers every weighting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gce.errors import GceError
from gce.retrieval.embedder import normalize_learners

__all__ = ["learner_weights", "query_vectors", "stored_vectors"]


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
