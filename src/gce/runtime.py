"""Small run-time helpers shared by the commands: devices, seeding, output folders, JSON files."""

from __future__ import annotations

import random
import signal
from pathlib import Path

import numpy as np
import torch

from gce.errors import ConfigError

__all__ = [
    "flush_denormals",
    "loader_worker_ignores_sigterm",
    "resolve_device",
    "seed_everything",
    "set_flush_denormal_in_openmp_workers",
]


def resolve_device(name: str, key: str) -> torch.device:
    """``torch.device(name)``, or a one-line ConfigError naming ``key`` if it is malformed or absent here."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"bad value for '{key}': {name!r} is not a torch device (cpu, cuda, cuda:1, mps ...)"
        ) from None
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
    """On CPU, treat subnormal floats (|x| < 1.2e-38) as zero in every thread of torch's kernels.

    x86 CPUs handle subnormal operands in microcode: a 3x3 convolution on subnormal inputs runs
    ~45-150x slower here. A randomly initialised trunk with frozen BatchNorm (``model.pretrained:
    false``) produces features near 1e-10 whose products underflow into that range. Values that
    small never matter to an embedding. ``torch.set_flush_denormal`` only sets the calling
    thread's MXCSR register, and torch's OpenMP workers keep theirs, so it is also run once inside
    each worker of the pool (call this after ``torch.set_num_threads``). GPUs: nothing changes.
    """
    if device.type != "cpu":
        return
    torch.set_flush_denormal(True)
    set_flush_denormal_in_openmp_workers(True)


def set_flush_denormal_in_openmp_workers(on: bool) -> None:
    """Run ``torch.set_flush_denormal(on)`` on every thread of torch's OpenMP pool (libgomp)."""
    import ctypes

    library = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    if torch.get_num_threads() <= 1 or not library.exists():
        return
    try:
        gomp = ctypes.CDLL(str(library))
        body_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
        gomp.GOMP_parallel.argtypes = [body_type, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    except (OSError, AttributeError):  # another OpenMP runtime: the main thread is flushed at least
        return

    @body_type
    def body(_: int | None) -> None:
        torch.set_flush_denormal(on)

    gomp.GOMP_parallel(body, None, 0, 0)


def loader_worker_ignores_sigterm(worker_id: int) -> None:  # worker_id: worker_init_fn signature
    """``worker_init_fn`` of the trainer's loaders: a SIGTERM to the whole process group (a
    scheduler's preemption, ``kill -TERM -PGID``) must reach only the trainer, which finishes its
    step and writes a checkpoint; a worker killed by it makes the DataLoader raise inside that step.
    The workers still end with the trainer (they watch their parent)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 - seeds the global RNG that third-party code draws from
    torch.manual_seed(seed)
