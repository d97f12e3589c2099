"""Run logs: one JSON object per line (easy to plot or grep) mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from gce.io import dumps_strict, write_text


class MetricsLogger:
    """Appends ``{"event": ..., "epoch": ..., ...}`` records to ``metrics.jsonl``.

    On resume the records of epochs after the checkpoint are dropped first, so a killed and resumed
    run leaves the same file as an uninterrupted one.
    """

    def __init__(self, folder: str | Path, tensorboard: bool = True) -> None:
        self.path = Path(folder) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tensorboard_dir = Path(folder) / "tensorboard" if tensorboard else None
        self._writer = None

    def _tensorboard(self):
        """The TensorBoard writer, opened at the first record (a logger that never logs, as on
        the ranks other than 0 of a distributed run, leaves no event file)."""
        if self._writer is None and self._tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self._tensorboard_dir))
            except ImportError:  # the 'tensorboard' extra is optional: metrics.jsonl has every record
                warnings.warn(
                    "tensorboard is not installed: metrics go to metrics.jsonl only"
                    " (pip install 'gce-dml[tensorboard]' for TensorBoard event files)",
                    stacklevel=2,
                )
                self._tensorboard_dir = None
        return self._writer

    def truncate_after(self, epoch: int, keep_at_epoch: tuple[str, ...] = ()) -> None:
        """Keep only records of epochs ``< epoch`` (the ones covered by the checkpoint), and those
        of epoch ``epoch`` whose event is in ``keep_at_epoch`` (written before a mid-epoch checkpoint)."""
        if not self.path.exists():
            return
        self._rewrite(
            [
                line
                for line in self.path.read_text().splitlines()
                if line.strip()
                and (_epoch_of(line) < epoch or (_epoch_of(line) == epoch and _event_of(line) in keep_at_epoch))
            ]
        )

    def clear(self) -> None:
        """Drop every record (a fresh run in a folder left by one killed before its first checkpoint)."""
        if self.path.exists():
            self._rewrite([])

    def _rewrite(self, lines: list[str]) -> None:
        # Atomically: a kill during a plain rewrite would leave the log empty or cut.
        write_text(self.path, "".join(line + "\n" for line in lines), what="metrics log")

    def log(self, event: str, epoch: int, values: dict[str, Any], step: int | None = None) -> None:
        record = {"event": event, "epoch": epoch, **values}
        with open(self.path, "a") as fh:  # strict JSON: an undefined metric (NaN) is written as null
            fh.write(dumps_strict(record, default=_jsonable) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    writer.add_scalar(f"{event}/{key}", value, step if step is not None else epoch)
            writer.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _epoch_of(line: str) -> int:
    try:
        return int(json.loads(line).get("epoch", -1))
    except (ValueError, TypeError):
        return 1 << 30  # an unparsable (half-written) line is dropped


def _event_of(line: str) -> str | None:
    try:
        return json.loads(line).get("event")
    except (ValueError, AttributeError):
        return None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
