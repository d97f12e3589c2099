"""Signal a whole ``gce train`` process group once epoch 1 has started, as a terminal or scheduler would."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest


def signal_group_in_epoch_1(process: subprocess.Popen, sig: signal.Signals, timeout_s: float) -> tuple[str, str]:
    """Wait for epoch 1's meta-class refresh, send ``sig`` to the process group 1 s into the epoch,
    and return the rest of ``(stdout, stderr)``; the group is killed if it outlives ``timeout_s``.
    ``process`` must be started with ``start_new_session=True`` and text pipes."""
    try:
        for line in process.stdout:
            if line.startswith("epoch 1: meta-classes updated"):
                break
        else:
            pytest.fail(f"the run ended before epoch 1: {process.communicate()[1][-3000:]}")
        time.sleep(1.0)
        os.killpg(process.pid, sig)
        return process.communicate(timeout=timeout_s)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
