"""Process-group set-up from torchrun's environment, and the facts every part of a run asks about.

``torchrun --nproc_per_node=N -m gce train ...`` (or ``gce train ... --nproc N``) starts N copies
of the command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
set. :func:`init_distributed` reads them: with ``WORLD_SIZE`` > 1 it joins the process group
(NCCL when the run's device is CUDA, with each process on its local rank's GPU; gloo on CPU),
otherwise it returns the single-process context and touches nothing.

Every collective has a timeout (``train.dist_timeout_s``): a rank that hangs or dies makes the
others fail after that long with :class:`CollectiveTimeout` (one line naming the key) instead of
waiting forever.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from gce.distributed.parent_watch import stop_with_launcher
from gce.errors import ConfigError, GceError
from gce.runtime import resolve_device

__all__ = [
    "SINGLE",
    "CollectiveTimeout",
    "DistContext",
    "broadcast_module",
    "broadcast_object",
    "check_local_processes",
    "distributed_errors",
    "env_world_size",
    "init_distributed",
    "shutdown_distributed",
]

T = TypeVar("T")
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class CollectiveTimeout(GceError):
    """A collective operation did not complete in time: another rank hung or died."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job. ``world_size == 1``: a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = 1800.0
    timeout_key: str = "train.dist_timeout_s"  # the setting that sets timeout_s, named in its error

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and console output."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


SINGLE = DistContext()


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when absent)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise GceError(f"environment variable WORLD_SIZE={raw!r} is not an integer") from None


def _env_int(name: str) -> int:
    raw = os.environ.get(name)
    if raw is None:
        missing = [key for key in _ENV_KEYS if key not in os.environ]
        raise GceError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not; start the job with torchrun "
            f"(torchrun --nproc_per_node=N -m gce train ...) or gce train ... --nproc N"
        )
    try:
        return int(raw)
    except ValueError:
        raise GceError(f"environment variable {name}={raw!r} is not an integer") from None


def check_local_processes(
    device_name: str, processes: int, key: str = "train.device", world_size: int | None = None
) -> torch.device:
    """The device of a job of ``world_size`` processes (default ``processes``), ``processes`` of
    them on this machine, checked: multi-process runs take cpu (gloo) or cuda (NCCL, one GPU per
    process). ``gce train --nproc`` calls it before it starts any process; each worker again."""
    world_size = processes if world_size is None else world_size
    device = resolve_device(device_name, key)
    if world_size <= 1:
        return device
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{key}={device_name}: multi-process runs support cpu (gloo) and cuda (NCCL)")
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(
                f"{key}={device_name} names one GPU; under {world_size} processes use {key}=cuda "
                f"(each process takes its local rank's GPU)"
            )
        count = torch.cuda.device_count()
        if processes > count:
            raise ConfigError(
                f"{key}=cuda: {processes} processes on this machine need a GPU each and {count} are visible; "
                f"start at most {count} processes per machine"
            )
    return device


def _process_device(device_name: str, local_rank: int, world_size: int, key: str) -> torch.device:
    """The device of this process: CUDA runs take the local rank's GPU, one process per GPU."""
    device = check_local_processes(device_name, local_rank + 1, key, world_size=world_size)
    if world_size == 1 or device.type != "cuda":
        return device
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(
    device_name: str = "cpu",
    timeout_s: float = 1800.0,
    key: str = "train.device",
    timeout_key: str = "train.dist_timeout_s",
) -> DistContext:
    """Join the process group torchrun describes in the environment, or return the single context.

    Idempotent: a second call (e.g. evaluation after training in the same process) reuses the group.
    """
    world_size = env_world_size()
    if world_size <= 1:
        return DistContext(device=resolve_device(device_name, key), timeout_s=timeout_s, timeout_key=timeout_key)
    stop_with_launcher()  # a worker whose launcher was killed must not train on alone
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    _env_int("MASTER_PORT")
    device = _process_device(device_name, local_rank, world_size, key)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise GceError(
            f"process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not match "
            f"RANK={rank} WORLD_SIZE={world_size}"
        )
    return DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        timeout_s=timeout_s,
        timeout_key=timeout_key,
    )


def shutdown_distributed() -> None:
    """Leave the process group (a no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text or isinstance(exc, getattr(dist, "DistStoreError", ()))


def _is_peer_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    # "connection was likely closed": the rendezvous store's host (rank 0 under gce's launcher) died.
    peer_gone = ("connection closed by peer", "connection reset", "broken pipe", "socket closed", "no route")
    return any(s in text for s in (*peer_gone, "connection was likely closed"))


@contextmanager
def distributed_errors(ctx: DistContext) -> Iterator[None]:
    """Turn a collective's timeout or a dead peer into one line that names the cause and the key."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        if not ctx.enabled:
            raise
        if _is_timeout(exc):
            raise CollectiveTimeout(
                f"rank {ctx.rank}: a collective operation did not complete within {ctx.timeout_key}="
                f"{ctx.timeout_s:g} s; another rank hung or died (see its output)"
            ) from None
        if _is_peer_failure(exc):
            raise CollectiveTimeout(
                f"rank {ctx.rank}: lost the connection to another rank, which probably died (see its output)"
            ) from None
        raise


def broadcast_module(ctx: DistContext, module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters and buffers, in place (e.g. an unseeded random model)."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=src)


def broadcast_object(ctx: DistContext, value: T | None, src: int = 0) -> T:
    """``value`` of rank ``src`` on every rank (picklable objects; for small things: assignments, metrics)."""
    if not ctx.enabled:
        return value  # type: ignore[return-value]
    box = [value if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]  # type: ignore[return-value]
