"""Workers stop when their launcher is gone.

torch's elastic launcher (``gce train --nproc``, ``torchrun``) starts each worker in a session of
its own, so a launcher killed by SIGKILL (or the OOM killer) cannot pass anything on: its workers
would train on and write the run folder while the command has died and a ``--resume`` may have
started. :func:`stop_with_launcher`, called at worker start, ends the worker with SIGKILL as soon
as its parent dies, so that what is left is what any kill leaves and ``--resume`` continues it.

Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (the kernel signals the worker when the launcher's
spawning thread, its main thread, exits); then the parent is checked once, for a launcher that
died before the call. Elsewhere a daemon thread polls ``os.getppid()``, which changes when the
parent dies (the worker is re-parented).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

from gce.io.processes import pid_alive

__all__ = ["parent_death_signal", "stop_with_launcher", "watch_parent"]

_PR_SET_PDEATHSIG = 1
_started = False


def parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _running(pid: int) -> bool:
    """Whether ``pid`` lives and is not a zombie (a killed launcher its own parent has not reaped yet)."""
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):  # no /proc: alive as far as we can tell
        return True


def _stop(expected_parent: int) -> None:
    sys.stderr.write(
        f"gce: the launcher (pid {expected_parent}) of this worker (pid {os.getpid()}) is gone; "
        f"stopping it (resume the run with --resume)\n"
    )
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def watch_parent(expected_parent: int, interval_s: float = 1.0) -> threading.Thread:
    """Start a daemon thread that kills this process (SIGKILL) once its parent is no longer ``expected_parent``."""

    def watch() -> None:
        while os.getppid() == expected_parent:
            time.sleep(interval_s)
        _stop(expected_parent)

    thread = threading.Thread(target=watch, name="gce-parent-watch", daemon=True)
    thread.start()
    return thread


def stop_with_launcher() -> None:
    """In a worker started by torch's elastic launcher: die with it (see the module docstring).

    A no-op in other processes and on a second call. The launcher is ``gce train --nproc``'s
    process when it set ``GCE_LAUNCHER_PID``, else the parent this worker has now (``torchrun``).
    """
    global _started
    if _started or "TORCHELASTIC_RUN_ID" not in os.environ:  # not a torchrun worker
        return
    _started = True
    from gce.training.run_folder import LAUNCHER_PID_ENV

    parent = os.getppid()
    try:
        expected = int(os.environ.get(LAUNCHER_PID_ENV, ""))
    except ValueError:
        expected = parent
    if expected != parent and _running(expected):  # a value inherited from elsewhere: torchrun is the parent
        expected = parent
    if parent_death_signal(signal.SIGKILL):
        if os.getppid() != expected:  # it died before the kernel was asked to tell us
            _stop(expected)
        return
    watch_parent(expected)
