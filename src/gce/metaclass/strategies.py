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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from gce.config.vocabulary import BALANCE_BY, STRATEGY_NAMES
from gce.metaclass.assignments import (
    ArrayLike,
    Level,
    check_num_metaclasses,
    check_previous,
    embeddings_array,
    labels_array,
    normalise_rows,
    to_numpy,
)
from gce.metaclass.balanced_kmeans import cluster_points
from gce.metaclass.matching import match_to_previous
from gce.metaclass.proxies import class_proxies
from gce.registry import Registry

__all__ = [
    "STRATEGY_NAMES",
    "STRATEGY_REGISTRY",
    "ClassProxyStrategy",
    "MetaClassStrategy",
    "NoneStrategy",
    "RandomStrategy",
    "SampleKMeansStrategy",
    "StrategyOptions",
    "build_strategy",
]


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
        lab = labels_array(labels, num_classes)
        emb = embeddings_array(embeddings, lab.shape[0])
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
        prox = to_numpy(proxies, np.float64)
        num_classes = prox.shape[0]
        check_num_metaclasses(self.num_metaclasses, num_classes)
        prev = check_previous(previous, num_classes, self.num_metaclasses, "class")
        sizes = None if class_sizes is None else np.asarray(class_sizes, dtype=np.float64)
        if sizes is not None and sizes.shape != (num_classes,):
            raise ValueError(f"class_sizes must have shape ({num_classes},), got {sizes.shape}")
        # Without class sizes every class counts as one image: "images" balance = "classes".
        weights = sizes if (self.balanced and self.balance_by == "images") else None
        groups = cluster_points(
            normalise_rows(prox),
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
        check_num_metaclasses(self.num_metaclasses, num_classes)
        prev = check_previous(previous, num_classes, self.num_metaclasses, "class")
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
        return np.bincount(labels_array(labels, num_classes), minlength=num_classes)

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
        lab = labels_array(labels, num_classes)
        emb = embeddings_array(embeddings, lab.shape[0])
        check_num_metaclasses(self.num_metaclasses, num_classes)
        prev = check_previous(previous, lab.shape[0], self.num_metaclasses, "sample")
        groups = cluster_points(
            normalise_rows(emb), self.num_metaclasses, seed, balanced=self.balanced, n_init=self.n_init
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
