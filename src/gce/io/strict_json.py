"""Strict JSON: NaN and infinity become ``null`` (JSON has no NaN; strict parsers reject it)."""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["dumps_strict", "strict_json"]


def strict_json(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by ``None`` (JSON has no NaN; strict parsers
    reject it), numpy scalars and arrays turned into Python values."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return strict_json(value.tolist())
    return value


def dumps_strict(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes ``null`` for NaN/inf and never emits non-standard JSON."""
    return json.dumps(strict_json(value), allow_nan=False, **kwargs)
