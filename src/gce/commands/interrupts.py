"""Ctrl-C for every command that trains: one message, the command that continues, exit 130.

``gce train``, ``gce ablate`` and ``gce demo`` all run the trainer, whose first Ctrl-C finishes
the step and writes a checkpoint (:class:`~gce.training.trainer.TrainingInterrupted`); a Ctrl-C
before its handler is installed (start-up) or a second one is a ``KeyboardInterrupt``. Both end
here, so no command prints a traceback or exits 1 for a Ctrl-C.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def report_interrupt(exc: BaseException, out: Path | None, command: list[str]) -> int:
    """Print what was kept and ``command`` (which continues the work), return 130.

    ``out``: the run folder of ``gce train``; ``None`` for commands that run several runs or
    resume by themselves (``gce ablate``, ``gce demo``).
    """
    from gce.training.checkpoint import LAST, PREVIOUS
    from gce.training.trainer import EXIT_INTERRUPTED

    text = " ".join(shlex.quote(str(a)) for a in command)
    if not isinstance(exc, KeyboardInterrupt):  # TrainingInterrupted: its message names the checkpoint
        print(f"{exc}\n{'resume' if out is not None else 'continue'} with: {text}", file=sys.stderr)
    elif out is None:
        print(f"interrupted: finished runs and written checkpoints are kept\ncontinue with: {text}", file=sys.stderr)
    elif (out / LAST).exists() or (out / PREVIOUS).exists():
        print(f"interrupted: the last checkpoint in {out} is kept\nresume with: {text}", file=sys.stderr)
    else:
        print(
            f"interrupted before the first checkpoint: nothing to resume\nstart again with: "
            f"{text.removesuffix(' --resume')}",
            file=sys.stderr,
        )
    return EXIT_INTERRUPTED
