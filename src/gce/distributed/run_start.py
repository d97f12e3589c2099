"""Before a run's processes start: what the launcher checks, and who holds the run folder.

Each worker imports torch and builds the run (hundreds of MB each), so a mistake found by the
workers costs N start-ups and N copies of the error, and an unbounded ``--nproc`` can take the
machine's memory first. ``gce train --nproc N`` checks in the launcher, as one line, all that can
be known there: the process count against the machine (CPU cores, or GPUs with
``train.device=cuda``), the device, the split of the global batch (:func:`check_process_count`),
the run folder (``--resume`` needs a checkpoint, a fresh run none) and the data's listing (root,
classes for the sampler; :func:`check_run_start`). Decoding the images (``data.verify_images``)
is left to the workers.

One training per run folder (:mod:`gce.training.run_folder`): the launcher holds the lock for
its workers; under ``torchrun`` rank 0 holds it (:func:`hold_run_folder_of_job`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from gce.config import ExperimentConfig
from gce.data.run_data import prepare_data
from gce.distributed.context import DistContext, broadcast_object, check_local_processes
from gce.distributed.launch import check_not_in_a_job
from gce.distributed.training import check_distributable
from gce.errors import ConfigError, GceError
from gce.io import check_run_folder
from gce.training.parts import check_sampler_feasible
from gce.training.run_folder import hold_run_folder, prepare_run_folder

__all__ = ["check_local_capacity", "check_process_count", "check_run_start", "hold_run_folder_of_job", "usable_cpus"]


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask: a container's, taskset's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_local_capacity(
    device_name: str, nproc: int, *, oversubscribe: bool = False, key: str = "train.device"
) -> None:
    """``--nproc`` against this machine (any command that starts processes): not inside a job, at
    most one process per GPU on cuda, per CPU core on cpu unless ``oversubscribe``."""
    check_not_in_a_job()
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    device = check_local_processes(device_name, nproc, key)  # cuda: at most one process per GPU
    cpus = usable_cpus()
    if device.type == "cpu" and nproc > cpus and not oversubscribe:
        raise ConfigError(
            f"--nproc {nproc} is more than the {cpus} CPU cores this process may use (each process holds "
            f"its own copy of the model and data); use --nproc {cpus} or fewer, or add --oversubscribe"
        )


def check_process_count(cfg: ExperimentConfig, nproc: int, *, oversubscribe: bool = False) -> None:
    """``--nproc`` against the machine and the config, before any process or file is touched."""
    check_local_capacity(cfg.train.device, nproc, oversubscribe=oversubscribe)
    check_distributable(cfg, nproc)


def check_run_start(cfg: ExperimentConfig, resume: bool) -> None:
    """The run folder and the data's listing, as the workers will find them (under the run lock)."""
    prepare_run_folder(cfg, resume)
    listed = cfg.model_copy(update={"data": cfg.data.model_copy(update={"verify_images": False})})
    check_sampler_feasible(cfg, prepare_data(listed, progress=False).train)


@contextmanager
def hold_run_folder_of_job(ctx: DistContext, out: Path) -> Iterator[None]:
    """Hold the run folder's lock for the block: rank 0 holds it for the job (a no-op when its
    ``gce train --nproc`` launcher does); when it cannot, every rank fails with rank 0's line
    instead of waiting for it in a collective."""
    with ExitStack() as stack:
        refusal: str | None = None
        if ctx.is_main:
            try:
                check_run_folder(out)  # a path that cannot hold the lock file: its own one line
                stack.enter_context(hold_run_folder(out))
            except GceError as exc:
                if not ctx.enabled:
                    raise
                refusal = str(exc)
        refusal = broadcast_object(ctx, refusal)
        if refusal is not None:
            raise GceError(refusal)
        yield
