"""Train from a config in this Python process: the library's counterpart of ``gce train``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gce.config import ExperimentConfig
    from gce.evaluation import EvalResult

__all__ = ["train"]


def train(
    cfg: ExperimentConfig, *, resume: bool = False, progress: bool = True, log: Callable[[str], None] = print
) -> EvalResult:
    """Train ``cfg`` in this process (``train.out_dir`` gets the run folder) and return the final test metrics.

    Under ``torchrun`` each process joins the process group, exactly as ``gce train`` does;
    ``resume=True`` continues the run in ``train.out_dir`` from its last checkpoint. The run
    folder is locked for the call: another live training there is a ``LockedError`` naming its pid.
    """
    from gce.distributed import distributed_errors, init_distributed, shutdown_distributed
    from gce.distributed.run_start import hold_run_folder_of_job
    from gce.distributed.training import build_run

    ctx = init_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    try:
        with distributed_errors(ctx), hold_run_folder_of_job(ctx, Path(cfg.train.out_dir)):
            return build_run(cfg, ctx, resume=resume, progress=progress, log=log).run()
    finally:
        shutdown_distributed()
