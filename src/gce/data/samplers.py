"""Batch sampler for GCE: class-balanced batches drawn from one learner's subset at a time.

Why not pytorch-metric-learning's ``MPerClassSampler``: it draws from the whole dataset, knows
nothing of subsets nor which learner a batch is for, yields a flat index stream meant for a fixed
``batch_size`` and draws from the global RNG, so an interrupted run cannot replay the same batches
of an epoch. Here every epoch's batches are a pure function of ``(seed, epoch, assignment)``,
which is what resuming mid-epoch by skipping the first ``n`` batches needs.
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["SubsetBalancedBatchSampler"]

Plan = list[tuple[int, list[int]]]


def _as_int_array(name: str, values: np.ndarray | list[int]) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative")
    return arr


def _pools_by_group(labels: np.ndarray, groups: np.ndarray, num_groups: int) -> list[list[np.ndarray]]:
    """For each group, the sample indices of each class present in it (one sort, no loop over N)."""
    key = groups * (int(labels.max()) + 1) + labels
    order = np.argsort(key, kind="stable")
    _, starts = np.unique(key[order], return_index=True)
    pools: list[list[np.ndarray]] = [[] for _ in range(num_groups)]
    for pool in np.split(order, starts[1:]):
        pools[int(groups[pool[0]])].append(pool)
    return pools


class SubsetBalancedBatchSampler:
    """Batches of ``P`` classes x ``M`` images, each from ONE learner's subset, round-robin.

    Batch ``b`` of every epoch belongs to learner ``b % K`` (``K`` = number of groups), and all its
    images come from that learner's subset: ``P`` distinct classes of the subset, ``M`` images of
    each (without replacement when the class has at least ``M`` images in the subset, with
    replacement otherwise). Images are grouped by class inside a batch.

    Determinism: the batches of epoch ``e`` come from ``numpy.random.default_rng([seed, e])``
    (a seed sequence rather than ``seed + e``, so that runs with neighbouring seeds do not share
    epochs) and depend only on ``(seed, e, group_of_sample, labels)``. A resumed run that restores
    the same assignment gets the same plan and skips the batches already done.

    If a subset has fewer than ``P`` classes, its batches use all of them (``len(classes) x M``
    images) and a ``UserWarning`` is issued once per learner and assignment: this can happen
    legitimately after an unbalanced meta-class update, and a smaller batch is better than
    aborting a long run. A subset with fewer than 2 classes is an error (no triplet possible).

    ``plan_epoch(epoch)`` -> ``[(learner, indices), ...]``: the trainer takes the learner of each
    batch from the plan, may skip a prefix (resume), and hands the plan to its one DataLoader
    (:mod:`gce.training.epoch_loader`).

    Args:
        labels: class of every sample, ``(N,)`` non-negative ints.
        group_of_sample: learner of every sample, ``(N,)`` ints in ``0..K-1`` (for class-level
            strategies ``assignment[labels]``). ``None``: all zeros (single subset, for ``K = 1``
            or fine-tuning the full embedding on all data).
        classes_per_batch: ``P`` (>= 2).
        samples_per_class: ``M`` (>= 1; >= 2 gives positives from distinct images).
        batches_per_epoch: default ``max(1, N // (P * M))``.
        seed: base seed.
        num_groups: ``K``; default ``max(group_of_sample) + 1``. Give it to detect a learner
            whose subset is empty even when it is the last one.
    """

    def __init__(
        self,
        labels: np.ndarray | list[int],
        group_of_sample: np.ndarray | list[int] | None = None,
        classes_per_batch: int = 8,
        samples_per_class: int = 4,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        num_groups: int | None = None,
    ) -> None:
        self.labels = _as_int_array("labels", labels)
        if self.labels.size == 0:
            raise ValueError("labels is empty: nothing to sample")
        if classes_per_batch < 2:
            raise ValueError(f"classes_per_batch must be >= 2 (triplets need 2 classes), got {classes_per_batch}")
        if samples_per_class < 1:
            raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        self.batches_per_epoch = batches_per_epoch or max(
            1, len(self.labels) // (classes_per_batch * samples_per_class)
        )
        self.seed = seed
        self.set_assignment(group_of_sample, num_groups)

    # ------------------------------------------------------------------ state
    def set_assignment(self, group_of_sample: np.ndarray | list[int] | None, num_groups: int | None = None) -> None:
        """Use new subsets (after a meta-class update, or all zeros for fine-tuning).

        Raises ``ValueError`` naming the learner whose subset has fewer than 2 classes.
        """
        if group_of_sample is None:
            groups = np.zeros(len(self.labels), dtype=np.int64)
        else:
            groups = _as_int_array("group_of_sample", group_of_sample)
        if groups.shape != self.labels.shape:
            raise ValueError(f"group_of_sample has {groups.shape[0]} entries for {self.labels.shape[0]} labels")
        k = int(groups.max()) + 1 if num_groups is None else num_groups
        if k < int(groups.max()) + 1:
            raise ValueError(f"group_of_sample uses group {int(groups.max())} but num_groups={k}")
        pools = _pools_by_group(self.labels, groups, k)
        for learner, class_pools in enumerate(pools):
            if len(class_pools) < 2:
                raise ValueError(
                    f"learner {learner}'s subset has {len(class_pools)} class(es); a triplet needs "
                    f"at least 2 classes, so every learner needs 2 or more"
                )
        self.group_of_sample = groups
        self.num_groups = k
        self._pools = pools
        self._warned: set[int] = set()

    # --------------------------------------------------------------- planning
    def learner_of_batch(self, batch: int) -> int:
        """Learner trained by batch ``batch`` (index within the epoch, skipped batches included)."""
        return batch % self.num_groups

    def plan_epoch(self, epoch: int) -> Plan:
        """All batches of ``epoch`` as ``(learner, indices)``; deterministic in (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        return [
            (self.learner_of_batch(b), self._draw_batch(self.learner_of_batch(b), rng))
            for b in range(self.batches_per_epoch)
        ]

    def _draw_batch(self, learner: int, rng: np.random.Generator) -> list[int]:
        pools = self._pools[learner]
        num_classes = min(self.classes_per_batch, len(pools))
        if num_classes < self.classes_per_batch and learner not in self._warned:
            self._warned.add(learner)
            warnings.warn(
                f"learner {learner}'s subset has only {len(pools)} classes, fewer than "
                f"classes_per_batch={self.classes_per_batch}; its batches use all {len(pools)}",
                UserWarning,
                stacklevel=3,
            )
        batch: list[int] = []
        for c in rng.choice(len(pools), size=num_classes, replace=False):
            pool = pools[c]
            # Small classes are drawn with replacement so every batch keeps the P x M layout.
            picks = rng.choice(len(pool), size=self.samples_per_class, replace=len(pool) < self.samples_per_class)
            batch.extend(pool[picks].tolist())
        return batch
