"""Meta-class proxies, Hungarian matching and assignment strategies."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

import gce.metaclass.balanced_kmeans as balanced_kmeans
from gce.metaclass import (
    STRATEGY_NAMES,
    AssignmentStats,
    ClassProxyStrategy,
    MetaClassStrategy,
    assignment_stats,
    build_strategy,
    class_proxies,
    group_of_sample,
    match_to_previous,
    moved_fraction,
    overlap_matrix,
)


# ------------------------------------------------------------------------------------ fixtures
def clustered_data(
    classes_per_cluster: list[int],
    images_per_class: int | list[int] = 5,
    dim: int = 16,
    seed: int = 0,
    spread: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Embeddings whose classes form well-separated clusters of class proxies.

    Returns (embeddings N x D, labels N, true cluster of every class).
    """
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][: len(classes_per_cluster)]
    true_cluster = np.repeat(np.arange(len(classes_per_cluster)), classes_per_cluster)
    num_classes = len(true_cluster)
    sizes = np.broadcast_to(np.asarray(images_per_class), (num_classes,))
    class_centres = centres[true_cluster] + spread * rng.normal(size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), sizes)
    emb = class_centres[labels] + 0.5 * spread * rng.normal(size=(len(labels), dim))
    return torch.tensor(emb, dtype=torch.float32), torch.tensor(labels), true_cluster


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a and b group the items identically (ids may differ)."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ------------------------------------------------------------------------------------ proxies
def test_class_proxies_match_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=gen) * 3
    y = torch.randint(0, 5, (40,), generator=gen)
    y[:5] = torch.arange(5)  # every class present
    got = class_proxies(x, y, 6)
    xn = torch.nn.functional.normalize(x, dim=1)
    for c in range(5):
        mean = xn[y == c].mean(0)
        torch.testing.assert_close(got[c], mean / mean.norm())
    assert torch.all(got[5] == 0), "a class without samples gets the zero proxy"
    torch.testing.assert_close(got[:5].norm(dim=1), torch.ones(5))


def test_class_proxies_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match="labels must lie"):
        class_proxies(torch.randn(3, 2), torch.tensor([0, 1, 3]), 3)


# ------------------------------------------------------------------------------------ matching
def test_match_restores_permuted_ids() -> None:
    rng = np.random.default_rng(1)
    old = rng.integers(0, 4, size=50)
    perm = np.array([2, 0, 3, 1])
    assert np.array_equal(match_to_previous(old, perm[old], 4), old)


def test_match_maximises_weighted_overlap_brute_force() -> None:
    rng = np.random.default_rng(2)
    for trial in range(20):
        k = 4
        old, new = rng.integers(0, k, size=30), rng.integers(0, k, size=30)
        w = rng.integers(1, 20, size=30).astype(float)
        got = match_to_previous(old, new, k, weights=w)
        assert same_partition(got, new) or len(set(new)) < k
        overlap = overlap_matrix(old, new, k, w)
        best = max(sum(overlap[p[j], j] for j in range(k)) for p in itertools.permutations(range(k)))
        kept = float(w[got == old].sum())
        assert kept == pytest.approx(best), trial


def test_match_uses_weights() -> None:
    old = np.array([0, 0, 1, 1])
    new = np.array([0, 1, 1, 0])  # each new group overlaps each old group once
    w = np.array([1.0, 10.0, 1.0, 1.0])  # item 1 (old 0, new 1) is heavy: new 1 must become 0
    assert match_to_previous(old, new, 2, weights=w).tolist() == [1, 0, 0, 1]


def test_moved_fraction_brute_force() -> None:
    rng = np.random.default_rng(3)
    old, new = rng.integers(0, 3, size=25), rng.integers(0, 3, size=25)
    w = rng.random(25)
    assert moved_fraction(old, new) == pytest.approx(sum(o != n for o, n in zip(old, new, strict=True)) / 25)
    expected = sum(wi for o, n, wi in zip(old, new, w, strict=True) if o != n) / w.sum()
    assert moved_fraction(old, new, w) == pytest.approx(expected)
    assert moved_fraction(old, old) == 0.0


# ------------------------------------------------------------------------------------ class_proxy
def test_class_proxy_finds_clusters_and_is_stable() -> None:
    x, y, truth = clustered_data([5, 5, 5, 5])
    strategy = build_strategy("class_proxy", num_metaclasses=4)
    assert isinstance(strategy, MetaClassStrategy) and strategy.level == "class"
    first = strategy.assign(x, y, 20, previous=None, seed=0)
    assert first.shape == (20,) and first.dtype == np.int64
    assert set(first.tolist()) == {0, 1, 2, 3}
    assert same_partition(first, truth)
    # Same data again, with and without a different k-means seed: matching keeps every id.
    assert np.array_equal(strategy.assign(x, y, 20, previous=first, seed=0), first)
    assert np.array_equal(strategy.assign(x, y, 20, previous=first, seed=7), first)
    # Permuting the cluster ids by hand: matching restores them.
    perm = np.array([3, 1, 0, 2])
    assert np.array_equal(match_to_previous(first, perm[first], 4), first)


def test_every_class_lies_in_one_subset() -> None:
    x, y, _ = clustered_data([4, 6, 3, 7], images_per_class=[2, 3, 4, 5] * 5)
    for name in ("class_proxy", "random", "none"):
        k = 1 if name == "none" else 4
        strategy = build_strategy(name, num_metaclasses=k)
        assignment = strategy.assign(x, y, 20, previous=None, seed=0)
        groups = group_of_sample(assignment, y, strategy.level)
        for c in range(20):
            assert len(set(groups[y.numpy() == c].tolist())) == 1, (name, c)


@pytest.mark.parametrize("num_classes_per_cluster", [[10, 5, 3, 2], [12, 4, 4, 2]])
def test_balanced_class_sizes_differ_by_at_most_one(num_classes_per_cluster: list[int]) -> None:
    x, y, _ = clustered_data(num_classes_per_cluster)
    c = sum(num_classes_per_cluster)
    unbalanced = build_strategy("class_proxy", 4).assign(x, y, c, None, 0)
    assert np.ptp(np.bincount(unbalanced, minlength=4)) > 1  # the test data is really skewed
    balanced = build_strategy("class_proxy", 4, balanced=True).assign(x, y, c, None, 0)
    sizes = np.bincount(balanced, minlength=4)
    assert sizes.sum() == c and np.ptp(sizes) <= 1


def test_balanced_greedy_path_has_same_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(balanced_kmeans, "EXACT_BALANCE_MAX_POINTS", 0)
    x, y, _ = clustered_data([10, 6, 3, 2])
    assignment = build_strategy("class_proxy", 4, balanced=True).assign(x, y, 21, None, 0)
    sizes = np.bincount(assignment, minlength=4)
    assert sorted(sizes.tolist()) == [5, 5, 5, 6]


def test_balanced_by_images() -> None:
    rng = np.random.default_rng(4)
    images = rng.integers(1, 15, size=24).tolist()
    x, y, _ = clustered_data([12, 6, 4, 2], images_per_class=images)
    strategy = build_strategy("class_proxy", 4, balanced=True, balance_by="images")
    assignment = strategy.assign(x, y, 24, None, 0)
    per_learner = np.bincount(assignment[y.numpy()], minlength=4)
    assert np.ptp(per_learner) <= 2 * max(images)
    stats = assignment_stats(assignment, y, 24)
    assert stats.images_per_learner == per_learner.tolist()
    assert min(stats.classes_per_learner) >= 2


def test_degenerate_proxies_give_every_learner_two_classes() -> None:
    # Only two distinct proxies for 4 learners: k-means leaves empty clusters that must be filled.
    x = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5)
    y = torch.arange(10)
    assignment = build_strategy("class_proxy", 4).assign(x, y, 10, None, 0)
    assert np.bincount(assignment, minlength=4).min() >= 2


def test_one_class_per_learner_when_few_classes() -> None:
    x, y, _ = clustered_data([2, 1])
    assignment = build_strategy("class_proxy", 3).assign(x, y, 3, None, 0)
    assert sorted(assignment.tolist()) == [0, 1, 2]


def test_too_many_learners_is_an_error() -> None:
    x, y, _ = clustered_data([2, 1])
    for name in ("class_proxy", "random", "samples"):
        with pytest.raises(ValueError, match="num_metaclasses=4 is larger than the number of training classes"):
            build_strategy(name, 4).assign(x, y, 3, None, 0)


def test_non_finite_embeddings_are_reported() -> None:
    x, y, _ = clustered_data([3, 3])
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        build_strategy("class_proxy", 2).assign(x, y, 6, None, 0)


def test_assign_ready_made_proxies() -> None:
    x, y, truth = clustered_data([3, 3, 3])
    strategy = ClassProxyStrategy(3)
    assert same_partition(strategy.assign_proxies(class_proxies(x, y, 9), seed=0), truth)


# ------------------------------------------------------------------------------------ random
def test_random_is_reproducible_and_balanced() -> None:
    strategy = build_strategy("random", 4)
    a = strategy.assign(None, np.arange(22), 22, None, seed=5)
    assert np.array_equal(a, strategy.assign(None, np.arange(22), 22, None, seed=5))
    assert not np.array_equal(a, strategy.assign(None, np.arange(22), 22, None, seed=6))
    assert sorted(np.bincount(a, minlength=4).tolist()) == [5, 5, 6, 6]


def test_random_fixed_unless_redraw() -> None:
    labels = np.arange(20)
    fixed = build_strategy("random", 4, redraw=False)
    first = fixed.assign(None, labels, 20, None, seed=0)
    assert np.array_equal(fixed.assign(None, labels, 20, first, seed=99), first)
    redraw = build_strategy("random", 4, redraw=True)
    again = redraw.assign(None, labels, 20, first, seed=99)
    fresh = redraw.assign(None, labels, 20, None, seed=99)
    assert same_partition(again, fresh)  # the new draw, only relabelled to match `first`
    assert not np.array_equal(again, first)
    assert np.array_equal(again, match_to_previous(first, fresh, 4))


def test_random_balanced_by_images() -> None:
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 30, size=40)
    labels = np.repeat(np.arange(40), sizes)
    a = build_strategy("random", 4, balance_by="images").assign(None, labels, 40, None, seed=1)
    per_learner = np.bincount(a[labels], minlength=4)
    assert np.ptp(per_learner) <= sizes.max()


# ------------------------------------------------------------------------------------ samples
def test_samples_strategy_assigns_samples() -> None:
    x, y, _ = clustered_data([3, 3, 3], images_per_class=6)
    # Move half of class 0's images far away so that the class is split across clusters.
    x[:3] = x[y == 8][:3]
    strategy = build_strategy("samples", 3)
    assert strategy.level == "sample"
    a = strategy.assign(x, y, 9, None, seed=0)
    assert a.shape == (len(y),) and set(a.tolist()) == {0, 1, 2}
    stats = assignment_stats(a, y, 9, level="sample")
    assert stats.split_classes >= 1
    assert np.array_equal(strategy.assign(x, y, 9, a, seed=3), a)
    assert np.array_equal(group_of_sample(a, y, "sample"), a)


def test_samples_balanced() -> None:
    x, y, _ = clustered_data([6, 2, 1], images_per_class=4)
    a = build_strategy("samples", 3, balanced=True).assign(x, y, 9, None, seed=0)
    assert np.ptp(np.bincount(a, minlength=3)) <= 1


# ------------------------------------------------------------------------------------ factory
def test_none_strategy() -> None:
    strategy = build_strategy("none", 1)
    assert strategy.assign(None, np.arange(5), 5, None, 0).tolist() == [0] * 5
    with pytest.raises(ValueError, match="num_metaclasses=1"):
        build_strategy("none", 2)


def test_unknown_strategy_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="kmeans") as info:
        build_strategy("kmeans", 2)
    for name in STRATEGY_NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="balance_by"):
        build_strategy("class_proxy", 2, balance_by="pixels")


# ------------------------------------------------------------------------------------ stats
def test_assignment_stats_class_level_brute_force() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2, 3, 4])
    old = np.array([0, 0, 1, 1, 2])
    new = np.array([0, 1, 1, 1, 0])
    stats = assignment_stats(new, labels, 5, previous=old, num_metaclasses=3)
    assert isinstance(stats, AssignmentStats)
    assert stats.classes_per_learner == [2, 3, 0]
    assert stats.images_per_learner == [3, 5, 0]
    assert stats.moved_fraction == pytest.approx(2 / 5)  # classes 1 and 4 moved
    assert stats.moved_images_fraction == pytest.approx(2 / 8)
    assert stats.split_classes == 0
    assert assignment_stats(new, labels, 5).moved_fraction == 0.0
    assert dataclasses.asdict(stats)["classes_per_learner"] == [2, 3, 0]


def test_assignment_stats_sample_level_brute_force() -> None:
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 6, size=40)
    old, new = rng.integers(0, 3, size=40), rng.integers(0, 3, size=40)
    stats = assignment_stats(new, labels, 6, previous=old, level="sample")
    for k in range(3):
        assert stats.classes_per_learner[k] == len(set(labels[new == k].tolist()))
        assert stats.images_per_learner[k] == int((new == k).sum())
    assert stats.moved_fraction == pytest.approx(float(np.mean(old != new)))
    split = sum(len(set(new[labels == c].tolist())) > 1 for c in range(6))
    assert stats.split_classes == split


def test_warm_start_refresh_moves_fewer_classes_than_reclustering():
    """A refresh from the previous groups keeps classes whose nearest group did not change."""
    from gce.metaclass import build_strategy, moved_fraction

    rng = np.random.default_rng(3)
    proxies = rng.normal(size=(200, 16))  # no cluster structure: re-clustering is arbitrary
    labels = np.arange(200)
    cold = build_strategy("class_proxy", 4, balanced=True, warm_start=False)
    warm = build_strategy("class_proxy", 4, balanced=True, warm_start=True)
    first = cold.assign(proxies, labels, 200, seed=0)
    drifted = proxies + 0.1 * rng.normal(size=proxies.shape)
    moved_cold = moved_fraction(first, cold.assign(drifted, labels, 200, previous=first, seed=1))
    moved_warm = moved_fraction(first, warm.assign(drifted, labels, 200, previous=first, seed=1))
    assert moved_warm < moved_cold
    assert moved_warm < 0.1
