"""Run logs: one JSON object per line (easy to plot or grep), mirrored to the chosen trackers."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gce.io import dumps_strict, write_text
from gce.training.trackers import Resume, Tracker, flatten_params


class MetricsLogger:
    """Appends ``{"event": ..., "epoch": ..., ...}`` records to ``metrics.jsonl`` and hands each to
    the ``trackers`` (TensorBoard, MLflow: :mod:`gce.training.trackers`), which mirror it.

    On resume the records of epochs after the checkpoint are dropped first, so a killed and resumed
    run leaves the same file as an uninterrupted one; the trackers then bring their copies in line.
    """

    def __init__(self, folder: str | Path, trackers: Sequence[Tracker] = ()) -> None:
        self.path = Path(folder) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.trackers = list(trackers)
        self.begun = False

    def begin(self, params: Mapping[str, Any], resume: Resume | None) -> None:
        """Open the trackers' runs (once): new ones, or on ``resume`` those the folder's run left;
        ``params`` is the config (nested), logged flattened."""
        if self.begun:
            return
        self.begun = True
        flat = flatten_params(params)
        for tracker in self.trackers:
            tracker.begin(resume)
            tracker.log_params(flat)

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

    def log(self, event: str, epoch: int, values: dict[str, Any]) -> None:
        record = {"event": event, "epoch": epoch, **values}
        with open(self.path, "a") as fh:  # strict JSON: an undefined metric (NaN) is written as null
            fh.write(dumps_strict(record, default=_jsonable) + "\n")
        for tracker in self.trackers:
            tracker.log_metrics(record)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self, finished: bool = False) -> None:
        """``finished``: the run trained its last epoch (the trackers mark their runs so)."""
        for tracker in self.trackers:
            tracker.close(finished)


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
