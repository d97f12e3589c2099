"""One run folder, one training: the checks before a run starts in ``train.out_dir``, and its lock.

A run being trained holds ``<out_dir>/running.lock`` (:mod:`gce.io.locks`: the holder's pid
under ``flock``), the file the ablation runner holds and the demo respects. A second ``gce train``
or ``--resume`` on a live run fails with one line naming the holder's pid instead of writing into
its folder; a lock left by a killed run is free at once (the kernel drops the ``flock``).

The lock is reentrant within a job: the ablation runner holds it and then runs the trainer in the
same process, and ``gce train --nproc N`` holds it in the launcher for the workers it starts
(which learn its pid from :data:`LAUNCHER_PID_ENV`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gce.config import ExperimentConfig
from gce.errors import CheckpointError, GceError
from gce.io import check_run_folder
from gce.io.locks import LockedError, try_lock
from gce.training.checkpoint import LAST, PREVIOUS
from gce.training.trackers import check_trackers
from gce.training.writer import check_fresh_folder

__all__ = ["LAUNCHER_PID_ENV", "RUN_LOCK", "hold_run_folder", "launcher_pid", "prepare_run_folder"]

RUN_LOCK = "running.lock"
#: Set by ``gce train --nproc`` for its workers: the pid of the launcher (their parent).
LAUNCHER_PID_ENV = "GCE_LAUNCHER_PID"


def launcher_pid() -> int | None:
    """The pid of the ``gce train --nproc`` launcher that started this process, if one did and lives."""
    try:
        pid = int(os.environ.get(LAUNCHER_PID_ENV, ""))
    except ValueError:
        return None
    return pid if pid == os.getppid() else None  # an inherited value in an unrelated process: not ours


def _held_for_us(holder: int) -> bool:
    return holder == os.getpid() or (holder != 0 and holder == launcher_pid())


@contextmanager
def hold_run_folder(out: str | os.PathLike) -> Iterator[None]:
    """Hold ``out``'s run lock for the block, or raise :class:`~gce.io.locks.LockedError` naming
    the live process that trains there. A no-op when this process or its launcher holds it already."""
    out = Path(out)
    path = out / RUN_LOCK
    with try_lock(path) as holder:
        if holder is not None and not _held_for_us(holder):
            who = f"process {holder}" if holder else "another process"
            raise LockedError(
                f"train.out_dir {out} is being trained by {who} (lock file {path}); "
                f"wait for it to finish or stop it, then resume with --resume"
            )
        yield


def holds_checkpoint(out: Path) -> bool:
    return (out / LAST).exists() or (out / PREVIOUS).exists()


def prepare_run_folder(cfg: ExperimentConfig, resume: bool) -> Path:
    """Check ``train.out_dir`` before any work: writable, holding a run exactly when resuming, and
    without files of the user's that a new run would replace. Returns the folder."""
    check_trackers(cfg)  # a missing tracker package fails now, before the folder and the data
    out = Path(cfg.train.out_dir)
    check_run_folder(out)
    if resume and not holds_checkpoint(out):
        raise CheckpointError(f"no checkpoint in {out} (expected {LAST})")  # as loading it would say
    if not resume and holds_checkpoint(out):
        raise GceError(f"{out} already holds a run; pass --resume to continue it or choose another train.out_dir")
    if not resume:
        check_fresh_folder(out)  # never replace files of the user's that share a run file's name
    return out
