"""The ``gce`` command. Errors caused by input, data or configuration print one line, exit 1."""

from __future__ import annotations

import argparse
import sys
import warnings

from gce import __version__
from gce.errors import GceError


def build_parser() -> argparse.ArgumentParser:
    from gce.commands import ablate, data, demo, embed, eval as eval_cmd, export, index, search, serve, train, weights

    parser = argparse.ArgumentParser(prog="gce", description="Deep metric learning with Group Channel-wise Ensembles")
    parser.add_argument("--version", action="version", version=f"gce {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train, eval_cmd, ablate, demo, data, weights, export, embed, index, search, serve):
        module.add_parser(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ARG001
    """Warnings from the command line read like its errors: one line, no source excerpt."""
    return f"gce: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    try:
        parser = build_parser()  # imports torch: seconds in which a Ctrl-C must not print a traceback
    except KeyboardInterrupt:
        print("gce: aborted", file=sys.stderr)
        return 130
    # parse_known_args lets `key=value` overrides follow options (gce train c.yaml --resume a.b=1).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "command", None) in ("train", "ablate", "demo") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.run(args) or 0)
    except GceError as exc:
        print(f"gce: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gce: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
