"""The triplet loss of :mod:`gce.losses.triplet` over a global batch split across ranks.

Single process: ``loss = mean over the mined triplets of the batch whose loss is > 0`` (PML's
``AvgNonZeroReducer``). With ``W`` ranks each holding ``B/W`` rows of the same global batch:

1. every rank gathers the global batch (:func:`~gce.distributed.collectives.all_gather_with_grad`,
   rank order = the single-process order);
2. it mines with its LOCAL rows as anchors against the GLOBAL batch as positives/negatives (the
   same PML miner, with the anchor's own row removed as a positive, as the single-process miner
   does), so the triplets of all ranks together are exactly the single-process triplets and each
   is scored once, by the rank that owns its anchor: ``O(B/W x B)`` per rank, not ``O(B^2)``;
3. it scores them with the same PML loss and all-reduces the number of positive-loss triplets,
   the denominator of the global mean;
4. it returns ``W x (sum of its positive losses) / (global count)``. Summed over ranks that is
   ``W x`` the single-process loss; the gather's backward hands every rank the gradient of that
   sum with respect to its rows, and DDP's averaging divides by ``W``: the parameter gradient is
   exactly the single-process one.

:class:`DistributedGCELoss` plugs this into :class:`~gce.losses.triplet.GCELoss` unchanged (learner
term, full-embedding term, the "all learners" reading are all linear in the triplet losses) and
reports the global values in its parts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.reducers import DoNothingReducer
from torch import Tensor, nn

from gce.distributed.collectives import all_gather_with_grad, all_reduce_sum, gather_sizes
from gce.losses.triplet import GCELoss, LearnerTripletLoss

__all__ = ["DistributedGCELoss", "ShardedTripletLoss"]


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardedTripletLoss(LearnerTripletLoss):
    """:class:`LearnerTripletLoss` whose ``compute`` takes this rank's rows of a global batch.

    ``compute`` returns ``(W x this rank's share of the global loss, global number of mined
    triplets)``; alone (no process group) it is the plain single-process loss.
    """

    def __init__(self, margin: float = 0.1, mining: str = "semihard", distance: str = "euclidean") -> None:
        super().__init__(margin, mining, distance)  # type: ignore[arg-type]
        self._add_unreduced()

    def _add_unreduced(self) -> None:
        # Per-triplet losses, unreduced (same margin and distance): the reduction needs the global count.
        self.unreduced = TripletMarginLoss(
            margin=self.loss.margin, distance=self.loss.distance, reducer=DoNothingReducer()
        )

    @classmethod
    def like(cls, base: LearnerTripletLoss) -> ShardedTripletLoss:
        """The sharded version of ``base``, with ``base``'s own miner and loss."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.miner, new.loss = base.miner, base.loss
        new._add_unreduced()
        return new

    def compute(self, embeddings: Tensor, labels: Tensor, learner_slice: slice | None = None) -> tuple[Tensor, int]:
        rank, world = _rank_world()
        if world == 1:
            return super().compute(embeddings, labels, learner_slice)
        local = self.select(embeddings, learner_slice)
        if local.shape[1] == 0:
            raise ValueError(
                f"learner_slice {learner_slice} selects no column of a {embeddings.shape[1]}-dim embedding"
            )
        sizes = gather_sizes(local.shape[0], local.device)  # a batch need not split evenly
        global_rows = all_gather_with_grad(local, sizes)
        global_labels = all_gather_with_grad(labels.contiguous(), sizes)  # integers: no gradient
        anchors, positives, negatives = self.miner(local, labels, global_rows, global_labels)
        own = anchors + sum(sizes[:rank])  # the anchor's row in the global batch
        keep = positives != own
        triplets = (anchors[keep], positives[keep], negatives[keep])
        if triplets[0].numel():
            losses = self.unreduced(local, labels, triplets, global_rows, global_labels)["loss"]["losses"]
            positive = losses[losses > 0]
        else:
            positive = local.new_zeros(0)
        counts = all_reduce_sum(
            torch.tensor([positive.numel(), triplets[0].numel()], dtype=torch.float64, device=local.device)
        )
        num_positive, num_mined = (int(c) for c in counts.tolist())  # one device-to-host copy
        if num_positive == 0:  # like AvgNonZeroReducer: 0, still attached to the graph
            return (local * 0).sum() + (global_rows * 0).sum(), num_mined
        return positive.sum() * (world / num_positive) + (global_rows * 0).sum(), num_mined


class DistributedGCELoss(GCELoss):
    """:class:`GCELoss` on this rank's rows of a global batch (see the module docstring).

    The returned tensor's gradient is this rank's share, to back-propagate through DDP; its value,
    like the parts (``loss``, ``learner_loss``, ``full_loss``, triplet counts), is the global
    batch's, identical on every rank and equal to what one process computes on the whole batch.
    """

    def __init__(
        self,
        margin: float = 0.1,
        mining: str = "semihard",
        full_embedding_weight: float = 0.0,
        distance: str = "euclidean",
    ) -> None:
        super().__init__(margin, mining, full_embedding_weight, distance)  # type: ignore[arg-type]
        self.triplet = ShardedTripletLoss.like(self.triplet)

    @classmethod
    def like(cls, base: GCELoss) -> DistributedGCELoss:
        """The distributed version of ``base`` (same miner, loss and full-embedding weight)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.full_embedding_weight = base.full_embedding_weight
        new.triplet = ShardedTripletLoss.like(base.triplet)
        return new

    def _with_full_loss(
        self, learner_loss: Tensor, learner_triplets: float, embeddings: Tensor, labels: Tensor, add_full: bool = True
    ) -> tuple[Tensor, dict[str, float]]:
        total, parts = super()._with_full_loss(learner_loss, learner_triplets, embeddings, labels, add_full)
        _, world = _rank_world()
        if world > 1:
            # Each rank's share is W x its part: the global value is the mean of the shares.
            names = [name for name in ("learner_loss", "full_loss", "loss") if name in parts]
            summed = all_reduce_sum(
                torch.tensor([parts[n] for n in names], dtype=torch.float64, device=embeddings.device)
            )
            parts.update({n: float(v) / world for n, v in zip(names, summed.tolist(), strict=True)})
            # The value becomes the global loss (the same on every rank: logging and the finite-loss
            # check agree); the gradient stays this rank's share.
            total = total + (parts["loss"] - total.detach())
        return total, parts
