"""The two readings of the method (``metaclass.learner_data``), each one object with one interface.

* :class:`SubsetReading` (``subset``, the default): learner ``k`` trains on its meta-class's data
  subset with class labels; the sampler draws each batch from one learner's subset.
* :class:`AllDataReading` (``all``): every learner trains on every batch, labelled by its own
  partition of the classes into meta-classes; the sampler draws from all data.

The trainer asks a reading what it needs before an epoch (:meth:`~Reading.due`,
:attr:`~Reading.needs_embeddings`), hands it the embeddings of a refresh (:meth:`~Reading.update`),
lets it configure the sampler (:meth:`~Reading.configure_sampler`) and asks it for the loss of a
batch (:meth:`~Reading.batch_loss`). :func:`build_reading` chooses the reading once, from the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor

from gce.data.samplers import SubsetBalancedBatchSampler
from gce.losses import GCELoss
from gce.metaclass import MetaClassStrategy, assignment_stats, build_strategy, group_of_sample
from gce.metaclass.relabel import PerLearnerMetaClasses

if TYPE_CHECKING:
    from gce.config import ExperimentConfig

__all__ = ["AllDataReading", "MetaClassUpdate", "Reading", "SubsetReading", "build_reading"]

LossParts = tuple[Tensor, dict[str, float]]


@dataclass(frozen=True)
class MetaClassUpdate:
    """What a refresh reports: the values of the log's ``metaclass`` record and a one-line summary."""

    values: dict[str, Any]
    message: str


class Reading(Protocol):
    needs_embeddings: bool
    """Whether :meth:`update` needs the embeddings of an un-augmented pass over the training set."""
    assignment: np.ndarray | None
    """The current meta-classes (checkpointed); ``None`` before the first refresh."""

    def due(self, epoch: int) -> bool:
        """Whether the meta-classes must be refreshed before ``epoch``."""
        ...

    def update(self, epoch: int, embeddings: Tensor | None) -> MetaClassUpdate:
        """Refresh the meta-classes (matched to the previous ones) before ``epoch``."""
        ...

    def restore(self, assignment: np.ndarray) -> None:
        """Take the meta-classes of a checkpoint."""
        ...

    def configure_sampler(self, sampler: SubsetBalancedBatchSampler) -> None:
        """Give the sampler the subsets its batches come from under the current meta-classes."""
        ...

    def batch_loss(self, loss: GCELoss, embeddings: Tensor, labels: Tensor, learner: int | None) -> LossParts:
        """Loss of a batch planned for ``learner`` (``None``: the full embedding, as in fine-tuning)."""
        ...


class _Refreshed:
    """What both readings share: the training labels, the learner slices and the refresh schedule."""

    def __init__(
        self,
        learner_slices: list[slice],
        labels: np.ndarray,
        num_classes: int,
        *,
        update_every: int,
        seed: int,
        needs_embeddings: bool,
        refreshes: bool,
    ) -> None:
        self.learner_slices = learner_slices
        self.labels = labels
        self.num_classes = num_classes
        self.update_every = update_every
        self.seed = seed
        self.needs_embeddings = needs_embeddings
        self.refreshes = refreshes
        self.assignment: np.ndarray | None = None

    def due(self, epoch: int) -> bool:
        return self.assignment is None or (epoch % self.update_every == 0 and self.refreshes)


class SubsetReading(_Refreshed):
    """``learner_data: subset``: learner ``k`` sees the classes of meta-class ``k``, with their labels."""

    def __init__(
        self,
        strategy: MetaClassStrategy,
        learner_slices: list[slice],
        labels: np.ndarray,
        num_classes: int,
        *,
        update_every: int,
        seed: int,
    ) -> None:
        super().__init__(
            learner_slices,
            labels,
            num_classes,
            update_every=update_every,
            seed=seed,
            needs_embeddings=strategy.needs_embeddings,
            refreshes=strategy.refreshes,
        )
        self.strategy = strategy

    def update(self, epoch: int, embeddings: Tensor | None) -> MetaClassUpdate:
        new = self.strategy.assign(
            embeddings, self.labels, self.num_classes, previous=self.assignment, seed=self.seed + epoch
        )
        stats = assignment_stats(
            new, self.labels, self.num_classes, previous=self.assignment, level=self.strategy.level
        )
        self.assignment = np.asarray(new, dtype=np.int64)
        values = {
            "classes_per_learner": stats.classes_per_learner,
            "images_per_learner": stats.images_per_learner,
            "moved_fraction": stats.moved_fraction,
        }
        return MetaClassUpdate(
            values,
            f"meta-classes updated: classes/learner {stats.classes_per_learner}, "
            f"images/learner {stats.images_per_learner}, moved {stats.moved_fraction:.1%}",
        )

    def restore(self, assignment: np.ndarray) -> None:
        self.assignment = np.asarray(assignment, dtype=np.int64)

    def configure_sampler(self, sampler: SubsetBalancedBatchSampler) -> None:
        assert self.assignment is not None, "update() or restore() comes first"
        groups = group_of_sample(self.assignment, self.labels, self.strategy.level)
        sampler.set_assignment(groups, num_groups=len(self.learner_slices))

    def batch_loss(self, loss: GCELoss, embeddings: Tensor, labels: Tensor, learner: int | None) -> LossParts:
        # One learner owns the whole embedding: its loss is the full loss (not counted twice).
        if learner is None or len(self.learner_slices) == 1:
            return loss(embeddings, labels, None)
        return loss(embeddings, labels, self.learner_slices[learner])


class AllDataReading(_Refreshed):
    """``learner_data: all``: every learner sees all data, labelled by its own meta-classes (K x C)."""

    def __init__(
        self,
        per_learner: PerLearnerMetaClasses,
        learner_slices: list[slice],
        labels: np.ndarray,
        num_classes: int,
        *,
        update_every: int,
        seed: int,
        device: torch.device,
    ) -> None:
        super().__init__(
            learner_slices,
            labels,
            num_classes,
            update_every=update_every,
            seed=seed,
            needs_embeddings=per_learner.needs_embeddings,
            refreshes=per_learner.base.refreshes,
        )
        self.per_learner = per_learner
        self.device = device
        self.meta_labels: Tensor | None = None

    def update(self, epoch: int, embeddings: Tensor | None) -> MetaClassUpdate:
        new = self.per_learner.assign(
            embeddings,
            self.labels,
            self.num_classes,
            self.learner_slices,
            previous=self.assignment,
            seed=self.seed + epoch,
        )
        previous = self.assignment if self.assignment is not None else [None] * len(new)
        rows = [
            assignment_stats(
                row, self.labels, self.num_classes, previous=old, num_metaclasses=self.per_learner.num_metaclasses
            )
            for row, old in zip(new, previous, strict=True)
        ]
        self.restore(new)
        moved = float(np.mean([r.moved_fraction for r in rows]))
        # Every learner sees every class; the sizes that matter are its meta-classes'.
        values = {
            "classes_per_learner": [self.num_classes] * len(rows),
            "images_per_learner": [len(self.labels)] * len(rows),
            "moved_fraction": moved,
            "classes_per_metaclass": [r.classes_per_learner for r in rows],
        }
        sizes = rows[0].classes_per_learner
        return MetaClassUpdate(
            values,
            f"per-learner meta-classes updated: {len(rows)} learners x {len(sizes)} "
            f"meta-classes of {min(sizes)}-{max(sizes)} classes, moved {moved:.1%}",
        )

    def restore(self, assignment: np.ndarray) -> None:
        self.assignment = np.asarray(assignment, dtype=np.int64)
        self.meta_labels = torch.from_numpy(self.assignment).to(self.device)

    def configure_sampler(self, sampler: SubsetBalancedBatchSampler) -> None:
        sampler.set_assignment(None, num_groups=1)  # batches come from all data

    def batch_loss(self, loss: GCELoss, embeddings: Tensor, labels: Tensor, learner: int | None) -> LossParts:
        if learner is None:
            return loss(embeddings, labels, None)
        assert self.meta_labels is not None, "update() or restore() comes first"
        return loss.all_learners(embeddings, labels, self.learner_slices, [row[labels] for row in self.meta_labels])


def build_reading(
    cfg: ExperimentConfig, learner_slices: list[slice], labels: np.ndarray, num_classes: int, device: torch.device
) -> Reading:
    """The reading ``cfg.metaclass.learner_data`` names, with its meta-class strategy.

    With one learner both readings are the single-metric baseline; it is run as a subset reading.
    """
    mc, num_learners = cfg.metaclass, cfg.model.num_learners
    relabel = mc.learner_data == "all" and num_learners > 1
    strategy = build_strategy(
        mc.strategy,
        num_metaclasses=mc.num_metaclasses if relabel else num_learners,
        balanced=mc.balanced,
        balance_by=mc.balance_by,
        redraw=mc.redraw,
        warm_start=mc.warm_start,
    )
    common = {"update_every": mc.update_every, "seed": cfg.train.seed}
    if relabel:
        return AllDataReading(
            PerLearnerMetaClasses(strategy, num_learners), learner_slices, labels, num_classes, device=device, **common
        )
    return SubsetReading(strategy, learner_slices, labels, num_classes, **common)
