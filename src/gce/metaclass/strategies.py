"""Meta-class strategies: which training data trains which base learner.

An *assignment* is an integer array with values in ``0..M-1`` (``M = num_metaclasses``; in the
default reading, ``metaclass.learner_data: subset``, meta-class ``k`` is the data subset of learner
``k`` and ``M`` is the number of learners ``K``; in the ``all`` reading each learner has its own
partition into ``metaclass.num_metaclasses`` meta-classes, see :mod:`gce.metaclass.relabel`):

* class level (``class_proxy``, ``random``, ``none``): length ``C``; all images of class ``c`` go
  to meta-class ``assignment[c]``, so a class lies wholly in one subset (the point of GCE);
* sample level (``samples``): length ``N``; image ``i`` goes to meta-class ``assignment[i]`` and a
  class may be spread over several subsets (Divide-and-Conquer, the baseline GCE argues against).

For either level ``group_of_sample`` (what :class:`gce.data.samplers.SubsetBalancedBatchSampler`
takes) is :func:`group_of_sample`.

Strategies
----------
``class_proxy`` (GCE)
    k-means (scikit-learn, seeded, ``n_init`` restarts) on the class proxies
    (:func:`gce.metaclass.proxies.class_proxies`). Proxies are unit vectors, so Euclidean k-means
    on them orders points like cosine distance (``|x - c|^2 = 2 - 2 x.c`` for unit ``c``).
    ``balanced=True`` makes the groups equal in size: see :func:`cluster_points`.
``random`` (DREML)
    A random balanced partition of the classes drawn from ``seed``; kept fixed across updates
    unless ``redraw=True``.
``samples`` (Divide-and-Conquer)
    k-means on the normalised sample embeddings, same balancing option, at sample level.
``none``
    ``K = 1``: everything in group 0 (the single-metric baseline).

After clustering, new group ids are matched to the previous ones with the Hungarian algorithm
(:func:`gce.metaclass.matching.match_to_previous`) so that meta-class ``k`` (and the learner
trained on it) keeps most of its data. Every meta-class gets at least two classes (two samples at
sample level) whenever there are at least ``2M`` of them, because a triplet needs a positive and a
negative class; otherwise at least one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from gce.config.vocabulary import BALANCE_BY, STRATEGY_NAMES
from gce.evaluation.metrics import kmeans
from gce.metaclass.matching import match_to_previous, moved_fraction
from gce.metaclass.proxies import class_proxies
from gce.registry import Registry

__all__ = [
    "STRATEGY_NAMES",
    "AssignmentStats",
    "ClassProxyStrategy",
    "Level",
    "MetaClassStrategy",
    "NoneStrategy",
    "RandomStrategy",
    "SampleKMeansStrategy",
    "assignment_stats",
    "build_strategy",
    "cluster_points",
    "group_of_sample",
]

Level = Literal["class", "sample"]
ArrayLike = torch.Tensor | np.ndarray

# Above this many points the exact balanced assignment (an n x n Hungarian problem, O(n^3)) is too
# slow and too big in memory; a greedy regret-ordered assignment with the same quotas is used.
EXACT_BALANCE_MAX_POINTS = 2000
BALANCE_ITERATIONS = 10


# --------------------------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------------------------
@runtime_checkable
class MetaClassStrategy(Protocol):
    """What the trainer needs from a meta-class strategy.

    ``level`` says whether :meth:`assign` returns one group per class (``"class"``, length ``C``)
    or one per sample (``"sample"``, length ``N``). ``needs_embeddings``: whether :meth:`assign`
    uses embeddings (else it may get ``None``). ``refreshes``: whether a scheduled refresh can
    change a previous assignment (``random`` without ``redraw`` keeps its first draw).
    """

    level: Level
    num_metaclasses: int
    needs_embeddings: bool
    refreshes: bool

    def assign(
        self,
        embeddings: ArrayLike | None,
        labels: ArrayLike,
        num_classes: int,
        previous: np.ndarray | None = None,
        seed: int = 0,
    ) -> np.ndarray:
        """Return the new assignment (int64), matched to ``previous`` when given."""
        ...


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _to_numpy(x: ArrayLike, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _labels_array(labels: ArrayLike, num_classes: int) -> np.ndarray:
    lab = _to_numpy(labels, np.int64)
    if lab.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {lab.shape}")
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    return lab


def _embeddings_array(embeddings: ArrayLike | None, num_samples: int) -> np.ndarray:
    if embeddings is None:
        raise ValueError("this strategy needs embeddings, got None")
    emb = _to_numpy(embeddings, np.float64)
    if emb.ndim != 2 or emb.shape[0] != num_samples:
        raise ValueError(f"embeddings must be {num_samples} x D, got shape {emb.shape}")
    # A diverged model produces NaN embeddings; say so instead of failing deep inside k-means.
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or infinite values (did training diverge?)")
    return emb


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _check_num_metaclasses(num_metaclasses: int, num_classes: int) -> None:
    if num_metaclasses < 1:
        raise ValueError(f"num_metaclasses must be >= 1, got {num_metaclasses}")
    if num_metaclasses > num_classes:
        raise ValueError(
            f"num_metaclasses={num_metaclasses} is larger than the number of training classes "
            f"({num_classes}): every meta-class needs at least one class; use at most "
            f"{num_classes} meta-classes"
        )


def _check_previous(previous: np.ndarray | None, length: int, num_metaclasses: int, what: str) -> np.ndarray | None:
    if previous is None:
        return None
    prev = np.asarray(previous, dtype=np.int64)
    if prev.shape != (length,):
        raise ValueError(f"previous assignment must have one entry per {what} ({length}), got shape {prev.shape}")
    if prev.size and (prev.min() < 0 or prev.max() >= num_metaclasses):
        raise ValueError(f"previous assignment values must lie in 0..{num_metaclasses - 1}")
    return prev


def _min_group_size(num_points: int, num_groups: int) -> int:
    """Two items per group when possible: a triplet needs a positive class and a negative class."""
    return 2 if num_points >= 2 * num_groups else 1


def group_of_sample(assignment: np.ndarray, labels: ArrayLike, level: Level) -> np.ndarray:
    """Learner of every sample: ``assignment[labels]`` at class level, the assignment itself at
    sample level. This is what the batch sampler takes."""
    assignment = np.asarray(assignment, dtype=np.int64)
    if level == "class":
        return assignment[_to_numpy(labels, np.int64)]
    if level == "sample":
        return assignment.copy()
    raise ValueError(f"level must be 'class' or 'sample', got {level!r}")


# --------------------------------------------------------------------------------------------
# Clustering
# --------------------------------------------------------------------------------------------
def _sq_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``n x K`` squared Euclidean distances (expanded form: no n x K x D temporary)."""
    d = (points**2).sum(1)[:, None] - 2.0 * points @ centroids.T + (centroids**2).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _centroids(points: np.ndarray, groups: np.ndarray, k: int, old: np.ndarray) -> np.ndarray:
    """Normalised group means (spherical k-means step); an empty group keeps its old centroid."""
    sums = np.zeros((k, points.shape[1]))
    np.add.at(sums, groups, points)
    counts = np.bincount(groups, minlength=k)
    new = old.copy()
    filled = counts > 0
    new[filled] = _normalise_rows(sums[filled])
    return new


def _enforce_min_size(points: np.ndarray, groups: np.ndarray, k: int, min_size: int) -> np.ndarray:
    """Move points into groups smaller than ``min_size`` until none is left.

    A non-empty small group takes the nearest point (to its mean) from a group that can spare one;
    an empty group is reseeded with the point of the largest group farthest from that group's
    mean, i.e. the largest group is split. Needs ``len(points) >= k * min_size``.
    """
    groups = groups.copy()
    counts = np.bincount(groups, minlength=k)
    while (counts < min_size).any():
        small = int(np.argmin(counts))
        if counts[small] > 0:
            target = points[groups == small].mean(0, keepdims=True)
            candidates = np.flatnonzero(counts[groups] > min_size)
            pick = candidates[np.argmin(_sq_distances(points[candidates], target)[:, 0])]
        else:
            largest = int(np.argmax(counts))
            members = np.flatnonzero(groups == largest)
            centre = points[members].mean(0, keepdims=True)
            pick = members[np.argmax(_sq_distances(points[members], centre)[:, 0])]
        counts[groups[pick]] -= 1
        groups[pick] = small
        counts[small] += 1
    return groups


def _count_quotas(dist: np.ndarray) -> np.ndarray:
    """Group sizes ``floor(n/K)`` or ``floor(n/K)+1`` summing to ``n``; the ``n mod K`` extra
    places go to the groups most in demand (most points nearest to them), to disturb k-means
    least."""
    n, k = dist.shape
    quotas = np.full(k, n // k, dtype=np.int64)
    demand = np.bincount(dist.argmin(1), minlength=k)
    quotas[np.argsort(-demand, kind="stable")[: n % k]] += 1
    return quotas


def _hungarian_quota_assign(dist: np.ndarray, quotas: np.ndarray) -> np.ndarray:
    """Optimal assignment with exact group sizes: every group is replicated ``quota`` times into
    slots, so the problem becomes a square n x n linear assignment."""
    slot_group = np.repeat(np.arange(dist.shape[1]), quotas)
    rows, cols = linear_sum_assignment(dist[:, slot_group])
    groups = np.empty(dist.shape[0], dtype=np.int64)
    groups[rows] = slot_group[cols]
    return groups


def _greedy_capacity_assign(dist: np.ndarray, weights: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Greedy assignment under per-group capacities (in units of ``weights``).

    Points with the largest regret (second-best minus best distance) choose first, since they lose
    most by not getting their nearest group. Each goes to its nearest group with room left; if none
    has room (possible only with unequal weights) it goes to the group with the most room left.
    """
    n, k = dist.shape
    order_of_groups = np.argsort(dist, axis=1)
    sorted_d = np.take_along_axis(dist, order_of_groups, axis=1)
    regret = sorted_d[:, 1] - sorted_d[:, 0] if k > 1 else np.zeros(n)
    room = capacity.astype(np.float64).copy()
    groups = np.empty(n, dtype=np.int64)
    for i in np.argsort(-regret, kind="stable"):
        fits = room[order_of_groups[i]] >= weights[i]
        g = order_of_groups[i][np.argmax(fits)] if fits.any() else int(np.argmax(room))
        groups[i] = g
        room[g] -= weights[i]
    return groups


def _balanced_step(dist: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """One balanced assignment step for the current centroids."""
    n, k = dist.shape
    if weights is None:
        quotas = _count_quotas(dist)
        if n <= EXACT_BALANCE_MAX_POINTS:
            return _hungarian_quota_assign(dist, quotas)
        return _greedy_capacity_assign(dist, np.ones(n), quotas)
    capacity = np.full(k, math.ceil(float(weights.sum()) / k))
    return _greedy_capacity_assign(dist, weights, capacity)


def cluster_points(
    points: np.ndarray,
    num_clusters: int,
    seed: int,
    *,
    balanced: bool = False,
    weights: np.ndarray | None = None,
    n_init: int = 10,
    n_iter: int = BALANCE_ITERATIONS,
    init_groups: np.ndarray | None = None,
) -> np.ndarray:
    """Cluster unit vectors into ``num_clusters`` groups; returns one group id per point.

    Unbalanced: scikit-learn k-means (seeded, ``n_init`` restarts). With ``init_groups`` (a previous
    grouping of the same points) k-means starts from those groups' normalised means instead: a
    refresh that moves only the points whose nearest group changed, rather than a re-clustering
    whose result depends on the restart.

    Balanced (``balanced=True``), starting from the k-means centroids, for up to ``n_iter`` rounds
    (stopping early when nothing changes): assign points under size constraints, then recompute
    each centroid as the normalised mean of its points.

    * ``weights is None`` -- balance the *number of points*: sizes are exactly ``floor(n/K)`` or
      ``floor(n/K)+1`` (differ by at most 1). Solved optimally by the Hungarian algorithm on the
      point-to-slot distance matrix, each centroid replicated into as many slots as its quota;
      above ``EXACT_BALANCE_MAX_POINTS`` points, by a greedy regret-ordered assignment with the
      same quotas (same sizes, slightly worse distances).
    * ``weights`` given (e.g. images per class) -- balance the *total weight*: each group has a
      capacity ``ceil(sum(w)/K)`` and points are placed greedily; a point that fits nowhere goes to
      the group with most room, so totals differ by at most about twice the largest weight.

    In every case each group ends with at least 2 points when ``n >= 2K`` (else at least 1): empty
    or singleton k-means clusters are repaired by moving/splitting (see ``_enforce_min_size``).
    """
    n = points.shape[0]
    if not 1 <= num_clusters <= n:
        raise ValueError(f"cannot make {num_clusters} clusters from {n} points")
    if num_clusters == 1:
        return np.zeros(n, dtype=np.int64)
    init = None
    if init_groups is not None:
        init = _centroids(points, np.asarray(init_groups), num_clusters, _normalise_rows(points[:num_clusters].copy()))
    # Fewer distinct points than clusters leaves empty or tiny clusters: _enforce_min_size repairs them.
    groups, centroids = kmeans(points, num_clusters, seed=seed, n_init=n_init, init=init, backend="sklearn")
    if balanced:
        w = None if weights is None else np.asarray(weights, dtype=np.float64)
        centroids = _normalise_rows(centroids)
        for _ in range(n_iter):
            new_groups = _balanced_step(_sq_distances(points, centroids), w)
            converged = np.array_equal(new_groups, groups)
            groups = new_groups
            if converged:
                break
            centroids = _centroids(points, groups, num_clusters, centroids)
    return _enforce_min_size(points, groups, num_clusters, _min_group_size(n, num_clusters))


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------
def _check_balance_by(balance_by: str) -> None:
    if balance_by not in BALANCE_BY:
        raise ValueError(f"balance_by must be one of {', '.join(BALANCE_BY)}; got {balance_by!r}")


class ClassProxyStrategy:
    """GCE: k-means on class proxies, optionally size-balanced, Hungarian-matched to the previous
    assignment (weighted by images per class, so keeping big classes matters more).

    Args:
        num_metaclasses: ``M``, the number of groups of classes made.
        balanced: equalise group sizes (see :func:`cluster_points`).
        balance_by: ``"classes"`` (sizes differ by at most one class) or ``"images"``.
        n_init: k-means restarts.
        warm_start: with a previous assignment, start k-means from its groups' proxy means (a
            refresh) instead of k-means++ restarts (a re-clustering that reshuffles many classes).
    """

    level: Level = "class"
    needs_embeddings = True
    refreshes = True

    def __init__(
        self,
        num_metaclasses: int,
        balanced: bool = False,
        balance_by: str = "classes",
        n_init: int = 10,
        warm_start: bool = True,
    ) -> None:
        _check_balance_by(balance_by)
        self.num_metaclasses = num_metaclasses
        self.balanced = balanced
        self.balance_by = balance_by
        self.n_init = n_init
        self.warm_start = warm_start

    def assign(
        self,
        embeddings: ArrayLike | None,
        labels: ArrayLike,
        num_classes: int,
        previous: np.ndarray | None = None,
        seed: int = 0,
    ) -> np.ndarray:
        """Compute proxies from ``embeddings`` (N x D) and ``labels`` and cluster them."""
        lab = _labels_array(labels, num_classes)
        emb = _embeddings_array(embeddings, lab.shape[0])
        proxies = class_proxies(torch.from_numpy(emb), torch.from_numpy(lab), num_classes)
        sizes = np.bincount(lab, minlength=num_classes)
        return self.assign_proxies(proxies, sizes, previous, seed)

    def assign_proxies(
        self,
        proxies: ArrayLike,
        class_sizes: np.ndarray | None = None,
        previous: np.ndarray | None = None,
        seed: int = 0,
    ) -> np.ndarray:
        """Cluster ready-made proxies (``C x D``).

        ``class_sizes`` (images per class) weights the matching and the ``"images"`` balance;
        without it every class counts as one image.
        """
        prox = _to_numpy(proxies, np.float64)
        num_classes = prox.shape[0]
        _check_num_metaclasses(self.num_metaclasses, num_classes)
        prev = _check_previous(previous, num_classes, self.num_metaclasses, "class")
        sizes = None if class_sizes is None else np.asarray(class_sizes, dtype=np.float64)
        if sizes is not None and sizes.shape != (num_classes,):
            raise ValueError(f"class_sizes must have shape ({num_classes},), got {sizes.shape}")
        # Without class sizes every class counts as one image: "images" balance = "classes".
        weights = sizes if (self.balanced and self.balance_by == "images") else None
        groups = cluster_points(
            _normalise_rows(prox),
            self.num_metaclasses,
            seed,
            balanced=self.balanced,
            weights=weights,
            n_init=self.n_init,
            init_groups=prev if self.warm_start else None,
        )
        if prev is not None:
            groups = match_to_previous(prev, groups, self.num_metaclasses, weights=sizes)
        return groups


class RandomStrategy:
    """DREML: a random balanced partition of the classes, reproducible from ``seed``.

    ``balance_by="classes"``: a random permutation of the classes cut into ``K`` near-equal chunks
    (sizes differ by at most one). ``balance_by="images"``: classes taken in random order, each
    given to the learner with the fewest images so far (totals differ by at most the largest
    class). With ``redraw=False`` (the default) a given ``previous`` is returned unchanged, so the
    partition drawn at the first update is kept for the whole run; with ``redraw=True`` a new one
    is drawn from ``seed`` and matched to ``previous``. Embeddings are ignored (may be ``None``).
    """

    level: Level = "class"
    needs_embeddings = False

    def __init__(self, num_metaclasses: int, balance_by: str = "classes", redraw: bool = False) -> None:
        _check_balance_by(balance_by)
        self.num_metaclasses = num_metaclasses
        self.balance_by = balance_by
        self.redraw = redraw
        self.refreshes = redraw

    def assign(
        self,
        embeddings: ArrayLike | None,
        labels: ArrayLike | None,
        num_classes: int,
        previous: np.ndarray | None = None,
        seed: int = 0,
    ) -> np.ndarray:
        _check_num_metaclasses(self.num_metaclasses, num_classes)
        prev = _check_previous(previous, num_classes, self.num_metaclasses, "class")
        if prev is not None and not self.redraw:
            return prev.copy()
        sizes = self._class_sizes(labels, num_classes)
        groups = self._draw(num_classes, np.random.default_rng(seed), sizes)
        if prev is not None:
            groups = match_to_previous(prev, groups, self.num_metaclasses, weights=sizes)
        return groups

    def _class_sizes(self, labels: ArrayLike | None, num_classes: int) -> np.ndarray | None:
        if labels is None:
            if self.balance_by == "images":
                raise ValueError("balance_by='images' needs labels to count images per class")
            return None
        return np.bincount(_labels_array(labels, num_classes), minlength=num_classes)

    def _draw(self, num_classes: int, rng: np.random.Generator, sizes: np.ndarray | None) -> np.ndarray:
        perm = rng.permutation(num_classes)
        groups = np.empty(num_classes, dtype=np.int64)
        if self.balance_by == "classes":
            for k, chunk in enumerate(np.array_split(perm, self.num_metaclasses)):
                groups[chunk] = k
            return groups
        assert sizes is not None  # balance_by="images" has labels (see _class_sizes)
        load = np.zeros(self.num_metaclasses, dtype=np.int64)
        for c in perm:  # least-loaded first: greedy number partitioning in random order
            k = int(np.argmin(load))
            groups[c] = k
            load[k] += sizes[c]
        return groups


class SampleKMeansStrategy:
    """Divide-and-Conquer: k-means on normalised sample embeddings; returns one group per sample.

    ``balanced=True`` equalises the number of samples per group (sizes differ by at most one);
    at sample level every image weighs the same, so ``balance_by`` does not apply. New groups are
    matched to ``previous`` (per-sample) with unit weights. A class can span several groups.
    """

    level: Level = "sample"
    needs_embeddings = True
    refreshes = True

    def __init__(self, num_metaclasses: int, balanced: bool = False, n_init: int = 10) -> None:
        self.num_metaclasses = num_metaclasses
        self.balanced = balanced
        self.n_init = n_init

    def assign(
        self,
        embeddings: ArrayLike | None,
        labels: ArrayLike,
        num_classes: int,
        previous: np.ndarray | None = None,
        seed: int = 0,
    ) -> np.ndarray:
        lab = _labels_array(labels, num_classes)
        emb = _embeddings_array(embeddings, lab.shape[0])
        _check_num_metaclasses(self.num_metaclasses, num_classes)
        prev = _check_previous(previous, lab.shape[0], self.num_metaclasses, "sample")
        groups = cluster_points(
            _normalise_rows(emb), self.num_metaclasses, seed, balanced=self.balanced, n_init=self.n_init
        )
        if prev is not None:
            groups = match_to_previous(prev, groups, self.num_metaclasses)
        return groups


class NoneStrategy:
    """Single-metric baseline: one learner, every class in group 0."""

    level: Level = "class"
    num_metaclasses: int = 1
    needs_embeddings = False
    refreshes = True

    def assign(
        self,
        embeddings: ArrayLike | None,
        labels: ArrayLike | None,
        num_classes: int,
        previous: np.ndarray | None = None,
        seed: int = 0,
    ) -> np.ndarray:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        return np.zeros(num_classes, dtype=np.int64)


def build_strategy(
    name: str,
    num_metaclasses: int,
    balanced: bool = False,
    balance_by: str = "classes",
    redraw: bool = False,
    *,
    kmeans_n_init: int = 10,
    warm_start: bool = True,
) -> MetaClassStrategy:
    """Strategy by name: ``class_proxy``, ``random``, ``samples`` or ``none``.

    Options that do not apply to a strategy are ignored (``redraw`` only concerns ``random``,
    ``balanced`` the two k-means strategies; ``random`` is always balanced). ``none`` requires
    ``num_metaclasses == 1``. Raises ``ValueError`` for an unknown name or a bad option.
    """
    if num_metaclasses < 1:
        raise ValueError(f"num_metaclasses must be >= 1, got {num_metaclasses}")
    _check_balance_by(balance_by)
    if name not in STRATEGY_REGISTRY:
        raise ValueError(f"unknown meta-class strategy {name!r}; valid names: {', '.join(STRATEGY_NAMES)}")
    options = StrategyOptions(balanced, balance_by, redraw, kmeans_n_init, warm_start)
    return STRATEGY_REGISTRY[name](num_metaclasses, options)


@dataclass(frozen=True)
class StrategyOptions:
    """The options of :func:`build_strategy`; each strategy reads the ones that concern it."""

    balanced: bool
    balance_by: str
    redraw: bool
    kmeans_n_init: int
    warm_start: bool


StrategyFactory = Callable[[int, StrategyOptions], MetaClassStrategy]
STRATEGY_REGISTRY: Registry[StrategyFactory] = Registry("meta-class strategy", "metaclass.strategy", STRATEGY_NAMES)


@STRATEGY_REGISTRY.register("class_proxy")
def _class_proxy(num_metaclasses: int, o: StrategyOptions) -> MetaClassStrategy:
    return ClassProxyStrategy(
        num_metaclasses, o.balanced, o.balance_by, n_init=o.kmeans_n_init, warm_start=o.warm_start
    )


@STRATEGY_REGISTRY.register("random")
def _random(num_metaclasses: int, o: StrategyOptions) -> MetaClassStrategy:
    return RandomStrategy(num_metaclasses, o.balance_by, o.redraw)


@STRATEGY_REGISTRY.register("samples")
def _samples(num_metaclasses: int, o: StrategyOptions) -> MetaClassStrategy:
    return SampleKMeansStrategy(num_metaclasses, o.balanced, n_init=o.kmeans_n_init)


@STRATEGY_REGISTRY.register("none")
def _none(num_metaclasses: int, o: StrategyOptions) -> MetaClassStrategy:
    if num_metaclasses != 1:
        raise ValueError(
            f"strategy 'none' is the single-learner baseline and needs num_metaclasses=1, got {num_metaclasses}"
        )
    return NoneStrategy()


# --------------------------------------------------------------------------------------------
# Statistics for the log
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AssignmentStats:
    """What to log after each meta-class update.

    Attributes:
        level: ``"class"`` or ``"sample"``.
        classes_per_learner: distinct classes with images in each subset (at class level, classes
            assigned, including any without images).
        images_per_learner: images in each subset.
        moved_fraction: share of classes (class level) or samples (sample level) whose learner
            changed since ``previous``; 0.0 without ``previous``.
        moved_images_fraction: share of images whose learner changed (comparable across levels).
        split_classes: classes whose images lie in more than one subset (always 0 at class level).
    """

    level: str
    classes_per_learner: list[int]
    images_per_learner: list[int]
    moved_fraction: float
    moved_images_fraction: float
    split_classes: int

    def as_dict(self) -> dict:
        """Plain dict (JSON-serialisable) for loggers."""
        return asdict(self)


def assignment_stats(
    assignment: np.ndarray,
    labels: ArrayLike,
    num_classes: int,
    previous: np.ndarray | None = None,
    level: Level = "class",
    num_metaclasses: int | None = None,
) -> AssignmentStats:
    """Sizes of each learner's subset and how much moved since ``previous``.

    ``num_metaclasses`` defaults to ``max(assignment) + 1``; pass it so that a meta-class left empty
    still shows up with zeros.
    """
    groups = np.asarray(assignment, dtype=np.int64)
    lab = _labels_array(labels, num_classes)
    k = int(num_metaclasses if num_metaclasses is not None else (groups.max() + 1 if groups.size else 1))
    per_sample = group_of_sample(groups, lab, level)
    images = np.bincount(per_sample, minlength=k)
    if level == "class":
        classes = np.bincount(groups, minlength=k)
        split = 0
    else:
        pairs = np.unique(per_sample * num_classes + lab)  # distinct (learner, class) pairs
        classes = np.bincount(pairs // num_classes, minlength=k)
        split = int((np.bincount(pairs % num_classes, minlength=num_classes) > 1).sum())
    moved, moved_images = 0.0, 0.0
    if previous is not None:
        prev = np.asarray(previous, dtype=np.int64)
        moved = moved_fraction(prev, groups)
        moved_images = moved_fraction(group_of_sample(prev, lab, level), per_sample)
    return AssignmentStats(
        level=level,
        classes_per_learner=[int(x) for x in classes],
        images_per_learner=[int(x) for x in images],
        moved_fraction=moved,
        moved_images_fraction=moved_images,
        split_classes=split,
    )
