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

The other losses (:class:`~gce.losses.zoo.ZooGCELoss`: Proxy Anchor, Normalized Softmax, ArcFace,
Multi-Similarity) are not sums over anchors, so :class:`GatheredGCELoss` does not shard them: every
rank gathers the global batch (with gradient) and computes the single-process loss of it, the same
value on every rank. The gather's backward sums the ranks' gradients, ``W x`` the single-process
gradient of the own rows, and DDP's averaging divides by ``W``, as above. The proxies, outside
DDP, get the gradient of the global loss on every rank; it is averaged over the ranks (one
all-reduce per proxy tensor and step) so every rank applies the same step and the proxies stay
the same everywhere; a warm start broadcasts rank 0's proxies.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.reducers import DoNothingReducer
from torch import Tensor, nn

from gce.distributed.collectives import all_gather_rows, all_gather_with_grad, all_reduce_sum, gather_sizes
from gce.losses.triplet import GCELoss, LearnerTripletLoss
from gce.losses.zoo import ZooGCELoss

__all__ = ["DistributedGCELoss", "GatheredGCELoss", "ShardedTripletLoss", "distributed_loss"]


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


def _mean_over_ranks(grad: Tensor) -> Tensor:
    out = all_reduce_sum(grad)
    return out / dist.get_world_size()


class GatheredGCELoss(ZooGCELoss):
    """:class:`~gce.losses.zoo.ZooGCELoss` on this rank's rows of a global batch: the loss of the
    gathered global batch (see the module docstring), with the base loss's own term modules."""

    @classmethod
    def like(cls, base: ZooGCELoss) -> GatheredGCELoss:
        """The distributed version of ``base``: the same modules (so the same proxy parameters, the
        optimiser's, and the same state-dict keys: checkpoints do not depend on the world size)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.full_embedding_weight, new.count_name = base.full_embedding_weight, base.count_name
        new.learner_slices, new._index = base.learner_slices, base._index
        new.learners, new.full = base.learners, base.full
        if _rank_world()[1] > 1:
            for param in new.parameters():
                param.register_hook(_mean_over_ranks)
        return new

    @staticmethod
    def _gather(embeddings: Tensor, *labels: Tensor) -> tuple[Tensor, list[Tensor]]:
        sizes = gather_sizes(embeddings.shape[0], embeddings.device)
        rows = all_gather_with_grad(embeddings, sizes)
        return rows, [torch.cat(all_gather_rows(lab.contiguous())) for lab in labels]

    def forward(
        self, embeddings: Tensor, labels: Tensor, learner_slice: slice | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        if _rank_world()[1] == 1:
            return super().forward(embeddings, labels, learner_slice)
        rows, (global_labels,) = self._gather(embeddings, labels)
        total, parts = super().forward(rows, global_labels, learner_slice)
        return total + (rows * 0).sum(), parts  # every rank's gather backward runs, whatever the loss used

    def all_learners(
        self, embeddings: Tensor, labels: Tensor, learner_slices: list[slice], learner_labels: list[Tensor]
    ) -> tuple[Tensor, dict[str, float]]:
        if _rank_world()[1] == 1:
            return super().all_learners(embeddings, labels, learner_slices, learner_labels)
        rows, (global_labels, *global_meta) = self._gather(embeddings, labels, *learner_labels)
        total, parts = super().all_learners(rows, global_labels, learner_slices, global_meta)
        return total + (rows * 0).sum(), parts

    def load_proxies(self, learner_slice: slice | None, proxies: Tensor) -> int:
        count = super().load_proxies(learner_slice, proxies)
        if _rank_world()[1] > 1:
            with torch.no_grad():
                for param in self.module_for(learner_slice).parameters():
                    dist.broadcast(param, 0)
        return count


def distributed_loss(base: GCELoss) -> GCELoss:
    """The version of a run's loss for this rank's rows of a global batch."""
    if isinstance(base, ZooGCELoss):
        return GatheredGCELoss.like(base)
    return DistributedGCELoss.like(base)
