"""The loss registry: ``loss.name`` -> a factory of the per-learner loss module from the ``loss`` section.

Adding a loss is a name in :data:`gce.config.vocabulary.LossName` and one function registered
here (``@LOSS_REGISTRY.register(name)``) that returns a module with :class:`GCELoss`'s interface:
``forward(embeddings, labels, learner_slice) -> (total, parts)`` and ``all_learners(...)``.
Losses with parameters (the proxy losses) are sized by the run's :class:`~gce.losses.zoo.LossShape`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pytorch_metric_learning.losses import ArcFaceLoss, NormalizedSoftmaxLoss, ProxyAnchorLoss

from gce.config.vocabulary import LOSS_NAMES
from gce.losses.triplet import GCELoss
from gce.losses.zoo import LossShape, MinedPairTerm, ProxyTerm, TermFactory, ZooGCELoss
from gce.registry import Registry

if TYPE_CHECKING:
    from gce.config import LossConfig

__all__ = ["LOSS_REGISTRY", "build_loss"]

LOSS_REGISTRY: Registry[Callable[[LossConfig, LossShape | None], GCELoss]] = Registry("loss", "loss.name", LOSS_NAMES)


@LOSS_REGISTRY.register("triplet")
def _triplet(cfg: LossConfig, shape: LossShape | None) -> GCELoss:
    return GCELoss(
        margin=cfg.margin, mining=cfg.mining, full_embedding_weight=cfg.full_embedding_weight, distance=cfg.distance
    )


def _zoo(cfg: LossConfig, shape: LossShape | None, make_term: TermFactory, count_name: str | None) -> ZooGCELoss:
    if shape is None:
        raise ValueError(f"loss.name={cfg.name} needs the run's LossShape (classes, learner slices)")
    return ZooGCELoss(make_term, shape, cfg.full_embedding_weight, count_name)


@LOSS_REGISTRY.register("proxy_anchor")
def _proxy_anchor(cfg: LossConfig, shape: LossShape | None) -> GCELoss:
    def term(classes: int, dim: int) -> ProxyTerm:
        return ProxyTerm(ProxyAnchorLoss(classes, dim, margin=cfg.margin, alpha=cfg.proxy_anchor_alpha))

    return _zoo(cfg, shape, term, None)


@LOSS_REGISTRY.register("normalized_softmax")
def _normalized_softmax(cfg: LossConfig, shape: LossShape | None) -> GCELoss:
    def term(classes: int, dim: int) -> ProxyTerm:
        return ProxyTerm(NormalizedSoftmaxLoss(classes, dim, temperature=cfg.temperature))

    return _zoo(cfg, shape, term, None)


@LOSS_REGISTRY.register("arcface")
def _arcface(cfg: LossConfig, shape: LossShape | None) -> GCELoss:
    def term(classes: int, dim: int) -> ProxyTerm:
        return ProxyTerm(ArcFaceLoss(classes, dim, margin=cfg.arcface_margin, scale=cfg.arcface_scale))

    return _zoo(cfg, shape, term, None)


@LOSS_REGISTRY.register("multi_similarity")
def _multi_similarity(cfg: LossConfig, shape: LossShape | None) -> GCELoss:
    def term(classes: int, dim: int) -> MinedPairTerm:
        return MinedPairTerm(cfg.ms_alpha, cfg.ms_beta, cfg.ms_base, cfg.ms_epsilon)

    return _zoo(cfg, shape, term, "pairs")


def build_loss(cfg: LossConfig, shape: LossShape | None = None) -> GCELoss:
    """The loss module the ``loss`` section names; ``shape`` sizes the proxies of a proxy loss."""
    return LOSS_REGISTRY[cfg.name](cfg, shape)
