"""Argument types shared by the sub-commands: bounded integers, positive numbers and seeds, with one-line errors."""

from __future__ import annotations

import argparse
import math
import os
import sys
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


#: More threads than this only adds contention (and 100,000 of them would not start).
MAX_THREADS = 4 * (os.cpu_count() or 1)


def add_runtime_options(parser: argparse.ArgumentParser, *, threads: bool = True) -> None:
    """``--runtime`` (and ``--threads``) of the commands that embed images (gce.retrieval.runtimes)."""
    from gce.config.vocabulary import RUNTIME_CHOICES

    parser.add_argument(
        "--runtime",
        choices=RUNTIME_CHOICES,
        default="auto",
        help="what runs the model: onnx (ONNX Runtime on an export cached beside the checkpoint), torch,"
        " or auto (default: onnx on CPU when installed and it matches PyTorch, else torch)",
    )
    if threads:
        parser.add_argument(
            "--threads",
            type=count(1, MAX_THREADS),
            default=None,
            help=f"intra-op threads of the runtime (default: torch's; at most {MAX_THREADS}, 4 per CPU)",
        )


def stderr_line(command: str) -> Callable[[str], None]:
    """A ``say`` for :class:`gce.retrieval.Embedder`: ``command: message`` on stderr."""

    def say(message: str) -> None:
        print(f"{command}: {message}", file=sys.stderr, flush=True)

    return say


def runtime_line(embedder) -> str:
    """The start-up line that says what runs the model, with how many threads."""
    return f"runtime {embedder.runtime.name}: {embedder.runtime.describe()}"
