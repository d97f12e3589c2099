"""Assignments of classes or samples to meta-classes: input coercion, checks, per-sample groups.

An assignment is an integer array with values in ``0..M-1``; at class level it has one entry per
class, at sample level one per image (see :mod:`gce.metaclass.strategies`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

__all__ = [
    "ArrayLike",
    "Level",
    "check_num_metaclasses",
    "check_previous",
    "embeddings_array",
    "group_of_sample",
    "labels_array",
    "min_group_size",
    "normalise_rows",
    "to_numpy",
]

Level = Literal["class", "sample"]
ArrayLike = torch.Tensor | np.ndarray


def to_numpy(x: ArrayLike, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def labels_array(labels: ArrayLike, num_classes: int) -> np.ndarray:
    lab = to_numpy(labels, np.int64)
    if lab.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {lab.shape}")
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    return lab


def embeddings_array(embeddings: ArrayLike | None, num_samples: int) -> np.ndarray:
    if embeddings is None:
        raise ValueError("this strategy needs embeddings, got None")
    emb = to_numpy(embeddings, np.float64)
    if emb.ndim != 2 or emb.shape[0] != num_samples:
        raise ValueError(f"embeddings must be {num_samples} x D, got shape {emb.shape}")
    # A diverged model produces NaN embeddings; say so instead of failing deep inside k-means.
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or infinite values (did training diverge?)")
    return emb


def normalise_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def check_num_metaclasses(num_metaclasses: int, num_classes: int) -> None:
    if num_metaclasses < 1:
        raise ValueError(f"num_metaclasses must be >= 1, got {num_metaclasses}")
    if num_metaclasses > num_classes:
        raise ValueError(
            f"num_metaclasses={num_metaclasses} is larger than the number of training classes "
            f"({num_classes}): every meta-class needs at least one class; use at most "
            f"{num_classes} meta-classes"
        )


def check_previous(previous: np.ndarray | None, length: int, num_metaclasses: int, what: str) -> np.ndarray | None:
    if previous is None:
        return None
    prev = np.asarray(previous, dtype=np.int64)
    if prev.shape != (length,):
        raise ValueError(f"previous assignment must have one entry per {what} ({length}), got shape {prev.shape}")
    if prev.size and (prev.min() < 0 or prev.max() >= num_metaclasses):
        raise ValueError(f"previous assignment values must lie in 0..{num_metaclasses - 1}")
    return prev


def min_group_size(num_points: int, num_groups: int) -> int:
    """Two items per group when possible: a triplet needs a positive class and a negative class."""
    return 2 if num_points >= 2 * num_groups else 1


def group_of_sample(assignment: np.ndarray, labels: ArrayLike, level: Level) -> np.ndarray:
    """Learner of every sample: ``assignment[labels]`` at class level, the assignment itself at
    sample level. This is what the batch sampler takes."""
    assignment = np.asarray(assignment, dtype=np.int64)
    if level == "class":
        return assignment[to_numpy(labels, np.int64)]
    if level == "sample":
        return assignment.copy()
    raise ValueError(f"level must be 'class' or 'sample', got {level!r}")
