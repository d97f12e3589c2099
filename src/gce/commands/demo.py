"""``gce demo CONFIG.yaml``: train, then compare with the untrained backbone, with figures."""

from __future__ import annotations

import argparse
from pathlib import Path

from gce.commands.interrupts import report_interrupt
from gce.config.bundled import resolve_config_path
from gce.io import check_output_dir, path_argument


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a config, compare it with its untrained backbone, draw figures")
    p.add_argument("config", help="experiment YAML, or a bundled config's name (gce config list)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--out", type=path_argument, default=Path("runs/demo"), help="folder for the table and PNGs")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gce.config import load_config
    from gce.demo import run_demo
    from gce.training.trainer import TrainingInterrupted

    args.config = resolve_config_path(args.config)
    cfg = load_config(args.config, args.overrides)
    check_output_dir(args.out, what="--out", inputs=[cfg.data.root])  # before training, not after
    try:
        table = run_demo(cfg, args.out, progress=not args.quiet)
    except (TrainingInterrupted, KeyboardInterrupt) as exc:  # the demo resumes its run when rerun
        return report_interrupt(exc, None, ["gce", "demo", args.config, *args.overrides, "--out", args.out])
    print("\nTest split, untrained backbone against the trained model (%):\n" + table)
    for name in ("comparison.md", "retrieval_grid.png", "retrieval_grid_untrained.png", "training_curve.png"):
        print(f"  {args.out / name}")
    print(f"  run folder: {cfg.train.out_dir} (metrics.jsonl, tensorboard/, model.pt)")
    return 0
