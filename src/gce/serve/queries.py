"""A query's learner subset and weights, from form text or Python lists, checked once for all.

Every rule here is one the batched index scan would otherwise apply to a whole batch at once; a
request that breaks one is refused alone, before it joins a batch (a one-line 422).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

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
    """A learner subset: learner numbers of this model, each once, at least one (else a 422)."""
    chosen = list(learners)
    if not chosen:
        raise RequestError(422, "learners: give at least one learner")
    bad = [n for n in chosen if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n < count]
    if bad:
        raise RequestError(422, f"learners: {bad[0]!r} is not a learner of this model (0..{count - 1})")
    if len(set(chosen)) != len(chosen):
        raise RequestError(422, f"learners: {chosen} names a learner twice")
    return [int(n) for n in chosen]


def check_weights(weights: Sequence[float], count: int) -> list[float]:
    """One finite, non-negative weight per learner, not all zero, with a finite sum (else a 422)."""
    values = list(weights)
    if len(values) != count:
        raise RequestError(422, f"weights: the model has {count} learners, got {len(values)} weights")
    try:
        values = [float(w) for w in values]
    except (TypeError, ValueError):
        raise RequestError(422, f"weights must be numbers, got {values}") from None
    # The scan divides by the sum: 1e308 twice overflows it to inf and every weight to 0.
    if not all(math.isfinite(w) and w >= 0 for w in values) or not 0 < sum(values) < math.inf:
        raise RequestError(
            422, f"weights must be finite, non-negative and not all zero, with a finite sum, got {values}"
        )
    return values
