"""The loss registry: ``loss.name`` -> a factory of the per-learner loss module from the ``loss`` section.

Adding a loss is a name in :data:`gce.config.vocabulary.LossName` and one function registered
here (``@LOSS_REGISTRY.register(name)``) that returns a module with :class:`GCELoss`'s interface:
``forward(embeddings, labels, learner_slice) -> (total, parts)`` and ``all_learners(...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from gce.config.vocabulary import LOSS_NAMES
from gce.losses.triplet import GCELoss
from gce.registry import Registry

if TYPE_CHECKING:
    from gce.config import LossConfig

__all__ = ["LOSS_REGISTRY", "build_loss"]

LOSS_REGISTRY: Registry[Callable[[LossConfig], GCELoss]] = Registry("loss", "loss.name", LOSS_NAMES)


@LOSS_REGISTRY.register("triplet")
def _triplet(cfg: LossConfig) -> GCELoss:
    return GCELoss(
        margin=cfg.margin, mining=cfg.mining, full_embedding_weight=cfg.full_embedding_weight, distance=cfg.distance
    )


def build_loss(cfg: LossConfig) -> GCELoss:
    """The loss module the ``loss`` section names."""
    return LOSS_REGISTRY[cfg.name](cfg)
