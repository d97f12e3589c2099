"""The "all data" reading: per-learner meta-class partitions, their loss, and training with them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gce.config import load_config
from gce.errors import ConfigError
from gce.losses.triplet import GCELoss, LearnerTripletLoss
from gce.metaclass import ClassProxyStrategy, RandomStrategy, SampleKMeansStrategy
from gce.metaclass.relabel import PerLearnerMetaClasses, learner_seed
from gce.training.checkpoint import load_checkpoint
from helpers.tiny_training import run_train, write_config

SLICES = [slice(0, 4), slice(4, 8), slice(8, 12)]


def clustered_embeddings(num_classes: int = 12, per_class: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, 12))
    labels = np.repeat(np.arange(num_classes), per_class)
    return centres[labels] + 0.05 * rng.normal(size=(labels.size, 12)), labels


def test_each_learner_partitions_all_classes_from_its_own_slice():
    emb, labels = clustered_embeddings()
    per_learner = PerLearnerMetaClasses(ClassProxyStrategy(3, balanced=True), num_learners=3)
    parts = per_learner.assign(emb, labels, 12, SLICES, seed=0)
    assert parts.shape == (3, 12)
    for row in parts:  # every class labelled, 3 balanced meta-classes of 4 classes
        assert sorted(np.bincount(row, minlength=3)) == [4, 4, 4]
    # Learner 1's partition depends on its own slice only.
    changed = emb.copy()
    changed[:, SLICES[0]] = np.random.default_rng(9).normal(size=changed[:, SLICES[0]].shape)
    again = per_learner.assign(changed, labels, 12, SLICES, seed=0)
    np.testing.assert_array_equal(again[1:], parts[1:])
    # Brute force: learner 1's row equals the base strategy on its slice with its seed.
    own = ClassProxyStrategy(3, balanced=True).assign(emb[:, SLICES[1]], labels, 12, seed=learner_seed(0, 1))
    np.testing.assert_array_equal(parts[1], own)


def test_refresh_with_same_embeddings_keeps_every_learners_ids():
    emb, labels = clustered_embeddings()
    per_learner = PerLearnerMetaClasses(ClassProxyStrategy(3, balanced=True), num_learners=3)
    first = per_learner.assign(emb, labels, 12, SLICES, seed=0)
    # Different k-means seed, previous given: Hungarian matching restores each learner's ids.
    second = per_learner.assign(emb, labels, 12, SLICES, previous=first, seed=5)
    np.testing.assert_array_equal(second, first)


def test_random_partitions_differ_between_learners_and_are_reproducible():
    per_learner = PerLearnerMetaClasses(RandomStrategy(4), num_learners=3)
    a = per_learner.assign(None, np.arange(40) % 40, 40, SLICES, seed=1)
    b = per_learner.assign(None, np.arange(40) % 40, 40, SLICES, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[1], a[2])
    assert all(sorted(np.bincount(row)) == [10, 10, 10, 10] for row in a)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="class-level"):
        PerLearnerMetaClasses(SampleKMeansStrategy(2), num_learners=2)
    per_learner = PerLearnerMetaClasses(ClassProxyStrategy(2), num_learners=3)
    emb, labels = clustered_embeddings()
    with pytest.raises(ValueError, match="3 learner slices"):
        per_learner.assign(emb, labels, 12, SLICES[:2])
    with pytest.raises(ValueError, match="previous must have shape"):
        per_learner.assign(emb, labels, 12, SLICES, previous=np.zeros((2, 12), dtype=np.int64))
    with pytest.raises(ValueError, match="need embeddings"):
        per_learner.assign(None, labels, 12, SLICES)


def test_all_learners_loss_is_mean_of_learner_losses_plus_weighted_full_loss():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(24, 12), dim=1).requires_grad_()
    labels = torch.arange(24) // 4  # 6 classes
    meta = [torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 1, 0, 0, 1, 2])]
    loss_fn = GCELoss(margin=0.2, mining="all", full_embedding_weight=0.5)
    total, parts = loss_fn.all_learners(emb, labels, SLICES, [m[labels] for m in meta])
    single = LearnerTripletLoss(margin=0.2, mining="all")
    expected = sum(single(emb, m[labels], s) for m, s in zip(meta, SLICES, strict=True)) / 3 + 0.5 * single(emb, labels)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["loss"] == pytest.approx(total.item()) and "full_loss" in parts
    total.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    with pytest.raises(ValueError, match="one label vector per learner"):
        loss_fn.all_learners(emb, labels, SLICES, [labels])


def test_config_refuses_relabelling_sample_level_subsets(tmp_path, shape_folder, capsys):
    config = write_config(tmp_path, shape_folder, tmp_path / "run")
    with pytest.raises(ConfigError, match="learner_data=all"):
        load_config(config, ["metaclass.learner_data=all", "metaclass.strategy=samples"])
    assert run_train(config, "metaclass.learner_data=all", "metaclass.num_metaclasses=4") == 1  # 6 classes < 8
    assert "metaclass.num_metaclasses=4 needs at least 8 training classes" in capsys.readouterr().err


@pytest.mark.slow
def test_training_with_all_data_reading_resumes_exactly(tmp_path, shape_folder):
    overrides = [
        "metaclass.learner_data=all",
        "metaclass.num_metaclasses=3",
        "loss.full_embedding_weight=0.5",
        "train.eval_test_every=0",
        "sampler.batches_per_epoch=4",
    ]
    out = tmp_path / "run"
    assert run_train(write_config(tmp_path, shape_folder, out), *overrides) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if r["event"] == "metaclass"]
    assert len(updates) == 3
    for update in updates:  # two learners, each with 3 meta-classes covering the 6 classes
        assert len(update["classes_per_metaclass"]) == 2
        assert all(sum(sizes) == 6 and len(sizes) == 3 for sizes in update["classes_per_metaclass"])
    state, _ = load_checkpoint(out)
    assert tuple(state["assignment"].shape) == (2, 6)
    resumed = tmp_path / "resumed"
    config = write_config(tmp_path, shape_folder, resumed)
    assert run_train(config, *overrides, "train.epochs=2") == 0
    assert run_train(config, *overrides, "--resume") == 0
    state_resumed, _ = load_checkpoint(resumed)
    assert torch.equal(state["assignment"], state_resumed["assignment"])
    for key, tensor in state["model"].items():
        assert torch.equal(tensor, state_resumed["model"][key]), key
