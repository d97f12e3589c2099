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
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from gce.errors import GceError
from gce.retrieval.embedder import normalize_learners

__all__ = ["learner_weights", "query_vectors", "stored_vectors"]


def stored_vectors(embeddings: np.ndarray, slices: Sequence[slice]) -> np.ndarray:
    """Learner-normalised embeddings scaled to unit length (what the faiss index holds)."""
    return normalize_learners(embeddings, slices) / np.float32(math.sqrt(len(slices)))


def _numbers(values: Any, what: str, kind: type) -> list:
    """``values`` as a list of numbers of ``kind`` (bools, strings, non-sequences refused: one line)."""
    try:
        items = list(values)
    except TypeError:
        raise GceError(f"{what} must be a list of numbers, got {values!r}") from None
    for v in items:
        if isinstance(v, bool) or not isinstance(v, kind):
            raise GceError(f"{what} must be {'integers' if kind is numbers.Integral else 'numbers'}, got {v!r}")
    return items


def learner_weights(
    num_learners: int, learners: Sequence[int] | None = None, weights: Sequence[float] | None = None
) -> np.ndarray:
    """Per-learner weights summing to 1 from a learner subset or explicit weights (one-line errors).

    Only the ratios of ``weights`` matter: they are divided by their largest value before they are
    summed, so values near the float64 limit (``1e308,1e308``) give equal weights instead of an
    infinite sum that would zero every score. NaN and infinite weights are refused.
    """
    if learners is not None and weights is not None:
        raise GceError("give learners or weights, not both")
    if weights is not None:
        w = np.asarray(_numbers(weights, "weights", numbers.Real), dtype=np.float64)
        if w.shape != (num_learners,):
            raise GceError(f"weights: the model has {num_learners} learners, got {len(w)} weights (one per learner)")
        if not np.isfinite(w).all() or (w < 0).any() or w.max() <= 0:
            raise GceError(f"weights must be finite, non-negative numbers, not all zero, got {list(weights)}")
        w = w / w.max()  # in (0, 1]: the sum below is at most K, never infinite
    elif learners is not None:
        chosen = [int(k) for k in _numbers(learners, "learners", numbers.Integral)]
        if not chosen:
            raise GceError("learners: give at least one learner")
        if len(set(chosen)) != len(chosen):
            raise GceError(f"learners: {chosen} names a learner twice")
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
