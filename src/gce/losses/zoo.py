"""The other per-learner losses, from pytorch-metric-learning (PML), in :class:`GCELoss`'s frame.

Each ``loss.name`` is one PML loss, used as PML defines it (nothing is re-implemented here):

* ``proxy_anchor``: ``ProxyAnchorLoss`` (Kim et al. 2020), margin ``loss.margin``, scale
  ``loss.proxy_anchor_alpha``;
* ``normalized_softmax``: ``NormalizedSoftmaxLoss`` (Zhai & Wu 2019; ProxyNCA++'s normalised
  softmax), temperature ``loss.temperature``;
* ``arcface``: ``ArcFaceLoss`` (Deng et al. 2019), angular margin ``loss.arcface_margin`` degrees,
  scale ``loss.arcface_scale``;
* ``multi_similarity``: ``MultiSimilarityMiner`` then ``MultiSimilarityLoss`` (Wang et al. 2019).

The frame is the triplet loss's (:class:`~gce.losses.triplet.GCELoss`): learner ``k``'s term sees
only ``embeddings[:, slice_k]`` (no gradient reaches another learner's columns), plus
``full_embedding_weight`` x the term on the whole embedding. Unlike the triplet loss, the proxy
losses hold parameters, and they are per term: learner ``k`` has its own proxies, one per class its
labels range over (:attr:`LossShape.learner_classes`: every training class under
``learner_data: subset``, its meta-classes under ``all``), of dimension ``len(slice_k)``; the
whole-embedding term has one proxy per training class, of the embedding's dimension. A learner's
subset changes at every meta-class refresh; keeping proxies for all classes means a class that moves
to learner ``k`` already has one there (and the others' classes are negatives for ``k``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pytorch_metric_learning.losses import (
    ArcFaceLoss,
    MultiSimilarityLoss,
    NormalizedSoftmaxLoss,
    ProxyAnchorLoss,
)
from pytorch_metric_learning.miners import MultiSimilarityMiner
from torch import Tensor, nn

from gce.losses.triplet import GCELoss, LearnerTripletLoss

__all__ = ["LossShape", "MinedPairTerm", "ProxyTerm", "ZooGCELoss", "proxy_rows"]


@dataclass(frozen=True)
class LossShape:
    """What the proxies of a run's loss are sized by.

    ``learner_slices``: the learners' columns (empty with one learner: its loss is the whole
    embedding's). ``learner_classes``: the number of labels a learner's term sees. ``full``: whether
    the whole-embedding term is ever computed (weighted, fine-tuning epochs, or one learner).
    """

    num_classes: int
    embedding_dim: int
    learner_slices: tuple[slice, ...] = ()
    learner_classes: int = 0
    full: bool = True


def proxy_rows(loss: nn.Module) -> Tensor:
    """A PML proxy loss's proxies as ``classes x dim`` (a view of its parameter)."""
    if isinstance(loss, ProxyAnchorLoss):
        return loss.proxies
    if isinstance(loss, (NormalizedSoftmaxLoss, ArcFaceLoss)):
        return loss.W.T  # PML stores these as dim x classes
    raise TypeError(f"{type(loss).__name__} has no proxies")


class ProxyTerm(nn.Module):
    """A PML proxy loss on one slice: ``(loss, 0)`` (nothing is mined, nothing counted)."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, int]:
        return self.loss(x, labels), 0


class MinedPairTerm(nn.Module):
    """PML's multi-similarity miner then loss on one slice: ``(loss, number of mined pairs)``."""

    def __init__(self, alpha: float, beta: float, base: float, epsilon: float) -> None:
        super().__init__()
        self.miner = MultiSimilarityMiner(epsilon=epsilon)
        self.loss = MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, int]:
        pairs = self.miner(x, labels)
        return self.loss(x, labels, pairs), int(pairs[0].numel() + pairs[2].numel())


#: ``(classes, dim) -> term``: one term module of a loss.
TermFactory = Callable[[int, int], nn.Module]


class ZooGCELoss(GCELoss):
    """:class:`GCELoss` whose terms are PML losses, one module per learner and one for the whole
    embedding (see the module docstring). ``count_name`` names what a term counts (``pairs`` for
    multi-similarity, nothing for the proxy losses)."""

    def __init__(
        self, make_term: TermFactory, shape: LossShape, full_embedding_weight: float, count_name: str | None
    ) -> None:
        nn.Module.__init__(self)
        if full_embedding_weight < 0:
            raise ValueError(f"full_embedding_weight must be >= 0, got {full_embedding_weight}")
        self.full_embedding_weight = full_embedding_weight
        self.count_name = count_name
        self.learner_slices = tuple(shape.learner_slices)
        # A learner is found by its columns: the readings hand the loss a slice.
        self._index = {(s.start, s.stop): k for k, s in enumerate(self.learner_slices)}
        self.learners = nn.ModuleList(make_term(shape.learner_classes, s.stop - s.start) for s in self.learner_slices)
        self.full = make_term(shape.num_classes, shape.embedding_dim) if shape.full else None

    def module_for(self, learner_slice: slice | None) -> nn.Module:
        """The term module of ``learner_slice`` (``None``: the whole embedding)."""
        if learner_slice is None:
            if self.full is None:
                raise ValueError("this loss was built without a whole-embedding term (LossShape.full=False)")
            return self.full
        k = self._index.get((learner_slice.start, learner_slice.stop))
        if k is None:
            raise ValueError(f"learner_slice {learner_slice} is none of the learners' {list(self.learner_slices)}")
        return self.learners[k]

    def term(self, embeddings: Tensor, labels: Tensor, learner_slice: slice | None) -> tuple[Tensor, int]:
        sub = LearnerTripletLoss.select(embeddings, learner_slice)
        loss, count = self.module_for(learner_slice)(sub, labels)
        return loss, count

    def proxy_terms(self) -> list[tuple[slice | None, Tensor]]:
        """``(slice, proxies as classes x dim)`` of every term with proxies (``None``: whole embedding)."""
        terms: list[tuple[slice | None, nn.Module]] = list(zip(self.learner_slices, self.learners, strict=True))
        if self.full is not None:
            terms.append((None, self.full))
        return [(s, proxy_rows(m.loss)) for s, m in terms if isinstance(m, ProxyTerm)]

    @torch.no_grad()
    def load_proxies(self, learner_slice: slice | None, proxies: Tensor) -> int:
        """Set one term's proxies to ``proxies`` (``classes x dim``), except the all-zero rows (a
        class without images keeps its proxy); returns the number of proxies set."""
        term = self.module_for(learner_slice)
        if not isinstance(term, ProxyTerm):
            raise TypeError(f"the term of {learner_slice} has no proxies")
        rows = proxy_rows(term.loss)
        if proxies.shape != rows.shape:
            raise ValueError(f"proxies of shape {tuple(proxies.shape)} for a term of shape {tuple(rows.shape)}")
        keep = proxies.abs().sum(dim=1) > 0
        rows[keep] = proxies[keep].to(rows)
        return int(keep.sum())
