"""``gce embed --nproc N`` and ``torchrun -m gce embed``: one embedding job on N processes.

``--nproc N`` runs training's launcher (:func:`gce.distributed.launch.launch_local`, torch's
elastic launcher in this process): it checks the process count against the machine as ``gce
train --nproc`` does, opens the store (a new one, or a resumed one with its finished shards
verified: every user mistake is one line here, once), then starts N copies of the same ``gce
embed`` command. Under torchrun (``WORLD_SIZE`` in the environment) each copy joins the process
group (gloo on cpu; NCCL on cuda, one GPU per process: ``cuda:LOCAL_RANK``) and embeds its share
(:func:`gce.retrieval.embed_to_store` with the context).
"""

from __future__ import annotations

import argparse
import atexit
from typing import TYPE_CHECKING

from gce.errors import ConfigError

if TYPE_CHECKING:
    from gce.distributed import DistContext

__all__ = ["check_launch", "join_job", "launch", "worker_command"]

#: Options of the launcher only: the workers get the command without them (the launcher has
#: already started over when --overwrite was given; a worker must not again).
_LAUNCHER_ONLY = ("--nproc", "--oversubscribe", "--overwrite")


def worker_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """``embed ...`` with the options ``args`` holds (as parsed), less the launcher's own."""
    argv = ["embed"]
    for action in parser._actions:  # every option this parser has, whoever added it
        if not action.option_strings or action.dest == argparse.SUPPRESS or action.dest == "help":
            continue
        option = max(action.option_strings, key=len)
        value = getattr(args, action.dest, None)
        if option in _LAUNCHER_ONLY or value is None:
            continue
        if action.nargs == 0:  # a flag (store_true, store_false): given when not at its default
            argv += [option] if value != action.default else []
        elif isinstance(value, list | tuple):
            argv += [option, *map(str, value)]
        else:
            argv += [option, str(value)]
    return argv


def check_launch(args: argparse.Namespace) -> None:
    """Before anything is read: the process options make sense and fit this machine."""
    if args.oversubscribe and args.nproc is None:  # it would do nothing: say so rather than ignore it
        raise ConfigError("--oversubscribe applies to the processes --nproc N starts; add --nproc N")
    if args.nproc is not None:
        from gce.distributed.run_start import check_local_capacity

        check_local_capacity(args.device, args.nproc, oversubscribe=args.oversubscribe, key="--device")


def join_job(args: argparse.Namespace) -> DistContext:
    """This process's place in the job: torchrun's process group when started by it (left when the
    process exits), else one process (also ``--nproc``'s launcher, which embeds nothing itself)."""
    from gce.distributed import SINGLE, init_distributed, shutdown_distributed

    if args.nproc is not None:
        return SINGLE
    ctx = init_distributed(args.device, args.dist_timeout, key="--device", timeout_key="--dist-timeout")
    if ctx.enabled:
        atexit.register(shutdown_distributed)
    return ctx


def launch(args: argparse.Namespace, argv: list[str], shards: int) -> int:
    """Run ``argv`` on ``args.nproc`` processes, ``shards`` shards being left to embed in the store
    (opened by the caller: its one-line errors once); 0, 130 after Ctrl-C, or one line naming the
    failed processes."""
    from gce.distributed.launch import launch_local

    if shards < args.nproc:
        print(
            f"gce: note: {shards} shard(s) left to embed for {args.nproc} processes: "
            f"{args.nproc - shards} will wait (a smaller --shard-size spreads the work)"
        )
    return launch_local(argv, args.nproc)
