"""A torchrun worker that runs ``gce ARGS...`` and, in the launcher's first attempt only, dies on
rank 1 after KILL_AFTER training steps (``os._exit``: like SIGKILL, no clean-up, no checkpoint),
leaving the file MARKER behind as evidence.

    python -m torch.distributed.run ... tests/helpers/faulty_worker.py KILL_AFTER MARKER train CONFIG ...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from gce.cli import main
from gce.distributed.training import DistributedTrainer


def die_after(steps: int, marker: Path) -> None:
    step, count = DistributedTrainer._step, [0]

    def step_then_die(self, *args):
        count[0] += 1
        if count[0] > steps:
            marker.touch()
            os._exit(9)
        return step(self, *args)

    DistributedTrainer._step = step_then_die  # type: ignore[method-assign]


if __name__ == "__main__":
    if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ.get("RANK") == "1":
        die_after(int(sys.argv[1]), Path(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
