"""``gce train CONFIG --nproc N``: start the same command as N processes on this machine.

It runs ``python -m torch.distributed.run --standalone --nproc-per-node N [--max-restarts R] -m gce
train CONFIG ...`` (torch's elastic launcher, the module behind ``torchrun``; ``--standalone``
picks a free local port). Several machines: call ``torchrun`` directly, see docs/scale.md.
A worker restarted by ``--max-restarts`` continues from the run's last checkpoint on its own
(:func:`restarted_by_launcher`).
"""

from __future__ import annotations

import os
import subprocess
import sys

from gce.errors import ConfigError, GceError

__all__ = ["launch_local", "restarted_by_launcher", "torchrun_command"]


def torchrun_command(gce_args: list[str], nproc: int, max_restarts: int = 0) -> list[str]:
    """The launcher command line that runs ``gce <gce_args>`` as ``nproc`` local processes."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    if max_restarts < 0:
        raise ConfigError(f"--max-restarts must be at least 0, got {max_restarts}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "gce", *gce_args]


def launch_local(gce_args: list[str], nproc: int, max_restarts: int = 0) -> int:
    """Run ``gce <gce_args>`` under the launcher; its exit status (non-zero if any worker failed)."""
    if "WORLD_SIZE" in os.environ:
        raise GceError("--nproc inside a torchrun job: the job already has its processes; drop --nproc")
    command = torchrun_command(gce_args, nproc, max_restarts)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:  # the launcher forwards Ctrl-C to the workers and reports itself
        return 130


def restarted_by_launcher() -> bool:
    """True in a worker that torchrun started again after a failure (``--max-restarts``)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False
