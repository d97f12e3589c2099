"""Triplet loss with mining, applied to one learner's slice of the ensemble embedding.

Built on pytorch-metric-learning (PML): ``TripletMarginMiner`` picks the triplets, then
``TripletMarginLoss`` scores them. With distance ``d`` (Euclidean between L2-normalised vectors,
or ``1 - cos`` in spirit for ``distance="cosine"``, where PML works with the similarity ``s``
directly) and margin ``m``:

.. math::
    \\ell(a, p, n) = \\max\\bigl(0,\\; d(a, p) - d(a, n) + m\\bigr)
    \\qquad\\text{(cosine: } \\max(0,\\; s(a, n) - s(a, p) + m)\\text{)}

over triplets with ``label[a] == label[p]``, ``a != p``, ``label[n] != label[a]``.

Mining (PML ``TripletMarginMiner``, with ``gap = d(a, n) - d(a, p)``; for cosine
``gap = s(a, p) - s(a, n)``):

* ``"all"``: every triplet with ``gap <= m`` (i.e. every triplet that can have non-zero loss);
* ``"hard"``: ``gap <= 0`` -- the negative is at least as close as the positive;
* ``"semihard"``: ``0 < gap <= m`` -- negative farther than the positive but inside the margin.

Reduction: PML's default ``AvgNonZeroReducer`` -- the **mean over mined triplets whose loss is
strictly positive**; 0 (still attached to the graph) when there is none. So for ``"all"`` the
value equals the mean of the positive losses over *all* valid triplets of the batch.
"""

from __future__ import annotations

import torch
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity, LpDistance
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.miners import TripletMarginMiner
from torch import Tensor, nn

from gce.config.vocabulary import DISTANCES, MINING_TYPES, Distance, Mining

__all__ = ["DISTANCES", "MINING_TYPES", "GCELoss", "LearnerTripletLoss"]

Triplets = tuple[Tensor, Tensor, Tensor]


def _make_distance(name: str) -> BaseDistance:
    """Both distances normalise their inputs, so every slice is compared on the unit sphere even
    if the caller passes raw features or the concatenation of normalised slices."""
    if name == "euclidean":
        return LpDistance(normalize_embeddings=True, p=2, power=1)
    if name == "cosine":
        return CosineSimilarity()
    raise ValueError(f"unknown distance {name!r}; valid: {', '.join(DISTANCES)}")


class LearnerTripletLoss(nn.Module):
    """Mined triplet loss on ``embeddings[:, learner_slice]`` (or the whole embedding if ``None``).

    Only the selected columns enter the computation, so the gradient with respect to every other
    learner's slice is exactly zero.

    Args:
        margin: triplet margin ``m`` (also the miner's margin).
        mining: ``"semihard"``, ``"hard"`` or ``"all"``.
        distance: ``"euclidean"`` (on normalised vectors, in ``[0, 2]``) or ``"cosine"``.
    """

    def __init__(self, margin: float = 0.1, mining: Mining = "semihard", distance: Distance = "euclidean") -> None:
        super().__init__()
        if mining not in MINING_TYPES:
            raise ValueError(f"unknown mining {mining!r}; valid: {', '.join(MINING_TYPES)}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.miner = TripletMarginMiner(margin=margin, type_of_triplets=mining, distance=_make_distance(distance))
        self.loss = TripletMarginLoss(margin=margin, distance=_make_distance(distance))

    @staticmethod
    def select(embeddings: Tensor, learner_slice: slice | None) -> Tensor:
        """The columns a learner owns (all of them for ``None``)."""
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be B x D, got shape {tuple(embeddings.shape)}")
        return embeddings if learner_slice is None else embeddings[:, learner_slice]

    def mine(self, embeddings: Tensor, labels: Tensor, learner_slice: slice | None = None) -> Triplets:
        """Indices ``(anchors, positives, negatives)`` chosen by the miner (no gradient)."""
        with torch.no_grad():
            return self.miner(self.select(embeddings, learner_slice), labels)

    def compute(self, embeddings: Tensor, labels: Tensor, learner_slice: slice | None = None) -> tuple[Tensor, int]:
        """Loss and number of mined triplets."""
        sub = self.select(embeddings, learner_slice)
        if sub.shape[1] == 0:
            raise ValueError(
                f"learner_slice {learner_slice} selects no column of a {embeddings.shape[1]}-dim embedding"
            )
        triplets = self.miner(sub, labels)
        return self.loss(sub, labels, triplets), int(triplets[0].numel())

    def forward(self, embeddings: Tensor, labels: Tensor, learner_slice: slice | None = None) -> Tensor:
        return self.compute(embeddings, labels, learner_slice)[0]


class GCELoss(nn.Module):
    """Learner loss plus an optional triplet loss on the full ensemble embedding.

    ``total = learner_loss + full_embedding_weight * full_loss``, where ``learner_loss`` is
    :class:`LearnerTripletLoss` on ``learner_slice`` and ``full_loss`` the same on all columns.
    With ``learner_slice=None`` (K = 1, or fine-tuning the full embedding) the learner loss already
    is the full loss and the extra term is skipped, so it is not counted twice.
    The full loss is not computed at all when its weight is 0.

    ``forward`` returns ``(total, components)``; ``components`` holds floats: ``loss`` (the
    total), ``learner_loss``, ``triplets`` (number of triplets mined for the learner loss) and,
    when computed, ``full_loss`` and ``full_triplets``.
    """

    def __init__(
        self,
        margin: float = 0.1,
        mining: Mining = "semihard",
        full_embedding_weight: float = 0.0,
        distance: Distance = "euclidean",
    ) -> None:
        super().__init__()
        if full_embedding_weight < 0:
            raise ValueError(f"full_embedding_weight must be >= 0, got {full_embedding_weight}")
        self.full_embedding_weight = full_embedding_weight
        self.triplet = LearnerTripletLoss(margin, mining, distance)

    #: The name of a term's count in the parts (``None``: the loss counts nothing).
    count_name: str | None = "triplets"

    def term(self, embeddings: Tensor, labels: Tensor, learner_slice: slice | None) -> tuple[Tensor, int]:
        """One term of the total, on ``learner_slice`` (``None``: the whole embedding), and its count."""
        return self.triplet.compute(embeddings, labels, learner_slice)

    def forward(
        self, embeddings: Tensor, labels: Tensor, learner_slice: slice | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        learner_loss, learner_triplets = self.term(embeddings, labels, learner_slice)
        return self._with_full_loss(
            learner_loss, float(learner_triplets), embeddings, labels, add_full=learner_slice is not None
        )

    def _with_full_loss(
        self, learner_loss: Tensor, learner_triplets: float, embeddings: Tensor, labels: Tensor, add_full: bool = True
    ) -> tuple[Tensor, dict[str, float]]:
        """``learner_loss + full_embedding_weight * full_loss`` (when weighted and ``add_full``) and its parts."""
        total = learner_loss
        count = self.count_name
        parts: dict[str, float] = {} if count is None else {count: learner_triplets}
        values = {"learner_loss": learner_loss}
        if self.full_embedding_weight > 0 and add_full:
            full_loss, full_triplets = self.term(embeddings, labels, None)
            total = total + self.full_embedding_weight * full_loss
            values["full_loss"] = full_loss
            if count is not None:
                parts[f"full_{count}"] = float(full_triplets)
        values["loss"] = total
        # One device-to-host copy for all the values (on a GPU each float() would wait for it).
        parts.update(zip(values, torch.stack([v.detach() for v in values.values()]).tolist(), strict=True))
        return total, parts

    def all_learners(
        self, embeddings: Tensor, labels: Tensor, learner_slices: list[slice], learner_labels: list[Tensor]
    ) -> tuple[Tensor, dict[str, float]]:
        """The ``learner_data: all`` reading: every learner on the whole batch, with its own labels.

        ``total = mean_k triplet(embeddings[:, slice_k], learner_labels[k])
        + full_embedding_weight * triplet(embeddings, labels)``; ``learner_labels[k]`` holds the
        meta-class of each sample under learner ``k``'s partition. ``triplets`` is the mean number
        mined per learner.
        """
        if len(learner_slices) != len(learner_labels) or not learner_slices:
            raise ValueError(
                f"need one label vector per learner slice, got {len(learner_slices)} slices "
                f"and {len(learner_labels)} label vectors"
            )
        losses, mined = [], 0
        for part, meta in zip(learner_slices, learner_labels, strict=True):
            loss, count = self.term(embeddings, meta, part)
            losses.append(loss)
            mined += count
        return self._with_full_loss(torch.stack(losses).mean(), mined / len(losses), embeddings, labels)
