"""Lock files that say who holds them: one writer at a time for a run folder, an index, a store.

A lock is a file holding the holder's pid, kept under an exclusive ``flock`` for as long as it is
held. The kernel drops the ``flock`` when its process dies (even by SIGKILL), so a lock left by a
dead process is taken over without any guess; the pid is what the refusal message names. A file
whose pid is alive but that nobody ``flock``s (written by an older gce, or on a file system
without ``flock``) is still respected while that process lives.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gce.errors import GceError
from gce.io.processes import pid_alive

__all__ = ["LockedError", "hold_lock", "try_lock"]


class LockedError(GceError):
    """Another live process holds the lock."""


def _read_pid(fd: int) -> int:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return int(os.read(fd, 32).decode("ascii", "replace").strip() or 0)
    except ValueError:
        return 0


def _acquire(path: Path) -> tuple[int | None, int]:
    """(fd, 0) when this process now holds ``path``; (None, holder pid) when another one does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(8):  # only retried when the file was replaced under us
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            # The holder writes its pid just after taking the flock: give it that instant (bounded).
            for _ in range(50):
                if holder:
                    break
                time.sleep(0.002)
                holder = _read_pid(fd)
            os.close(fd)
            return None, holder
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # the previous holder removed it between our open and flock
            same_file = False
        if not same_file:
            os.close(fd)
            continue
        holder = _read_pid(fd)
        if holder and holder != os.getpid() and pid_alive(holder):  # a pid lock without flock
            os.close(fd)
            return None, holder
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, str(os.getpid()).encode())
        os.fsync(fd)
        return fd, 0
    raise LockedError(f"{path}: the lock file keeps being replaced; is another process looping on it?")


def _release(path: Path, fd: int) -> None:
    try:
        path.unlink(missing_ok=True)  # before close: nobody can flock our inode and think it is current
    finally:
        os.close(fd)


@contextmanager
def try_lock(path: str | Path) -> Iterator[int | None]:
    """Holds the lock file ``path`` for the block: yields None when held, else the holder's pid (0 if unknown)."""
    path = Path(path)
    fd, holder = _acquire(path)
    if fd is None:
        yield holder
        return
    try:
        yield None
    finally:
        _release(path, fd)


@contextmanager
def hold_lock(path: str | Path, what: str) -> Iterator[None]:
    """Holds the lock file ``path`` for the block, or raises :class:`LockedError` naming ``what`` and the holder."""
    with try_lock(path) as holder:
        if holder is not None:
            who = f"process {holder}" if holder else "another process"
            raise LockedError(f"{what} is in use by {who} (lock file {path}); wait for it to finish or stop it")
        yield
