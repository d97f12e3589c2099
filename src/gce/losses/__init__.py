"""Losses: mined triplet loss on one learner's sub-embedding (pytorch-metric-learning based)."""

from gce.losses.triplet import DISTANCES, MINING_TYPES, GCELoss, LearnerTripletLoss

__all__ = ["DISTANCES", "MINING_TYPES", "GCELoss", "LearnerTripletLoss"]
