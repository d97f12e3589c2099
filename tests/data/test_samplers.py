"""SubsetBalancedBatchSampler: one subset per batch, round-robin, P x M, deterministic."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest

from gce.data.samplers import SubsetBalancedBatchSampler

NUM_CLASSES, K, P, M = 30, 3, 4, 3


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    """Labels with 1..8 images per class and a class-level assignment of 10 classes per learner."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 9, size=NUM_CLASSES)
    labels = np.repeat(np.arange(NUM_CLASSES), sizes)
    assignment = rng.permutation(np.arange(NUM_CLASSES) % K)
    return labels, assignment[labels]


def make(labels: np.ndarray, groups: np.ndarray | None, **kw) -> SubsetBalancedBatchSampler:
    opts = {"classes_per_batch": P, "samples_per_class": M, "batches_per_epoch": 12, "seed": 3}
    opts.update(kw)
    return SubsetBalancedBatchSampler(labels, groups, **opts)


def test_batches_come_from_one_subset_round_robin_with_p_by_m_layout(data) -> None:
    labels, groups = data
    sampler = make(labels, groups)
    plan = sampler.plan_epoch(0)
    assert len(plan) == 12
    assert [learner for learner, _ in plan] == [b % K for b in range(12)]
    for b, (learner, indices) in enumerate(plan):
        assert sampler.learner_of_batch(b) == learner
        assert len(indices) == P * M
        assert set(groups[indices].tolist()) == {learner}
        counts = Counter(labels[indices].tolist())
        assert len(counts) == P and set(counts.values()) == {M}


def test_small_classes_are_sampled_with_replacement(data) -> None:
    labels, groups = data
    sizes = np.bincount(labels)
    small_seen = False
    for _, indices in make(labels, groups, batches_per_epoch=30).plan_epoch(1):
        for c, count in Counter(labels[indices].tolist()).items():
            distinct = len({i for i in indices if labels[i] == c})
            assert count == M
            if sizes[c] >= M:
                assert distinct == M  # without replacement when the class is big enough
            else:
                assert distinct <= sizes[c]  # repeats are unavoidable
                small_seen = True
    assert small_seen


def test_deterministic_per_seed_and_epoch(data) -> None:
    labels, groups = data
    a, b = make(labels, groups), make(labels, groups)
    assert a.plan_epoch(4) == b.plan_epoch(4)
    assert a.plan_epoch(4) != a.plan_epoch(5)
    assert make(labels, groups, seed=4).plan_epoch(4) != a.plan_epoch(4)


def test_default_batches_per_epoch(data) -> None:
    labels, groups = data
    sampler = SubsetBalancedBatchSampler(labels, groups, classes_per_batch=P, samples_per_class=M)
    assert sampler.batches_per_epoch == len(labels) // (P * M)


def test_single_subset_mode(data) -> None:
    labels, _ = data
    sampler = make(labels, None)
    assert sampler.num_groups == 1
    assert all(learner == 0 for learner, _ in sampler.plan_epoch(0))


def test_set_assignment_refreshes_subsets(data) -> None:
    labels, groups = data
    sampler = make(labels, groups)
    before = sampler.plan_epoch(0)
    new_groups = (groups + 1) % K
    sampler.set_assignment(new_groups)
    after = sampler.plan_epoch(0)
    assert after != before
    for learner, indices in after:
        assert set(new_groups[indices].tolist()) == {learner}


def test_sample_level_groups_split_classes() -> None:
    # Divide-and-Conquer: a class may appear in several subsets; batches still stay in one.
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(8), 6)
    groups = rng.integers(0, 2, size=len(labels))
    sampler = make(labels, groups, classes_per_batch=3, samples_per_class=2)
    for learner, indices in sampler.plan_epoch(0):
        assert set(groups[indices].tolist()) == {learner}


def test_subset_with_one_class_is_an_error(data) -> None:
    labels, _ = data
    groups = np.where(labels == 0, 2, labels % 2)  # learner 2 holds only class 0
    with pytest.raises(ValueError, match="learner 2's subset has 1 class"):
        make(labels, groups)
    with pytest.raises(ValueError, match="learner 3's subset has 0 class"):
        make(labels, labels % 3, num_groups=4)


def test_too_few_classes_for_p_uses_all_and_warns_once(data) -> None:
    labels, groups = data
    groups = np.where(labels < 3, 1, 0)  # learner 1 has 3 classes < P = 4
    sampler = make(labels, groups)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = sampler.plan_epoch(0) + sampler.plan_epoch(1)
    assert len([w for w in caught if "learner 1" in str(w.message)]) == 1
    for learner, indices in plan:
        assert len(set(labels[indices].tolist())) == (3 if learner == 1 else P)


def test_bad_arguments(data) -> None:
    labels, groups = data
    with pytest.raises(ValueError, match="classes_per_batch"):
        make(labels, groups, classes_per_batch=1)
    with pytest.raises(ValueError, match="entries"):
        make(labels, groups[:-1])
