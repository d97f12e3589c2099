"""``gce train CONFIG.yaml [key=value ...] [--resume] [--nproc N]``.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process runs this command and
joins the process group; ``--nproc N`` starts N such processes on this machine.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from gce.commands.interrupts import report_interrupt
from gce.config.bundled import resolve_config_path


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
        type=int,
        metavar="N",
        help="train with N processes on this machine (torchrun; one per GPU with train.device=cuda)",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="R",
        help="with --nproc: restart failed workers up to R times, from the last checkpoint",
    )
    p.set_defaults(run=run)


def _command(args: argparse.Namespace, *extra: str) -> list[str]:
    return ["train", args.config, *args.overrides, *(["--quiet"] if args.quiet else []), *extra]


def _one_machine(world_size: int) -> bool:
    return os.environ.get("LOCAL_WORLD_SIZE", str(world_size)) == str(world_size)


def run(args: argparse.Namespace) -> int:
    from gce.config import load_config
    from gce.distributed import distributed_errors, init_distributed, shutdown_distributed
    from gce.distributed.launch import launch_local, restarted_by_launcher

    args.config = resolve_config_path(args.config)
    if args.nproc is not None:
        load_config(args.config, args.overrides)  # a bad key fails here, once, before any process starts
        return launch_local(_command(args, *(["--resume"] if args.resume else [])), args.nproc, args.max_restarts)
    cfg = load_config(args.config, args.overrides)
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
