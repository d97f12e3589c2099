"""Small run-time helpers shared by the commands: devices, seeding, output folders, JSON files."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gce import outputs
from gce.errors import ConfigError, GceError
from gce.outputs import check_output_dir

__all__ = ["check_writable", "pid_alive", "resolve_device", "seed_everything", "write_json"]


def check_writable(folder: Path, what: str = "output folder") -> None:
    """Fail before any work if the run folder cannot be created or written (or the disk is full).

    The path itself is checked by :func:`gce.outputs.check_output_dir` (a file, a FIFO, below a
    file, read-only: one line naming ``what``); then a 1 MiB probe catches a full disk.
    """
    check_output_dir(folder, what=what)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-probe"
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 1024 * 1024)  # a full disk fails here rather than at the first checkpoint
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        raise GceError(f"output folder {folder} is not writable: {exc.strerror or exc}") from None


def resolve_device(name: str, key: str) -> torch.device:
    """``torch.device(name)``, or a one-line ConfigError naming ``key`` if it is malformed or absent here."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"bad value for '{key}': {name!r} is not a torch device (cpu, cuda, cuda:1, mps ...)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key}={name}, but no CUDA GPU is available here; use cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{key}={name}, but only {count} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}={name}, but MPS is not available here; use cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def write_json(path: Path, values: dict[str, Any]) -> None:
    """Strict JSON (NaN as null), written atomically: see :func:`gce.outputs.write_json`."""
    outputs.write_json(path, values)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (also when another user owns it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours (EPERM)
        return True
    return True
