"""``gce ablate ABLATION.yaml``: compare strategies under identical settings over several seeds."""

from __future__ import annotations

import argparse

from gce.commands.interrupts import report_interrupt
from gce.config.bundled import resolve_config_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablate",
        help="run an ablation (variants x seeds) and summarise it",
        description="Runs every unfinished (variant, seed) of ABLATION.yaml, then writes "
        "summary.md and PNG plots in its out_dir. Re-running skips finished runs.",
    )
    p.add_argument(
        "ablation", help="ablation YAML (base config, seeds, variants), or a bundled name (ablation/emoji_strategies)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    p.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gce.ablation import run_ablation
    from gce.training.trainer import TrainingInterrupted

    args.ablation = resolve_config_path(args.ablation)
    try:
        summary = run_ablation(args.ablation, args.overrides, only=args.only, progress=not args.quiet)
    except (TrainingInterrupted, KeyboardInterrupt) as exc:  # finished runs are kept; the rerun skips them
        only = ["--only", *args.only] if args.only else []
        return report_interrupt(exc, None, ["gce", "ablate", args.ablation, *args.overrides, *only])
    print(summary.read_text())
    print(f"summary: {summary}; plots: {summary.parent}/recall_at_1.png, {summary.parent}/classes_per_learner.png")
    return 0
