"""``gce train CONFIG.yaml [key=value ...] [--resume]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from gce.config import load_config
from gce.commands.interrupts import report_interrupt
from gce.training.trainer import Trainer, TrainingInterrupted


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an embedding model from a YAML config",
                       description="Train from CONFIG.yaml; key=value arguments override config keys "
                                   "(e.g. train.epochs=5 model.num_learners=4).")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    command = ["gce", "train", args.config, *args.overrides, "--resume"]
    try:
        trainer = Trainer.from_config(cfg, resume=args.resume, progress=not args.quiet)
        result = trainer.run()
    except (TrainingInterrupted, KeyboardInterrupt) as exc:  # also Ctrl-C during start-up
        return report_interrupt(exc, Path(cfg.train.out_dir), command)
    print(f"final test metrics ({cfg.train.out_dir}/final_metrics.json):")
    print(result.format_table())
    return 0
