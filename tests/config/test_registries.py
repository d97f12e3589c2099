"""Every kind of thing has one registry, and every name its config accepts has a factory there."""

from __future__ import annotations

import pytest

from gce.config import vocabulary
from gce.data.datasets import DATASETS
from gce.errors import ConfigError
from gce.losses.registry import LOSS_REGISTRY
from gce.metaclass.strategies import STRATEGY_REGISTRY
from gce.models.backbones import BACKBONES
from gce.models.embedding_model import HEAD_REGISTRY
from gce.registry import Registry
from gce.retrieval.faiss_build import INDEX_REGISTRY
from gce.training.optim import OPTIMIZER_REGISTRY, SCHEDULER_REGISTRY
from gce.training.trackers import TRACKER_REGISTRY

REGISTRIES = {
    "backbone": (BACKBONES, vocabulary.BACKBONE_NAMES),
    "dataset": (DATASETS, vocabulary.DATASET_NAMES),
    "head": (HEAD_REGISTRY, vocabulary.HEADS),
    "strategy": (STRATEGY_REGISTRY, vocabulary.STRATEGY_NAMES),
    "optimiser": (OPTIMIZER_REGISTRY, vocabulary.OPTIMIZERS),
    "scheduler": (SCHEDULER_REGISTRY, vocabulary.SCHEDULERS),
    "index type": (INDEX_REGISTRY, vocabulary.INDEX_TYPES),
    "loss": (LOSS_REGISTRY, vocabulary.LOSS_NAMES),
    "tracker": (TRACKER_REGISTRY, vocabulary.TRACKER_NAMES),
}


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_every_name_the_config_accepts_has_a_factory(kind):
    registry, names = REGISTRIES[kind]
    assert registry.missing() == []
    assert set(registry) == set(names)


def test_backbones_match_the_vocabulary_and_its_channel_table():
    assert tuple(BACKBONES) == vocabulary.BACKBONE_NAMES
    assert {name: BACKBONES[name].channels for name in BACKBONES} == vocabulary.BACKBONE_CHANNELS


def test_a_registry_refuses_names_outside_its_vocabulary_and_twice():
    registry: Registry = Registry("widget", "model.widget", ("a", "b"))
    registry.register("a")(len)
    with pytest.raises(ValueError, match="'c' is not in the vocabulary"):
        registry.register("c")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a")
    assert registry.missing() == ["b"]
    with pytest.raises(ConfigError, match=r"model\.widget='b' is unknown; valid widget names: a"):
        registry["b"]


def test_the_loss_section_builds_the_named_loss_with_its_values():
    from gce.config import LossConfig
    from gce.losses import GCELoss, build_loss

    loss = build_loss(
        LossConfig(name="triplet", margin=0.3, mining="hard", full_embedding_weight=0.5, distance="cosine")
    )
    assert isinstance(loss, GCELoss) and loss.full_embedding_weight == 0.5
    assert (loss.triplet.miner.margin, loss.triplet.miner.type_of_triplets, loss.triplet.loss.margin) == (
        0.3,
        "hard",
        0.3,
    )
    assert type(loss.triplet.loss.distance).__name__ == "CosineSimilarity"
