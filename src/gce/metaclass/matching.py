"""Keep meta-classes attached to the same learner across updates (Hungarian matching).

k-means numbers its clusters arbitrarily, so after a meta-class update "cluster 0" can be a
completely different set of classes than before. Learner ``k`` has been trained on its old subset;
handing it an unrelated subset throws that specialisation away. We therefore relabel the new
clusters so that the total overlap with the old ones is maximal, as Divide-and-Conquer's
``reassignment.py`` does.

Both functions work on any item level: classes (arrays of length ``C``) or samples (length ``N``).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["match_to_previous", "moved_fraction", "overlap_matrix"]


def _as_groups(name: str, assignment: np.ndarray, num_groups: int) -> np.ndarray:
    arr = np.asarray(assignment)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= num_groups):
        raise ValueError(f"{name} values must lie in 0..{num_groups - 1}")
    return arr.astype(np.int64, copy=False)


def _as_weights(weights: np.ndarray | None, size: int) -> np.ndarray:
    if weights is None:
        return np.ones(size, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (size,):
        raise ValueError(f"weights must have shape ({size},), got {w.shape}")
    if (w < 0).any():
        raise ValueError("weights must be non-negative")
    return w


def overlap_matrix(
    old_assignment: np.ndarray,
    new_assignment: np.ndarray,
    num_groups: int,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    r"""Contingency matrix ``O[i, j] = sum of weights of items in old group i and new group j``.

    Built with one ``np.add.at`` over the items (no loop over groups).
    """
    old = _as_groups("old_assignment", old_assignment, num_groups)
    new = _as_groups("new_assignment", new_assignment, num_groups)
    if old.shape != new.shape:
        raise ValueError(f"assignments differ in length: {old.shape[0]} vs {new.shape[0]}")
    w = _as_weights(weights, old.shape[0])
    overlap = np.zeros((num_groups, num_groups), dtype=np.float64)
    np.add.at(overlap, (old, new), w)
    return overlap


def match_to_previous(
    old_assignment: np.ndarray,
    new_assignment: np.ndarray,
    num_groups: int,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    r"""Relabel ``new_assignment`` so that each learner keeps as much of its old data as possible.

    Finds the permutation :math:`\pi` of group ids maximising
    :math:`\sum_j O[\pi(j), j]` with :math:`O` the :func:`overlap_matrix` (weighted by
    ``weights``, e.g. images per class, so that keeping a big class counts more than a small one),
    solved exactly with ``scipy.optimize.linear_sum_assignment``; returns
    :math:`\pi(\text{new})`. The partition itself is unchanged, only its group ids.

    Example:
        >>> match_to_previous(np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0]), 2)
        array([0, 0, 1, 1])
    """
    overlap = overlap_matrix(old_assignment, new_assignment, num_groups, weights)
    old_ids, new_ids = linear_sum_assignment(overlap, maximize=True)
    relabel = np.empty(num_groups, dtype=np.int64)
    relabel[new_ids] = old_ids
    return relabel[np.asarray(new_assignment, dtype=np.int64)]


def moved_fraction(
    old_assignment: np.ndarray,
    new_assignment: np.ndarray,
    weights: np.ndarray | None = None,
) -> float:
    """Weighted share of items whose group id changed (0.0 for no items or zero total weight).

    Compares ids as they are; call it after :func:`match_to_previous` so that a mere renumbering
    does not count as movement.
    """
    old = np.asarray(old_assignment)
    new = np.asarray(new_assignment)
    if old.shape != new.shape or old.ndim != 1:
        raise ValueError(f"assignments must be 1-D of equal length, got {old.shape} and {new.shape}")
    w = _as_weights(weights, old.shape[0])
    total = float(w.sum())
    if total == 0.0:
        return 0.0
    return float(w[old != new].sum() / total)
