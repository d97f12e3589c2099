"""Small run-time helpers shared by the commands: devices, seeding, output folders, JSON files."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gce.errors import ConfigError, GceError

__all__ = ["check_writable", "flush_denormals", "resolve_device", "seed_everything", "write_json"]


def check_writable(folder: Path) -> None:
    """Fail before any work if the run folder cannot be created or written (or the disk is full)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"  # one per process: N ranks probe at once
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


def flush_denormals(device: torch.device) -> None:
    """On CPU, treat subnormal floats (|x| < 1.2e-38) as zero in this process's kernels.

    x86 CPUs handle subnormal operands in microcode, 10-150x slower than normal ones (measured here:
    a 3x3 convolution on subnormal inputs 150x slower). Values that small never matter to an
    embedding, so flushing them changes no result beyond them and keeps a step's time independent of
    where tiny values appear (docs/scale.md, benchmarks/head_step_ratio.py). GPUs run with their
    own settings; nothing changes there.
    """
    if device.type == "cpu":
        torch.set_flush_denormal(True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def write_json(path: Path, values: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(values, indent=2) + "\n")
    os.replace(tmp, path)
