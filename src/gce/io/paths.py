"""Output paths, checked before any work: one-line errors naming the path and the problem.

An output is refused when it is empty, a directory, a FIFO / socket / block device, below a
regular file, in a read-only folder, one of the command's own inputs (compared by inode, so hard
links and symlinks are caught too), or a file gce verifies by checksum. ``~`` is expanded in every
path (:func:`user_path`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

from gce.errors import GceError

__all__ = [
    "CHECKSUM_SUFFIX",
    "OutputError",
    "check_output_dir",
    "check_output_file",
    "check_run_folder",
    "checksum_path",
    "file_argument",
    "path_argument",
    "refuse_input_files",
    "refuse_inputs",
    "unreplaceable_kind",
    "user_path",
]


CHECKSUM_SUFFIX = ".sha256"


class OutputError(GceError):
    """An output path cannot be written safely. The message names the path and the problem."""


def user_path(text: str | os.PathLike, what: str = "path") -> Path:
    """``text`` as a Path with ``~`` expanded; an empty path is an error naming ``what``.

    Usable as an argparse ``type=`` through :func:`path_argument`.
    """
    raw = os.fspath(text)
    if not str(raw).strip():
        raise OutputError(f"{what}: the path is empty")
    return Path(os.path.expanduser(raw))


def path_argument(text: str) -> Path:
    """argparse ``type=`` for path options: ``~`` expanded, empty refused as a usage error."""
    import argparse

    if not text.strip():
        raise argparse.ArgumentTypeError("the path is empty")
    return Path(os.path.expanduser(text))


def file_argument(text: str) -> Path:
    """argparse ``type=`` for an output *file*: as :func:`path_argument`, and a name ending in
    ``/`` (a folder) is a usage error."""
    import argparse

    path = path_argument(text)
    if text.endswith(("/", os.sep, "/.", "/..")) or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} names a folder, not a file")
    return path


def checksum_path(path: str | os.PathLike) -> Path:
    """Where the checksum of ``path`` lives: ``<path>.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def unreplaceable_kind(mode: int) -> str | None:
    """A readable name for file types that must never be replaced, else None."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISBLK(mode):
        return "a block device"
    return None


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(os.sep)


def _probe(folder: Path, size: int = 0) -> str | None:
    """Why a file of ``size`` bytes cannot be created in the existing ``folder``, or None. A real
    create, write, fsync and delete: ``os.access`` says yes to root for read-only folders, /proc
    and /sys, and only a write finds a full disk. One probe name per process (N ranks probe at once)."""
    probe = folder / f".gce-write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        if size:
            os.write(fd, b"\0" * size)
            os.fsync(fd)
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(fd)
        with suppress(OSError):
            os.unlink(probe)
    return None


def _check_folder_writable(folder: Path, path: Path, what: str) -> None:
    """``folder`` (to be created if missing) can hold new files; else a one-line OutputError."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():  # some ancestor is a regular file (or a broken link)
        raise OutputError(f"{what} {path}: {existing} is not a folder, so nothing can be created below it")
    problem = _probe(existing)
    if problem is not None:
        raise OutputError(f"{what} {path}: cannot create files in {existing} ({problem})")


def _identities(paths: Iterable[str | os.PathLike | None]) -> dict[tuple[int, int], str]:
    found: dict[tuple[int, int], str] = {}
    for p in paths:
        if p is None:
            continue
        try:
            st = os.stat(os.path.expanduser(os.fspath(p)))
        except OSError:
            continue
        found[(st.st_dev, st.st_ino)] = os.fspath(p)
    return found


def refuse_inputs(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], what: str = "output") -> None:
    """Fail if ``path`` is (by inode: hard links and symlinks too) one of ``inputs``.

    Inputs that are folders also cover every file below them: writing anywhere inside a dataset
    root being read would change the run's own inputs. Pass many image files through
    :func:`refuse_input_files` instead (it only stats them when the output already exists).
    """
    path = Path(path)
    given = [p for p in inputs if p is not None]
    refuse_input_files(path, given, what)
    real = os.path.realpath(path)
    for p in given:
        folder = os.path.expanduser(os.fspath(p))
        if os.path.isdir(folder):
            real_folder = os.path.realpath(folder)
            if real == real_folder or real.startswith(real_folder.rstrip(os.sep) + os.sep):
                raise OutputError(
                    f"{what} {path} is inside {folder}, one of this command's inputs; choose a path outside it"
                )


def refuse_input_files(
    path: str | os.PathLike, files: Iterable[str | os.PathLike | None], what: str = "output"
) -> None:
    """Fail if the existing file ``path`` is the same file (same inode) as one of ``files``.

    A path that does not exist yet cannot be an input, so nothing is checked then.
    """
    try:
        target = os.stat(path)
    except OSError:
        return
    if not stat.S_ISREG(target.st_mode):
        return
    same = _identities(files).get((target.st_dev, target.st_ino))
    if same is not None:
        raise OutputError(f"{what} {path} is one of this command's inputs ({same}); choose another path")


def check_output_file(
    path: str | os.PathLike | None, *, what: str = "output", inputs: Iterable[str | os.PathLike | None] = ()
) -> Path:
    """Check, before any work, that ``path`` can be written without destroying anything.

    Returns the path to write (``~`` expanded; a symlink resolved to the file it points to).
    Raises :class:`OutputError` naming ``what`` and the path when it is empty, a directory, a
    FIFO, a socket or a block device, below a regular file, in a read-only folder, one of
    ``inputs`` (files, or folders whose whole content counts as input), or a file with a
    ``.sha256`` beside it (a model, checkpoint or index: never replaced by another output).
    A character device (``/dev/null``) is accepted: it is written into, never replaced.
    """
    if path is None:
        raise OutputError(f"{what}: no path given")
    given = user_path(path, what)
    if str(path).endswith(os.sep) and not given.is_dir():
        raise OutputError(f"{what} {given}: ends with '{os.sep}', so it names a folder, not a file")
    target = Path(os.path.realpath(given)) if given.is_symlink() else given
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    except NotADirectoryError:
        mode = None  # reported below: an ancestor is a file
    except OSError as exc:
        raise OutputError(f"{what} {given}: cannot be inspected ({exc.strerror or exc})") from None
    if mode is not None:
        kind = unreplaceable_kind(mode)
        if kind is not None:
            hint = "; give a file name inside it" if stat.S_ISDIR(mode) else "; gce writes regular files only"
            raise OutputError(f"{what} {given} is {kind}, not a file{hint}")
        if stat.S_ISCHR(mode):
            if not os.access(target, os.W_OK):
                raise OutputError(f"{what} {given}: the device is not writable (permission denied)")
            return target
        refuse_inputs(target, inputs, what)
        if checksum_path(target).exists():  # a model, checkpoint or index gce reads back as truth
            raise OutputError(
                f"{what} {given} is a file gce verifies (it has {checksum_path(target).name});"
                f" it is not overwritten: choose another path"
            )
        # Atomic replacement needs the folder, not only the file, to be writable.
        _check_folder_writable(target.parent, given, what)
        return target
    refuse_inputs(target, inputs, what)
    _check_folder_writable(target.parent, given, what)
    return target


def check_output_dir(
    path: str | os.PathLike | None,
    *,
    what: str = "output folder",
    inputs: Iterable[str | os.PathLike | None] = (),
    marker: str | None = None,
) -> Path:
    """Check, before any work, that the folder ``path`` exists or can be created and written.

    Returns it with ``~`` expanded. Raises :class:`OutputError` when it is empty, exists as
    something other than a folder, lies below a regular file, is read-only, or is (or lies inside)
    one of ``inputs``. With ``marker`` (the file a command writes to record what it owns there,
    e.g. an index's ``manifest.json``), an existing non-empty folder without that file is refused,
    naming what is in it: a command writes and removes files only in a folder of its own. Nothing
    is created here.
    """
    if path is None:
        raise OutputError(f"{what}: no path given")
    folder = user_path(path, what)
    if os.path.lexists(folder) and not folder.is_dir():
        try:
            mode = os.stat(folder).st_mode
            kind = unreplaceable_kind(mode) or ("a character device" if stat.S_ISCHR(mode) else "a file")
        except OSError:
            kind = "a broken link"
        raise OutputError(f"{what} {folder} is {kind}, not a folder")
    for p in inputs:
        if p is None:
            continue
        source = os.path.realpath(os.path.expanduser(os.fspath(p)))
        real = os.path.realpath(folder)
        if real == source or (os.path.isdir(source) and real.startswith(source.rstrip(os.sep) + os.sep)):
            raise OutputError(
                f"{what} {folder} is inside {p}, one of this command's inputs; choose a folder outside it"
            )
    if marker is not None:
        refuse_foreign_dir(folder, marker=marker, what=what)
    _check_folder_writable(folder, folder, what)
    return folder


def refuse_foreign_dir(folder: Path, *, marker: str, what: str = "output folder") -> None:
    """Raise :class:`OutputError` if ``folder`` holds anything but lacks ``marker``, naming its entries."""
    try:
        entries = sorted(os.listdir(folder))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(f"{what} {folder} cannot be listed: {exc.strerror or exc}") from None
    if entries and marker not in entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise OutputError(
            f"{what} {folder} is not empty and was not written by this command (no {marker}): it holds {shown}; "
            "choose a new or empty folder"
        )


def check_run_folder(folder: Path, what: str = "output folder") -> None:
    """Fail before any work if the run folder cannot be created or written, or the disk is full.

    The path is checked by :func:`check_output_dir` (a file, a FIFO, below a file, read-only: one
    line naming ``what``); then the folder is created and a 1 MiB probe catches a full disk before
    the first checkpoint does.
    """
    check_output_dir(folder, what=what)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GceError(f"output folder {folder} is not writable: {exc.strerror or exc}") from None
    problem = _probe(folder, size=1024 * 1024)
    if problem is not None:
        raise GceError(f"output folder {folder} is not writable: {problem}")
