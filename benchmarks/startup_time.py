"""Start-up time of the ``gce`` command: ``--help``, ``--version`` and every ``SUBCOMMAND --help``.

Each command is run ``--repeats`` times as a fresh process (the installed ``gce`` script); the table
gives the median and the fastest wall time, and the goal (median under ``--goal`` seconds).

    python benchmarks/startup_time.py [--repeats 5] [--goal 0.5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def wall_time(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--goal", type=float, default=0.5, help="seconds the median must stay under")
    args = parser.parse_args()
    gce = shutil.which("gce") or sys.exit("gce is not on PATH: install the package (make install) first")
    from gce.cli import subcommand_names

    cases = [["--help"], ["--version"], *[[c, "--help"] for c in subcommand_names()]]
    print(f"{'command':<22} {'median s':>9} {'min s':>7}  goal < {args.goal} s")
    slow = 0
    for case in cases:
        times = [wall_time([gce, *case]) for _ in range(args.repeats)]
        median = statistics.median(times)
        slow += median >= args.goal
        print(
            f"{'gce ' + ' '.join(case):<22} {median:>9.3f} {min(times):>7.3f}  {'ok' if median < args.goal else 'SLOW'}"
        )
    print(f"{len(cases) - slow} of {len(cases)} commands start within {args.goal} s (median of {args.repeats})")
    return 1 if slow else 0


if __name__ == "__main__":
    raise SystemExit(main())
