"""``loss.proxy_warm_start``: a proxy loss's proxies set to the class proxies at every meta-class refresh."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gce.data.samplers import SubsetBalancedBatchSampler
from gce.losses import GCELoss, ZooGCELoss
from gce.metaclass.proxies import class_proxies
from gce.training.readings import MetaClassUpdate, Reading

__all__ = ["ProxyWarmStart"]


class ProxyWarmStart:
    """A reading whose every refresh also sets the loss's proxies to the class proxies of the
    refresh's embeddings (``loss.proxy_warm_start``): learner ``k``'s to those of its slice (over
    its meta-classes under ``learner_data: all``), the whole embedding's to those of all columns.

    The class proxies (:func:`~gce.metaclass.proxies.class_proxies`, normalised class means) are what
    the ``class_proxy`` strategy clusters; the refresh embeds the training set for them whatever
    the strategy. A class without images keeps its proxy; the optimiser's moments are kept.
    """

    needs_embeddings = True

    def __init__(self, base: Reading, loss: ZooGCELoss, labels: np.ndarray, num_classes: int) -> None:
        self.base, self.loss, self.labels, self.num_classes = base, loss, labels, num_classes

    def around(self, base: Reading, loss: ZooGCELoss) -> ProxyWarmStart:
        """The same warm start around another reading and loss (a distributed run's)."""
        return ProxyWarmStart(base, loss, self.labels, self.num_classes)

    @property
    def assignment(self) -> np.ndarray | None:
        return self.base.assignment

    @assignment.setter
    def assignment(self, value: np.ndarray | None) -> None:
        self.base.assignment = value

    def due(self, epoch: int) -> bool:
        return self.base.due(epoch)

    def restore(self, assignment: np.ndarray) -> None:
        self.base.restore(assignment)

    def configure_sampler(self, sampler: SubsetBalancedBatchSampler) -> None:
        self.base.configure_sampler(sampler)

    def batch_loss(
        self, loss: GCELoss, embeddings: Tensor, labels: Tensor, learner: int | None
    ) -> tuple[Tensor, dict[str, float]]:
        return self.base.batch_loss(loss, embeddings, labels, learner)

    def update(self, epoch: int, embeddings: Tensor | None) -> MetaClassUpdate:
        update = self.base.update(epoch, embeddings)
        assert embeddings is not None  # needs_embeddings
        labels = torch.from_numpy(np.asarray(self.labels, dtype=np.int64))
        assignment = self.base.assignment
        # learner_data=all: learner k's labels are its meta-classes (the assignment's row k).
        per_learner = assignment is not None and assignment.ndim == 2
        count = 0
        for part, rows in self.loss.proxy_terms():
            if part is None:
                proxies = class_proxies(embeddings, labels, self.num_classes)
            elif per_learner:
                assert assignment is not None
                meta = torch.from_numpy(assignment[self.loss.learner_slices.index(part)])[labels]
                proxies = class_proxies(embeddings[:, part], meta, rows.shape[0])
            else:
                proxies = class_proxies(embeddings[:, part], labels, rows.shape[0])
            count += self.loss.load_proxies(part, proxies)
        return MetaClassUpdate(
            {**update.values, "proxies_warm_started": count}, f"{update.message}, {count} proxies warm-started"
        )
