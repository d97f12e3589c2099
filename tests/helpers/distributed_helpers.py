"""Run a function on N gloo processes on this machine (tests of gce.distributed).

``run_ranks(fn, world, *args)`` starts ``world`` fresh processes (spawn), gives each torchrun's
environment (a free port on 127.0.0.1), joins the process group through
:func:`gce.distributed.init_distributed` and returns ``[fn(ctx, *args) for every rank]``. ``fn``
must be a module-level function (it is imported by name in the children). ``world=1`` runs in
the same way without a process group, for the single-process reference.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from gce.distributed import init_distributed, shutdown_distributed
from helpers.numerics import THREADS


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(rank: int, world: int, port: int, fn: Callable, args: tuple, folder: str) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(THREADS)  # GCE_TEST_THREADS, 1 unless the numerics matrix says otherwise
    try:
        ctx = init_distributed("cpu", timeout_s=60)
        result = ("ok", fn(ctx, *args))
    except BaseException:  # report, so the parent fails with the child's traceback
        result = ("error", traceback.format_exc())
    finally:
        shutdown_distributed()
    torch.save(result, os.path.join(folder, f"rank{rank}.pt"))


def run_ranks(fn: Callable, world: int, *args: Any, timeout_s: float = 300, allow_failure: bool = False) -> list[Any]:
    """Results of ``fn`` on every rank, in rank order; a child's exception fails with its traceback
    (with ``allow_failure``, a failed rank's result is ``None`` instead)."""
    context = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        procs = [context.Process(target=_child, args=(rank, world, port, fn, args, folder)) for rank in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results, errors = [], []
        for rank, p in enumerate(procs):
            path = os.path.join(folder, f"rank{rank}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {rank}: no result (exit code {p.exitcode})")
                results.append(None)
                continue
            status, value = torch.load(path, weights_only=False)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
            results.append(None if status == "error" else value)
    if errors and not allow_failure:
        raise AssertionError("\n".join(errors))
    return results
