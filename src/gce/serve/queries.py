"""A query's learner subset and weights, from form text or Python lists, checked once for all.

Every rule here is one the batched index scan would otherwise apply to a whole batch at once; a
request that breaks one is refused alone, before it joins a batch (a one-line 422).
"""

from __future__ import annotations

from collections.abc import Sequence

from gce.errors import GceError
from gce.retrieval.vectors import learner_weights
from gce.serve.errors import RequestError


def parse_learners(text: str | None, count: int) -> list[int] | None:
    """``"0,2"`` -> ``[0, 2]``; empty or missing -> ``None`` (all learners)."""
    if text is None or not text.strip():
        return None
    try:
        learners = [int(part) for part in text.split(",")]
    except ValueError:
        raise RequestError(
            422, f"learners must be comma-separated learner numbers 0..{count - 1}, got {text[:60]!r}"
        ) from None
    return sorted(check_learners(learners, count))


def parse_weights(text: str | None, count: int) -> list[float] | None:
    """``"1,0.5,1,1"`` -> one non-negative weight per learner of the model."""
    if text is None or not text.strip():
        return None
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise RequestError(422, f"weights must be {count} comma-separated numbers, got {text[:60]!r}") from None
    return check_weights(weights, count)


def check_learners(learners: Sequence[int], count: int) -> list[int]:
    """A learner subset by the index's own rules (:func:`~gce.retrieval.vectors.learner_weights`), else a 422."""
    _index_rules(count, learners=learners)
    return [int(n) for n in learners]


def check_weights(weights: Sequence[float], count: int) -> list[float]:
    """One weight per learner by the index's own rules (finite, non-negative, not all zero), else a 422."""
    _index_rules(count, weights=weights)
    return [float(w) for w in weights]


def _index_rules(count: int, learners: Sequence[int] | None = None, weights: Sequence[float] | None = None) -> None:
    # One rule book: the scan's own, so the service and `gce search` never disagree on a query.
    try:
        learner_weights(count, learners, weights)
    except GceError as exc:
        raise RequestError(422, str(exc)) from None
