"""``gce weights install|status``: offline ImageNet weights in the torch hub cache."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="install or list offline ImageNet weights")
    p.add_argument("action", choices=["install", "status"])
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gce.weights import install_offline_weights, weights_status

    if args.action == "install":
        for path in install_offline_weights():
            print(f"available: {path}")
    status = weights_status()
    width = max(map(len, status))
    for name, present in status.items():
        print(f"{name:{width}s} {'pretrained weights cached' if present else 'no weights (random init only)'}")
    return 0
