"""Balanced k-means: groups of (nearly) equal size, each with at least the points a triplet needs.

Used by the ``class_proxy`` and ``samples`` strategies (:func:`cluster_points`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment

from gce.evaluation.metrics import kmeans
from gce.metaclass.assignments import min_group_size, normalise_rows

__all__ = ["BALANCE_ITERATIONS", "EXACT_BALANCE_MAX_POINTS", "cluster_points"]

# Above this many points the exact balanced assignment (an n x n Hungarian problem, O(n^3)) is too
# slow and too big in memory; a greedy regret-ordered assignment with the same quotas is used.
EXACT_BALANCE_MAX_POINTS = 2000
BALANCE_ITERATIONS = 10


def _sq_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``n x K`` squared Euclidean distances (expanded form: no n x K x D temporary)."""
    d = (points**2).sum(1)[:, None] - 2.0 * points @ centroids.T + (centroids**2).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _centroids(points: np.ndarray, groups: np.ndarray, k: int, old: np.ndarray) -> np.ndarray:
    """Normalised group means (spherical k-means step); an empty group keeps its old centroid."""
    sums = np.zeros((k, points.shape[1]))
    np.add.at(sums, groups, points)
    counts = np.bincount(groups, minlength=k)
    new = old.copy()
    filled = counts > 0
    new[filled] = normalise_rows(sums[filled])
    return new


def _enforce_min_size(points: np.ndarray, groups: np.ndarray, k: int, min_size: int) -> np.ndarray:
    """Move points into groups smaller than ``min_size`` until none is left.

    A non-empty small group takes the nearest point (to its mean) from a group that can spare one;
    an empty group is reseeded with the point of the largest group farthest from that group's
    mean, i.e. the largest group is split. Needs ``len(points) >= k * min_size``.
    """
    groups = groups.copy()
    counts = np.bincount(groups, minlength=k)
    while (counts < min_size).any():
        small = int(np.argmin(counts))
        if counts[small] > 0:
            target = points[groups == small].mean(0, keepdims=True)
            candidates = np.flatnonzero(counts[groups] > min_size)
            pick = candidates[np.argmin(_sq_distances(points[candidates], target)[:, 0])]
        else:
            largest = int(np.argmax(counts))
            members = np.flatnonzero(groups == largest)
            centre = points[members].mean(0, keepdims=True)
            pick = members[np.argmax(_sq_distances(points[members], centre)[:, 0])]
        counts[groups[pick]] -= 1
        groups[pick] = small
        counts[small] += 1
    return groups


def _count_quotas(dist: np.ndarray) -> np.ndarray:
    """Group sizes ``floor(n/K)`` or ``floor(n/K)+1`` summing to ``n``; the ``n mod K`` extra
    places go to the groups most in demand (most points nearest to them), to disturb k-means
    least."""
    n, k = dist.shape
    quotas = np.full(k, n // k, dtype=np.int64)
    demand = np.bincount(dist.argmin(1), minlength=k)
    quotas[np.argsort(-demand, kind="stable")[: n % k]] += 1
    return quotas


def _hungarian_quota_assign(dist: np.ndarray, quotas: np.ndarray) -> np.ndarray:
    """Optimal assignment with exact group sizes: every group is replicated ``quota`` times into
    slots, so the problem becomes a square n x n linear assignment."""
    slot_group = np.repeat(np.arange(dist.shape[1]), quotas)
    rows, cols = linear_sum_assignment(dist[:, slot_group])
    groups = np.empty(dist.shape[0], dtype=np.int64)
    groups[rows] = slot_group[cols]
    return groups


def _greedy_capacity_assign(dist: np.ndarray, weights: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Greedy assignment under per-group capacities (in units of ``weights``).

    Points with the largest regret (second-best minus best distance) choose first, since they lose
    most by not getting their nearest group. Each goes to its nearest group with room left; if none
    has room (possible only with unequal weights) it goes to the group with the most room left.
    """
    n, k = dist.shape
    order_of_groups = np.argsort(dist, axis=1)
    sorted_d = np.take_along_axis(dist, order_of_groups, axis=1)
    regret = sorted_d[:, 1] - sorted_d[:, 0] if k > 1 else np.zeros(n)
    room = capacity.astype(np.float64).copy()
    groups = np.empty(n, dtype=np.int64)
    for i in np.argsort(-regret, kind="stable"):
        fits = room[order_of_groups[i]] >= weights[i]
        g = order_of_groups[i][np.argmax(fits)] if fits.any() else int(np.argmax(room))
        groups[i] = g
        room[g] -= weights[i]
    return groups


def _balanced_step(dist: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """One balanced assignment step for the current centroids."""
    n, k = dist.shape
    if weights is None:
        quotas = _count_quotas(dist)
        if n <= EXACT_BALANCE_MAX_POINTS:
            return _hungarian_quota_assign(dist, quotas)
        return _greedy_capacity_assign(dist, np.ones(n), quotas)
    capacity = np.full(k, math.ceil(float(weights.sum()) / k))
    return _greedy_capacity_assign(dist, weights, capacity)


def cluster_points(
    points: np.ndarray,
    num_clusters: int,
    seed: int,
    *,
    balanced: bool = False,
    weights: np.ndarray | None = None,
    n_init: int = 10,
    n_iter: int = BALANCE_ITERATIONS,
    init_groups: np.ndarray | None = None,
) -> np.ndarray:
    """Cluster unit vectors into ``num_clusters`` groups; returns one group id per point.

    Unbalanced: scikit-learn k-means (seeded, ``n_init`` restarts). With ``init_groups`` (a previous
    grouping of the same points) k-means starts from those groups' normalised means instead: a
    refresh that moves only the points whose nearest group changed, rather than a re-clustering
    whose result depends on the restart.

    Balanced (``balanced=True``), starting from the k-means centroids, for up to ``n_iter`` rounds
    (stopping early when nothing changes): assign points under size constraints, then recompute
    each centroid as the normalised mean of its points.

    * ``weights is None`` -- balance the *number of points*: sizes are exactly ``floor(n/K)`` or
      ``floor(n/K)+1`` (differ by at most 1). Solved optimally by the Hungarian algorithm on the
      point-to-slot distance matrix, each centroid replicated into as many slots as its quota;
      above ``EXACT_BALANCE_MAX_POINTS`` points, by a greedy regret-ordered assignment with the
      same quotas (same sizes, slightly worse distances).
    * ``weights`` given (e.g. images per class) -- balance the *total weight*: each group has a
      capacity ``ceil(sum(w)/K)`` and points are placed greedily; a point that fits nowhere goes to
      the group with most room, so totals differ by at most about twice the largest weight.

    In every case each group ends with at least 2 points when ``n >= 2K`` (else at least 1): empty
    or singleton k-means clusters are repaired by moving/splitting (see ``_enforce_min_size``).
    """
    n = points.shape[0]
    if not 1 <= num_clusters <= n:
        raise ValueError(f"cannot make {num_clusters} clusters from {n} points")
    if num_clusters == 1:
        return np.zeros(n, dtype=np.int64)
    init = None
    if init_groups is not None:
        init = _centroids(points, np.asarray(init_groups), num_clusters, normalise_rows(points[:num_clusters].copy()))
    # Fewer distinct points than clusters leaves empty or tiny clusters: _enforce_min_size repairs them.
    groups, centroids = kmeans(points, num_clusters, seed=seed, n_init=n_init, init=init, backend="sklearn")
    if balanced:
        w = None if weights is None else np.asarray(weights, dtype=np.float64)
        centroids = normalise_rows(centroids)
        for _ in range(n_iter):
            new_groups = _balanced_step(_sq_distances(points, centroids), w)
            converged = np.array_equal(new_groups, groups)
            groups = new_groups
            if converged:
                break
            centroids = _centroids(points, groups, num_clusters, centroids)
    return _enforce_min_size(points, groups, num_clusters, min_group_size(n, num_clusters))
