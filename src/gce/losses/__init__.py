"""Losses: mined triplet loss on one learner's sub-embedding (pytorch-metric-learning based), by name."""

from gce.losses.registry import LOSS_REGISTRY, build_loss
from gce.losses.triplet import DISTANCES, MINING_TYPES, GCELoss, LearnerTripletLoss

__all__ = ["DISTANCES", "LOSS_REGISTRY", "MINING_TYPES", "GCELoss", "LearnerTripletLoss", "build_loss"]
