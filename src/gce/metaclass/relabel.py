"""The "all data" reading of GCE: every learner sees every image, labelled by its own meta-classes.

Default GCE (``metaclass.learner_data: subset``) gives learner ``k`` one data subset, the images of
the classes in group ``k``, with their class labels. The reading implemented here (DREML-like, and
allowed by the abstract's "meta-class update strategy generates the data subsets") gives each
learner its own partition of *all* classes into ``M`` meta-classes and trains it on every image
with the meta-class as label, so learner ``k`` learns "which of my meta-classes is this", and the
learners differ because their partitions differ. Concatenated, the sub-embeddings tell classes
apart even though no single learner does.

The partition of learner ``k`` (a length-``C`` array of meta-class ids in ``0..M-1``) comes from
the same strategies as the subsets:

* ``class_proxy``: balanced k-means on class proxies computed from learner ``k``'s *own*
  sub-embedding (so each learner regroups classes by what it encodes), seeded per learner, and
  matched to its previous partition with the Hungarian algorithm;
* ``random``: an independent random balanced partition per learner (DREML proper).
"""

from __future__ import annotations

import numpy as np

from gce.config.vocabulary import LEARNER_DATA
from gce.metaclass.assignments import ArrayLike, to_numpy
from gce.metaclass.strategies import ClassProxyStrategy, MetaClassStrategy, RandomStrategy

__all__ = ["LEARNER_DATA", "PerLearnerMetaClasses", "learner_seed"]

#: The readings of the method (config ``metaclass.learner_data``): ``subset`` gives learner ``k`` the
#: data of meta-class ``k``; ``all`` is the reading implemented here.


def learner_seed(seed: int, learner: int) -> int:
    """Seed of learner ``learner``'s partition: distinct per learner, reproducible from ``seed``."""
    return int(np.random.SeedSequence([seed, learner]).generate_state(1)[0])


class PerLearnerMetaClasses:
    """One partition of the classes into ``num_metaclasses`` meta-classes per learner.

    ``assign`` returns a ``K x C`` int array: row ``k`` maps each class to learner ``k``'s
    meta-class. ``previous`` (``K x C``) keeps each learner's meta-class ids stable across updates.
    """

    def __init__(self, base: MetaClassStrategy, num_learners: int) -> None:
        if not isinstance(base, (ClassProxyStrategy, RandomStrategy)):
            raise ValueError(
                f"per-learner meta-classes need a class-level strategy (class_proxy or random), "
                f"got {type(base).__name__}"
            )
        if num_learners < 1:
            raise ValueError(f"num_learners must be >= 1, got {num_learners}")
        self.base = base
        self.num_learners = num_learners
        self.num_metaclasses = base.num_metaclasses

    @property
    def needs_embeddings(self) -> bool:
        return isinstance(self.base, ClassProxyStrategy)

    def assign(
        self,
        embeddings: ArrayLike | None,
        labels: ArrayLike,
        num_classes: int,
        learner_slices: list[slice],
        previous: np.ndarray | None = None,
        seed: int = 0,
    ) -> np.ndarray:
        if len(learner_slices) != self.num_learners:
            raise ValueError(f"expected {self.num_learners} learner slices, got {len(learner_slices)}")
        if previous is not None:
            previous = np.asarray(previous, dtype=np.int64)
            if previous.shape != (self.num_learners, num_classes):
                raise ValueError(f"previous must have shape ({self.num_learners}, {num_classes}), got {previous.shape}")
        emb = None if embeddings is None else to_numpy(embeddings, np.float64)  # also a GPU tensor
        if self.needs_embeddings and emb is None:
            raise ValueError("class_proxy meta-classes need embeddings")
        rows = []
        for k, part in enumerate(learner_slices):
            own = None if emb is None else emb[:, part]
            rows.append(
                self.base.assign(
                    own,
                    labels,
                    num_classes,
                    previous=None if previous is None else previous[k],
                    seed=learner_seed(seed, k),
                )
            )
        return np.stack(rows).astype(np.int64)
