"""Models: backbone trunks (optionally with learner-owned last layers), the group channel-wise (GCE)
head, the linear-split head, the model."""

from gce.models.backbones import (
    BACKBONES,
    available_backbones,
    build_trunk,
    freeze_batchnorm,
    is_frozen_batchnorm,
    weights_cache_path,
)
from gce.models.embedding_model import HEADS, EmbeddingModel, build_model
from gce.models.grouped_trunk import GroupedTrunk
from gce.models.heads import (
    BLOCK_KINDS,
    INPUT_MIXING_MODES,
    POOLING_MODES,
    EmbeddingHead,
    GlobalPool,
    GroupChannelwiseHead,
    LinearSplitHead,
)

__all__ = [
    "BACKBONES",
    "BLOCK_KINDS",
    "HEADS",
    "INPUT_MIXING_MODES",
    "POOLING_MODES",
    "EmbeddingHead",
    "EmbeddingModel",
    "GlobalPool",
    "GroupChannelwiseHead",
    "GroupedTrunk",
    "LinearSplitHead",
    "available_backbones",
    "build_model",
    "build_trunk",
    "freeze_batchnorm",
    "is_frozen_batchnorm",
    "weights_cache_path",
]
