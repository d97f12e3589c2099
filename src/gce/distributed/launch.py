"""``gce train CONFIG --nproc N``: start the same command as N processes on this machine.

It runs what ``python -m torch.distributed.run --standalone --nproc-per-node N [--max-restarts R] -m gce
train CONFIG ...`` runs (torch's elastic launcher, the module behind ``torchrun``; ``--standalone``
picks a free local port), in this process, so that its end is one line instead of a traceback.
Several machines: call ``torchrun`` directly, see docs/scale.md.
A worker restarted by ``--max-restarts`` continues from the run's last checkpoint on its own
(:func:`restarted_by_launcher`). The workers learn this process's pid (``GCE_LAUNCHER_PID``): they
stop when it dies (:mod:`.parent_watch`), and the run folder's lock it holds is theirs.
"""

from __future__ import annotations

import os
import signal
import sys

from gce.errors import ConfigError, GceError

__all__ = ["FRESH_STORE_PER_RESTART", "check_not_in_a_job", "launch_local", "restarted_by_launcher", "torchrun_command"]

# By default the workers' process group shares the launcher's rendezvous store, whose keys outlive a
# restart: restarted gloo workers then read the dead workers' addresses and fail ("Connection
# refused") or hang (measured here, torch 2.14; pytorch/pytorch#135712). A store per round avoids it.
FRESH_STORE_PER_RESTART = ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")


def torchrun_command(gce_args: list[str], nproc: int, max_restarts: int = 0) -> list[str]:
    """The launcher command line that runs ``gce <gce_args>`` as ``nproc`` local processes."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    if max_restarts < 0:
        raise ConfigError(f"--max-restarts must be at least 0, got {max_restarts}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "-m",
        "gce",
        *gce_args,
    ]


def launch_local(gce_args: list[str], nproc: int, max_restarts: int = 0) -> int:
    """Run ``gce <gce_args>`` under torch's elastic launcher, in this process; 0, or 130 after Ctrl-C.

    Ctrl-C (or SIGTERM) reaches the launcher, which passes it on to the workers: they finish their
    step, write a checkpoint and print the resume command; then this returns 130. Failed workers
    (after ``max_restarts`` restarts) are one line here; their own errors are printed above it.
    """
    check_not_in_a_job()
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from gce.training.run_folder import LAUNCHER_PID_ENV

    arguments = torchrun_command(gce_args, nproc, max_restarts)[3:]  # after "python -m torch.distributed.run"
    os.environ.setdefault(*FRESH_STORE_PER_RESTART)
    # The workers' parent: they stop if it dies (parent_watch) and take its run lock as theirs.
    before = os.environ.get(LAUNCHER_PID_ENV)
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    try:
        torchrun.run(torchrun.parse_args(arguments))
    except SignalException:
        return 130
    except ChildFailedError as exc:
        codes = sorted({failure.exitcode for failure in exc.failures.values()})
        if codes == [130]:  # every failed worker stopped on an interrupt, and said so
            return 130
        # After the first failure the launcher stops the other workers with SIGTERM (-15): those did
        # not fail on their own, whether or not they had got to their own error by then.
        own = [f.exitcode for f in exc.failures.values() if f.exitcode != -signal.SIGTERM]
        stopped = len(exc.failures) - len(own)
        codes = sorted(set(own)) or codes
        also = f"; the launcher stopped the other {stopped}" if own and stopped else ""
        raise GceError(
            f"{len(own) or len(exc.failures)} of {nproc} worker processes failed (exit code "
            f"{', '.join(map(str, codes))}){also}; their errors are printed above"
        ) from None
    finally:  # for the workers only: a process started later by this one (a test's) has another parent
        if before is None:
            os.environ.pop(LAUNCHER_PID_ENV, None)
        else:
            os.environ[LAUNCHER_PID_ENV] = before
    return 0


def check_not_in_a_job() -> None:
    """``--nproc`` starts a job; inside one (a torchrun worker) it would start a job per worker."""
    if "WORLD_SIZE" in os.environ:
        raise GceError("--nproc inside a torchrun job: the job already has its processes; drop --nproc")


def restarted_by_launcher() -> bool:
    """True in a worker that torchrun started again after a failure (``--max-restarts``)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False
