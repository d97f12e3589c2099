"""What to log after each meta-class update: subset sizes, moved classes and images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gce.metaclass.assignments import ArrayLike, Level, group_of_sample, labels_array
from gce.metaclass.matching import moved_fraction

__all__ = ["AssignmentStats", "assignment_stats"]


@dataclass(frozen=True)
class AssignmentStats:
    """What to log after each meta-class update.

    Attributes:
        level: ``"class"`` or ``"sample"``.
        classes_per_learner: distinct classes with images in each subset (at class level, classes
            assigned, including any without images).
        images_per_learner: images in each subset.
        moved_fraction: share of classes (class level) or samples (sample level) whose learner
            changed since ``previous``; 0.0 without ``previous``.
        moved_images_fraction: share of images whose learner changed (comparable across levels).
        split_classes: classes whose images lie in more than one subset (always 0 at class level).
    """

    level: str
    classes_per_learner: list[int]
    images_per_learner: list[int]
    moved_fraction: float
    moved_images_fraction: float
    split_classes: int


def assignment_stats(
    assignment: np.ndarray,
    labels: ArrayLike,
    num_classes: int,
    previous: np.ndarray | None = None,
    level: Level = "class",
    num_metaclasses: int | None = None,
) -> AssignmentStats:
    """Sizes of each learner's subset and how much moved since ``previous``.

    ``num_metaclasses`` defaults to ``max(assignment) + 1``; pass it so that a meta-class left empty
    still shows up with zeros.
    """
    groups = np.asarray(assignment, dtype=np.int64)
    lab = labels_array(labels, num_classes)
    k = int(num_metaclasses if num_metaclasses is not None else (groups.max() + 1 if groups.size else 1))
    per_sample = group_of_sample(groups, lab, level)
    images = np.bincount(per_sample, minlength=k)
    if level == "class":
        classes = np.bincount(groups, minlength=k)
        split = 0
    else:
        pairs = np.unique(per_sample * num_classes + lab)  # distinct (learner, class) pairs
        classes = np.bincount(pairs // num_classes, minlength=k)
        split = int((np.bincount(pairs % num_classes, minlength=num_classes) > 1).sum())
    moved, moved_images = 0.0, 0.0
    if previous is not None:
        prev = np.asarray(previous, dtype=np.int64)
        moved = moved_fraction(prev, groups)
        moved_images = moved_fraction(group_of_sample(prev, lab, level), per_sample)
    return AssignmentStats(
        level=level,
        classes_per_learner=[int(x) for x in classes],
        images_per_learner=[int(x) for x in images],
        moved_fraction=moved,
        moved_images_fraction=moved_images,
        split_classes=split,
    )
