"""The ``gce`` command. Errors caused by input, data or configuration print one line, exit 1."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from gce import __version__
from gce.errors import GceError


def build_parser() -> argparse.ArgumentParser:
    from gce.commands import ablate, config, data, demo, embed, export, index, model, search, serve, train, weights
    from gce.commands import eval as eval_cmd

    parser = argparse.ArgumentParser(prog="gce", description="Deep metric learning with Group Channel-wise Ensembles")
    parser.add_argument("--version", action="version", version=f"gce {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train, eval_cmd, ablate, demo, config, data, weights, export, embed, index, search, serve, model):
        module.add_parser(sub)
    return parser


def subcommand_names() -> list[str]:
    """The sub-commands of ``gce``, in the order ``gce --help`` lists them."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(subparsers.choices)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings from the command line read like its errors: one line, no source excerpt."""
    return f"gce: warning: {message}\n"


# Set when Ctrl-C lands during the imports. CPython marks a KeyboardInterrupt raised inside code an
# extension runs with PyRun_String (torch's import does) as unhandled even when it is caught, and
# then kills itself with SIGINT at exit (status -2 instead of 130, seen 1 run in 6 here); ``entry``
# then exits at once instead. The sub-commands import torch when they run, so a Ctrl-C that leaves
# a command as a KeyboardInterrupt sets it too (the commands that train handle their own Ctrl-C).
interrupted_while_starting = False


#: 128 + SIGPIPE: what a shell reports for a tool that a closed pipe stopped.
EXIT_BROKEN_PIPE = 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush meets no closed pipe either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    global interrupted_while_starting
    try:
        parser = build_parser()
    except KeyboardInterrupt:
        print("gce: aborted", file=sys.stderr)
        interrupted_while_starting = True
        return 130
    # parse_known_args lets `key=value` overrides follow options (gce train c.yaml --resume a.b=1).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "command", None) in ("train", "ablate", "demo") and all(
            "=" in e and not e.startswith("-") for e in extra
        ):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.run(args) or 0)
    except GceError as exc:
        print(f"gce: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # e.g. during the command's imports of torch (seconds)
        print("gce: aborted", file=sys.stderr)
        interrupted_while_starting = True
        return 130
    except BrokenPipeError:  # `gce ... | head`: the reader left; stop quietly, as Unix tools do
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def entry() -> None:
    """The ``gce`` command and ``python -m gce``: ``main()``'s status as the exit status."""
    code = main()
    if interrupted_while_starting:  # see above: exit before CPython can re-raise the SIGINT
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    entry()
