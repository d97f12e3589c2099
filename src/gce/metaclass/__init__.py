"""Meta-classes: class proxies, clustering/partition strategies and Hungarian matching.

See :mod:`gce.metaclass.strategies` for what an assignment is and which strategies exist.
"""

from gce.metaclass.assignments import Level, group_of_sample
from gce.metaclass.balanced_kmeans import cluster_points
from gce.metaclass.matching import match_to_previous, moved_fraction, overlap_matrix
from gce.metaclass.proxies import class_proxies
from gce.metaclass.stats import AssignmentStats, assignment_stats
from gce.metaclass.strategies import (
    STRATEGY_NAMES,
    ClassProxyStrategy,
    MetaClassStrategy,
    NoneStrategy,
    RandomStrategy,
    SampleKMeansStrategy,
    build_strategy,
)

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
    "class_proxies",
    "cluster_points",
    "group_of_sample",
    "match_to_previous",
    "moved_fraction",
    "overlap_matrix",
]
