"""``gce train CONFIG.yaml [key=value ...] [--resume] [--nproc N]``.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process runs this command and
joins the process group; ``--nproc N`` starts N such processes on this machine.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from gce.commands.arguments import count
from gce.commands.interrupts import report_interrupt
from gce.config.bundled import resolve_config_path
from gce.errors import ConfigError

if TYPE_CHECKING:
    from gce.config import ExperimentConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train an embedding model from a YAML config",
        description="Train from CONFIG.yaml; key=value arguments override config keys "
        "(e.g. train.epochs=5 model.num_learners=4).",
    )
    p.add_argument("config", help="experiment YAML, or a bundled config's name (gce config list)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--nproc",
        type=count(1),
        metavar="N",
        help="train with N processes on this machine (torchrun; one per GPU with train.device=cuda, "
        "at most one per CPU core on cpu)",
    )
    p.add_argument(
        "--max-restarts",
        type=count(0),
        default=0,
        metavar="R",
        help="with --nproc: restart failed workers up to R times, from the last checkpoint",
    )
    p.add_argument(
        "--oversubscribe",
        action="store_true",
        help="with --nproc on cpu: allow more processes than CPU cores",
    )
    p.set_defaults(run=run)


def _command(args: argparse.Namespace, *extra: str) -> list[str]:
    return ["train", args.config, *args.overrides, *(["--quiet"] if args.quiet else []), *extra]


def _one_machine(world_size: int) -> bool:
    return os.environ.get("LOCAL_WORLD_SIZE", str(world_size)) == str(world_size)


def _launch(args: argparse.Namespace, cfg: ExperimentConfig) -> int:
    """``--nproc N``: everything checked here, once, then the workers start (the lock held for them)."""
    from gce.distributed import SINGLE
    from gce.distributed.launch import launch_local
    from gce.distributed.run_start import check_process_count, check_run_start, hold_run_folder_of_job

    check_process_count(cfg, args.nproc, oversubscribe=args.oversubscribe)
    with hold_run_folder_of_job(SINGLE, Path(cfg.train.out_dir)):
        check_run_start(cfg, args.resume)
        return launch_local(_command(args, *(["--resume"] if args.resume else [])), args.nproc, args.max_restarts)


def run(args: argparse.Namespace) -> int:
    for option, given in (("--max-restarts", args.max_restarts), ("--oversubscribe", args.oversubscribe)):
        if given and args.nproc is None:  # it would do nothing: say so rather than ignore it
            raise ConfigError(f"{option} applies to the processes --nproc N starts; add --nproc N")
    from gce.config import load_config
    from gce.distributed import distributed_errors, init_distributed, shutdown_distributed
    from gce.distributed.launch import restarted_by_launcher
    from gce.distributed.run_start import hold_run_folder_of_job

    args.config = resolve_config_path(args.config)
    cfg = load_config(args.config, args.overrides)  # a bad key fails here, once, before any process starts
    if args.nproc is not None:
        return _launch(args, cfg)
    from gce.distributed.training import build_run
    from gce.training.trainer import EXIT_INTERRUPTED, TrainingInterrupted

    ctx = init_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    out = Path(cfg.train.out_dir)
    # A worker restarted by torchrun --max-restarts continues from the run's last checkpoint.
    resume = args.resume or (restarted_by_launcher() and ((out / "last.pt").exists() or (out / "prev.pt").exists()))
    command = ["gce", "train", args.config, *args.overrides, "--resume"]
    if ctx.world_size > 1:  # one machine: --nproc starts the same; several: the user's torchrun line
        command += (
            [f"--nproc={ctx.world_size}"] if _one_machine(ctx.world_size) else ["(under the same torchrun command)"]
        )
    try:
        with distributed_errors(ctx):
            try:
                with hold_run_folder_of_job(ctx, out):  # one training per run folder, from its first read
                    trainer = build_run(cfg, ctx, resume=resume, progress=not args.quiet)
                    result = trainer.run()
            except (TrainingInterrupted, KeyboardInterrupt) as exc:  # also Ctrl-C during start-up
                return report_interrupt(exc, out, command) if ctx.is_main else EXIT_INTERRUPTED
    finally:
        shutdown_distributed()
    if ctx.is_main:
        print(f"final test metrics ({cfg.train.out_dir}/final_metrics.json):")
        print(result.format_table())
    return 0
