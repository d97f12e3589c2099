"""Every file ``gce`` writes goes through here: checked before any work, written atomically.

The rules (docs/reliability.md, "Outputs"):

- An output path is checked **before** the work that produces it, so a bad ``--out`` fails in a
  second instead of after an hour of evaluation. Problems are one line naming the path:
  an empty path, a directory, a FIFO / socket / block device (refused, never replaced), a path
  below a regular file, a read-only folder, or a file that is one of the run's own inputs
  (compared by inode, so hard links and symlinks are caught too).
- ``~`` is expanded in every path (:func:`user_path`).
- A regular file is replaced atomically: the bytes go to a temporary file in the same folder,
  are fsynced, then renamed over the target, so a crash never leaves a half-written file. A
  symlink is followed: its target is replaced, the link stays.
- A character device (``/dev/null``, ``/dev/stdout``, a terminal) is written into, as any Unix
  tool would; it is never renamed over.
- Files that ``gce`` later reads as truth (models, checkpoints, embeddings, indexes) get a
  ``<name>.sha256`` sidecar (:func:`write_checksum`) that :func:`verify_checksum` checks on load;
  a missing sidecar is a failed check.

Typical use in a command::

    out = check_output_file(args.out, what="--out", inputs=[args.checkpoint, dataset_root])
    ...                      # the long work
    write_json(out, metrics)  # strict JSON: NaN/inf become null

For writers that need a file name (``faiss.write_index``, ``torch.onnx.export``)::

    with atomic_path(out) as tmp:
        faiss.write_index(index, str(tmp))
    write_checksum(out)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from gce.errors import CheckpointError, GceError

__all__ = [
    "OutputError",
    "atomic_path",
    "check_output_dir",
    "check_output_file",
    "checksum_path",
    "dumps_strict",
    "file_argument",
    "fsync_dir",
    "path_argument",
    "refuse_input_files",
    "refuse_inputs",
    "replace_file",
    "sha256_file",
    "sha256_of",
    "strict_json",
    "user_path",
    "verify_checksum",
    "write_bytes",
    "write_checksum",
    "write_json",
    "write_text",
]

CHECKSUM_SUFFIX = ".sha256"


class OutputError(GceError):
    """An output path cannot be written safely. The message names the path and the problem."""


# ----------------------------------------------------------------------------------- paths
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


def _kind(mode: int) -> str | None:
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


def _probe(folder: Path) -> str | None:
    """Why no file can be created in the existing ``folder``, or None. A real create-and-delete:
    ``os.access`` says yes to root for read-only folders, /proc and /sys."""
    probe = folder / f".gce-write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
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
                raise OutputError(f"{what} {path} is inside {folder}, one of this command's inputs;"
                                  f" choose a path outside it")


def refuse_input_files(path: str | os.PathLike, files: Iterable[str | os.PathLike | None], what: str = "output") -> None:
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


def check_output_file(path: str | os.PathLike | None, *, what: str = "output",
                      inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
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
        kind = _kind(mode)
        if kind is not None:
            hint = "; give a file name inside it" if stat.S_ISDIR(mode) else "; gce writes regular files only"
            raise OutputError(f"{what} {given} is {kind}, not a file{hint}")
        if stat.S_ISCHR(mode):
            if not os.access(target, os.W_OK):
                raise OutputError(f"{what} {given}: the device is not writable (permission denied)")
            return target
        refuse_inputs(target, inputs, what)
        if checksum_path(target).exists():  # a model, checkpoint or index gce reads back as truth
            raise OutputError(f"{what} {given} is a file gce verifies (it has {checksum_path(target).name});"
                              f" it is not overwritten: choose another path")
        # Atomic replacement needs the folder, not only the file, to be writable.
        _check_folder_writable(target.parent, given, what)
        return target
    refuse_inputs(target, inputs, what)
    _check_folder_writable(target.parent, given, what)
    return target


def check_output_dir(path: str | os.PathLike | None, *, what: str = "output folder",
                     inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Check, before any work, that the folder ``path`` exists or can be created and written.

    Returns it with ``~`` expanded. Raises :class:`OutputError` when it is empty, exists as
    something other than a folder, lies below a regular file, is read-only, or is (or lies inside)
    one of ``inputs``. Nothing is created here.
    """
    if path is None:
        raise OutputError(f"{what}: no path given")
    folder = user_path(path, what)
    if os.path.lexists(folder) and not folder.is_dir():
        try:
            mode = os.stat(folder).st_mode
            kind = _kind(mode) or ("a character device" if stat.S_ISCHR(mode) else "a file")
        except OSError:
            kind = "a broken link"
        raise OutputError(f"{what} {folder} is {kind}, not a folder")
    for p in inputs:
        if p is None:
            continue
        source = os.path.realpath(os.path.expanduser(os.fspath(p)))
        real = os.path.realpath(folder)
        if real == source or (os.path.isdir(source) and real.startswith(source.rstrip(os.sep) + os.sep)):
            raise OutputError(f"{what} {folder} is inside {p}, one of this command's inputs; choose a folder outside it")
    _check_folder_writable(folder, folder, what)
    return folder


# ---------------------------------------------------------------------------------- writing
def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems refuse it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _existing_char_device(path: Path) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def _refuse_special(path: Path, what: str) -> None:
    """Re-checked at write time: the path may have changed since :func:`check_output_file`."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    kind = _kind(mode)
    if kind is not None:
        raise OutputError(f"{what} {path} is {kind}, not a file; it was not replaced")


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.tmp-<pid>`` files of ``path`` left by killed writers (their pid is gone)."""
    from gce.runtime import pid_alive  # runtime imports this module

    prefix = f".{path.name}.tmp-"
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):] if name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            with suppress(OSError):
                os.unlink(path.parent / name)


@contextmanager
def atomic_path(path: str | os.PathLike, *, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed over ``path``.

    On an error the temporary file is removed and ``path`` is untouched. A symlink at ``path`` is
    followed (its target is replaced); a character device is yielded as is (written into).
    Missing parent folders are created.
    """
    path = user_path(path, what)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if _existing_char_device(path):
        yield path
        return
    _refuse_special(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{what} {path}: cannot create its folder ({exc.strerror or exc})") from None
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _refuse_special(path, what)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def replace_file(tmp: str | os.PathLike, path: str | os.PathLike, *, what: str = "output") -> Path:
    """Flush the finished temporary file ``tmp`` and rename it over ``path`` (for writers that
    manage their own temporary name); a directory, FIFO, socket or device at ``path`` is refused,
    never replaced."""
    tmp, path = Path(tmp), Path(path)
    _refuse_special(path, what)
    if _existing_char_device(path):
        raise OutputError(f"{what} {path} is a character device, not a file; it was not replaced")
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    fsync_dir(path.parent)
    return path


def write_bytes(path: str | os.PathLike, data: bytes, *, what: str = "output") -> Path:
    """Write ``data`` to ``path`` atomically (a character device is written into). Returns the path."""
    with atomic_path(path, what=what) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, what: str = "output") -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`write_bytes`)."""
    return write_bytes(path, text.encode("utf-8"), what=what)


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


def write_json(path: str | os.PathLike, values: Any, *, what: str = "output") -> Path:
    """Write ``values`` as strict, indented JSON (NaN/inf as ``null``) atomically."""
    return write_text(path, dumps_strict(values, indent=2) + "\n", what=what)


# -------------------------------------------------------------------------------- checksums
def checksum_path(path: str | os.PathLike) -> Path:
    """Where the checksum of ``path`` lives: ``<path>.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksum(path: str | os.PathLike, data: bytes | None = None) -> Path:
    """Write ``<path>.sha256`` for the file ``path`` (or for ``data``, its known content)."""
    digest = sha256_of(data) if data is not None else sha256_file(path)
    return write_text(checksum_path(path), digest + "\n", what="checksum")


def verify_checksum(path: str | os.PathLike, data: bytes | None = None, *,
                    error: type[GceError] = CheckpointError) -> None:
    """Check ``path`` (or its already-read ``data``) against ``<path>.sha256``.

    A missing or unreadable checksum file is a failed check, like a mismatch: a file that gce
    reads as truth is trusted only if it is exactly what gce wrote. Raises ``error`` naming the file.
    """
    sidecar = checksum_path(path)
    try:
        expected = sidecar.read_text(encoding="ascii").split()[0] if sidecar.exists() else None
    except (OSError, UnicodeDecodeError, IndexError):
        expected = ""
    if expected is None:
        raise error(f"{path}: no checksum file {sidecar.name} beside it, so it cannot be verified")
    actual = sha256_of(data) if data is not None else sha256_file(path)
    if actual != expected:
        raise error(f"{path}: checksum mismatch with {sidecar.name} (file is damaged or half-written)")
