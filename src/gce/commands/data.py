"""``gce data emoji --out DIR``: build the cross-vendor emoji benchmark from npm packages."""

from __future__ import annotations

import argparse

from gce.config.vocabulary import EMOJI_PACKAGES
from gce.io import check_output_dir, path_argument

VENDORS = tuple(EMOJI_PACKAGES)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build datasets that can be made offline")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    e = data_sub.add_parser("emoji", help="cross-vendor emoji dataset (classes = emoji, samples = vendors)")
    e.add_argument("--out", type=path_argument, required=True, help="output folder")
    e.add_argument("--vendors", nargs="+", choices=list(VENDORS), default=list(VENDORS))
    e.add_argument("--cache", type=path_argument, help="npm cache folder (default: OUT/../.npm-cache)")
    e.add_argument("--min-vendors", type=int, default=4)
    e.add_argument("--size", type=int, default=64)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(run=run_emoji)


def run_emoji(args: argparse.Namespace) -> int:
    from gce.data.emoji import build_emoji_dataset

    check_output_dir(args.out, what="--out")  # before any download or conversion
    out = build_emoji_dataset(
        args.out,
        vendors=tuple(args.vendors),
        cache_dir=args.cache,
        min_vendors=args.min_vendors,
        size=args.size,
        progress=not args.quiet,
    )
    print(f"emoji dataset ready in {out}")
    return 0
