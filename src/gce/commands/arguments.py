"""Argument types shared by the sub-commands: bounded integers, positive numbers and seeds, with one-line errors."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def count(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[minimum, maximum]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:  # resource-sized: memory, not a typo's traceback
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


def seed(text: str) -> int:
    """An argparse type: a seed from 0 to 2**32 - 1 (what numpy, torch and Python all accept)."""
    value = count(0)(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be below 2**32, got {value}")
    return value


def positive_number(maximum: float, minimum: float = 0.0) -> Callable[[str], float]:
    """An argparse type: a finite number above 0, at least ``minimum``, at most ``maximum`` (no nan, inf)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:g}, got {text}")
        return value

    return parse
