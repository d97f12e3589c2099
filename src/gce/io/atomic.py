"""Atomic writes: every file gce writes goes to a temporary file in the same folder, is fsynced,
then renamed over the target, so a crash never leaves a half-written file.

A symlink is followed (its target is replaced, the link stays). A character device
(``/dev/null``, ``/dev/stdout``, a terminal) is written into, as any Unix tool would; a directory,
FIFO, socket or block device is refused, never replaced. For writers that need a file name
(``faiss.write_index``, ``torch.save``)::

    with atomic_path(out) as tmp:
        faiss.write_index(index, str(tmp))
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from gce.io.paths import OutputError, unreplaceable_kind, user_path
from gce.io.processes import pid_alive
from gce.io.strict_json import dumps_strict

__all__ = [
    "atomic_path",
    "fsync_dir",
    "fsync_file",
    "remove_stale_temporaries",
    "replace_file",
    "write_bytes",
    "write_json",
    "write_text",
]


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


def fsync_file(path: Path) -> None:
    """Flush the file ``path`` to disk (before it is renamed over its target)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
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
    kind = unreplaceable_kind(mode)
    if kind is not None:
        raise OutputError(f"{what} {path} is {kind}, not a file; it was not replaced")


def remove_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.tmp-<pid>`` files of ``path`` left by killed writers (their pid is gone)."""
    prefix = f".{path.name}.tmp-"
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        pid = name[len(prefix) :] if name.startswith(prefix) else ""
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
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_file(tmp)
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
        fsync_file(tmp)
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


def write_json(path: str | os.PathLike, values: Any, *, what: str = "output") -> Path:
    """Write ``values`` as strict, indented JSON (NaN/inf as ``null``) atomically."""
    return write_text(path, dumps_strict(values, indent=2) + "\n", what=what)
