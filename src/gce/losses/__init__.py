"""Losses per learner, by name: the mined triplet loss (the default) and pytorch-metric-learning's
Proxy Anchor, Normalized Softmax, ArcFace and Multi-Similarity, each on one learner's sub-embedding."""

from gce.losses.registry import LOSS_REGISTRY, build_loss
from gce.losses.triplet import DISTANCES, MINING_TYPES, GCELoss, LearnerTripletLoss
from gce.losses.zoo import LossShape, ZooGCELoss

__all__ = [
    "DISTANCES",
    "LOSS_REGISTRY",
    "MINING_TYPES",
    "GCELoss",
    "LearnerTripletLoss",
    "LossShape",
    "ZooGCELoss",
    "build_loss",
]
