"""``gce config list|show|path``: the configs that ship with gce, the starting point of a pip user."""

from __future__ import annotations

import argparse
import sys

from gce.config.bundled import preset_names, preset_text, presets_folder


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="list, print or locate the bundled configs",
        description="Configs that ship with gce. Start your own with `gce config show emoji > my.yaml`;"
        " every command that takes a CONFIG.yaml also takes a bundled name (gce train emoji).",
    )
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="names of the bundled configs").set_defaults(run=run_list)
    show = actions.add_parser("show", help="print a bundled config's YAML")
    show.add_argument("name", help="e.g. emoji, cub200, ablation/emoji_strategies")
    show.set_defaults(run=run_show)
    actions.add_parser("path", help="the folder that holds them (copy it to keep relative links)").set_defaults(
        run=run_path
    )


def run_list(args: argparse.Namespace) -> int:
    for name in preset_names():
        print(name)
    return 0


def run_show(args: argparse.Namespace) -> int:
    text = preset_text(args.name)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if any(line.startswith(("extends:", "base:")) for line in text.splitlines()):
        print(
            f"gce: note: {args.name} names another config by a relative path; copy the whole folder to keep it:"
            f" cp -r {presets_folder()} my-configs",
            file=sys.stderr,
        )
    return 0


def run_path(args: argparse.Namespace) -> int:
    print(presets_folder())
    return 0
