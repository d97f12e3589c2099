"""The two readings of the method behind one interface, checked with a recording fake loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gce.config import load_config
from gce.data.samplers import SubsetBalancedBatchSampler
from gce.metaclass import ClassProxyStrategy, RandomStrategy
from gce.metaclass.relabel import PerLearnerMetaClasses
from gce.training.readings import AllDataReading, SubsetReading, build_reading

SLICES = [slice(0, 2), slice(2, 4), slice(4, 6)]
LABELS = np.repeat(np.arange(12), 3)  # 12 classes x 3 images


class RecordingLoss:
    """Stands in for GCELoss: records what each call receives."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, embeddings, labels, learner_slice=None):
        self.calls.append(("one", learner_slice, labels.tolist()))
        return torch.tensor(1.0), {"triplets": 1.0}

    def all_learners(self, embeddings, labels, learner_slices, learner_labels):
        self.calls.append(("all", learner_slices, [x.tolist() for x in learner_labels]))
        return torch.tensor(2.0), {"triplets": 2.0}


def embeddings(seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(
        torch.randn(len(LABELS), 6, generator=torch.Generator().manual_seed(seed)), dim=1
    )


def test_subset_reading_refreshes_configures_the_sampler_and_picks_the_learner_slice() -> None:
    reading = SubsetReading(ClassProxyStrategy(3, balanced=True), SLICES, LABELS, 12, update_every=2, seed=0)
    assert reading.needs_embeddings and reading.due(1)  # nothing assigned yet
    update = reading.update(0, embeddings())
    assert sum(update.values["classes_per_learner"]) == 12 and update.message.startswith("meta-classes updated")
    assert [reading.due(e) for e in (1, 2, 3, 4)] == [False, True, False, True]
    sampler = SubsetBalancedBatchSampler(LABELS, None, classes_per_batch=2, samples_per_class=2, num_groups=1)
    reading.configure_sampler(sampler)
    assert sampler.num_groups == 3
    np.testing.assert_array_equal(sampler.group_of_sample, reading.assignment[LABELS])
    loss = RecordingLoss()
    labels = torch.tensor([0, 0, 1, 1])
    reading.batch_loss(loss, torch.zeros(4, 6), labels, 2)
    reading.batch_loss(loss, torch.zeros(4, 6), labels, None)  # fine-tuning: the full embedding
    assert [c[1] for c in loss.calls] == [SLICES[2], None]


def test_a_single_learner_trains_the_whole_embedding() -> None:
    reading = SubsetReading(RandomStrategy(1), [slice(0, 6)], LABELS, 12, update_every=1, seed=0)
    loss = RecordingLoss()
    reading.batch_loss(loss, torch.zeros(2, 6), torch.tensor([0, 1]), 0)
    assert loss.calls[0][1] is None  # not slice(0, 6): the full-embedding term must not count twice


def test_random_partition_without_redraw_is_never_due_again() -> None:
    reading = SubsetReading(RandomStrategy(3), SLICES, LABELS, 12, update_every=1, seed=0)
    assert not reading.needs_embeddings
    reading.update(0, None)
    assert not any(reading.due(e) for e in range(1, 5))


def test_all_data_reading_gives_every_learner_its_own_meta_class_labels() -> None:
    per_learner = PerLearnerMetaClasses(RandomStrategy(4), num_learners=3)
    reading = AllDataReading(per_learner, SLICES, LABELS, 12, update_every=1, seed=0, device=torch.device("cpu"))
    update = reading.update(0, None)
    assert reading.assignment.shape == (3, 12)
    assert len(update.values["classes_per_metaclass"]) == 3
    sampler = SubsetBalancedBatchSampler(LABELS, np.arange(len(LABELS)) % 2, classes_per_batch=2, samples_per_class=2)
    reading.configure_sampler(sampler)
    assert sampler.num_groups == 1  # batches come from all data
    loss = RecordingLoss()
    labels = torch.tensor([3, 3, 7, 7])
    reading.batch_loss(loss, torch.zeros(4, 6), labels, 0)
    kind, slices, learner_labels = loss.calls[0]
    assert kind == "all" and slices == SLICES
    assert learner_labels == [reading.assignment[k][labels.numpy()].tolist() for k in range(3)]
    reading.batch_loss(loss, torch.zeros(4, 6), labels, None)
    assert loss.calls[1][:2] == ("one", None)
    # A restored assignment gives the same labels as the one computed.
    again = AllDataReading(per_learner, SLICES, LABELS, 12, update_every=1, seed=0, device=torch.device("cpu"))
    again.restore(reading.assignment)
    assert torch.equal(again.meta_labels, reading.meta_labels)


@pytest.mark.parametrize("learner_data, kind", [("subset", SubsetReading), ("all", AllDataReading)])
def test_the_config_chooses_the_reading_once(tmp_path, learner_data, kind) -> None:
    cfg = load_config(
        None,
        [
            "data.dataset=folder",
            f"data.root={tmp_path}",
            "model.num_learners=3",
            "model.embedding_dim=6",
            "model.input_mixing=shared",
            f"metaclass.learner_data={learner_data}",
            "metaclass.num_metaclasses=4",
        ],
    )
    reading = build_reading(cfg, SLICES, LABELS, 12, torch.device("cpu"))
    assert type(reading) is kind
