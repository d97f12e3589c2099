"""Everything a run writes to its folder goes through one :class:`RunWriter`.

The log (``metrics.jsonl``, mirrored to the ``train.trackers``: TensorBoard, MLflow), the resumable
checkpoints (``last.pt``/``prev.pt``), the model files (``best.pt``, ``model.pt``), ``config.yaml``
and ``final_metrics.json``. A distributed run gives rank 0 this writer and the other ranks one that
writes nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from gce.config import ExperimentConfig, save_config
from gce.io import OutputError, write_json
from gce.training.checkpoint import LAST, PREVIOUS, load_checkpoint, save_checkpoint, save_model_only
from gce.training.logging import MetricsLogger
from gce.training.trackers import Resume, build_trackers

__all__ = ["RunWriter", "check_fresh_folder"]

#: Files a run writes at its start; a fresh run replaces them only if a gce run wrote them.
_RUN_FILES = ("config.yaml", "metrics.jsonl")


def _written_by_gce(path: Path) -> bool:
    """Whether ``path`` (config.yaml or metrics.jsonl) looks like what a gce run writes there."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if path.name == "config.yaml":
        try:
            tree = yaml.safe_load(text)
        except yaml.YAMLError:
            return False
        return isinstance(tree, dict) and {"data", "model", "train"} <= set(tree)
    for line in text.splitlines():
        try:
            if line.strip() and "event" not in json.loads(line):
                return False
        except (ValueError, TypeError):
            continue  # a line cut by a kill mid-write: a run's log all the same
    return True


def check_fresh_folder(out: Path) -> None:
    """Before a fresh run (no --resume) replaces ``config.yaml`` and ``metrics.jsonl`` in ``out``:
    refuse if either is there but was not written by a gce run (a folder of the user's own files)."""
    for name in _RUN_FILES:
        path = out / name
        if os.path.lexists(path) and (not path.is_file() or not _written_by_gce(path)):
            raise OutputError(
                f"train.out_dir {out} holds a {name} that no gce run wrote; a new run would"
                f" replace it: choose another train.out_dir"
            )


class RunWriter:
    """Writes one run folder ``out``; ``cfg`` chooses the trackers (none without it)."""

    def __init__(self, out: Path, cfg: ExperimentConfig | None = None) -> None:
        self.out, self.cfg = out, cfg
        self.logger = MetricsLogger(out, build_trackers(cfg, out) if cfg is not None else ())
        #: The checkpoint this process last wrote or loaded (verified): the only one an error
        #: message may call good.
        self.verified: Path | None = None

    def holds_checkpoint(self) -> bool:
        return (self.out / LAST).exists() or (self.out / PREVIOUS).exists()

    def kept_checkpoint(self) -> str:
        """Where the last good checkpoint is, for error messages: only one this process wrote or
        loaded (and so verified) is called good."""
        if self.verified is not None:
            return f"The last good checkpoint is kept: {self.verified}"
        if self.holds_checkpoint():
            return f"No checkpoint was written or loaded by this attempt ({self.out} holds unverified ones)"
        return "No checkpoint had been written yet"

    def record_config(self, cfg: ExperimentConfig) -> None:
        """``config.yaml`` describes the run as it continues (a resume may change epochs, device ...)."""
        save_config(cfg, self.out / "config.yaml")

    def start_fresh(self, cfg: ExperimentConfig) -> None:
        # No checkpoint here: records left by a run killed before its first checkpoint would
        # otherwise precede this run's in the log.
        self.logger.clear()
        save_config(cfg, self.out / "config.yaml")
        self.logger.begin(cfg.to_dict(), resume=None)

    def log(self, event: str, epoch: int, values: dict[str, Any]) -> None:
        self.logger.log(event, epoch, values)

    def truncate_log(self, epoch: int, keep_at_epoch: tuple[str, ...] = ()) -> None:
        """On resume: keep the log the checkpoint covers, then continue the trackers' runs from it."""
        self.logger.truncate_after(epoch, keep_at_epoch=keep_at_epoch)
        if self.cfg is not None:
            self.logger.begin(self.cfg.to_dict(), resume=Resume(epoch, self.logger.read()))

    def save_checkpoint(self, state: dict[str, Any]) -> Path:
        self.verified = save_checkpoint(state, self.out)
        return self.verified

    def load_checkpoint(self, warn: Callable[[str], None]) -> tuple[dict[str, Any], Path]:
        state, path = load_checkpoint(self.out, warn=warn)
        self.verified = path
        return state, path

    def save_model(self, model: nn.Module, cfg: ExperimentConfig, name: str) -> Path:
        path = self.out / name
        save_model_only(model, cfg, path)
        return path

    def write_metrics(self, name: str, values: dict[str, Any]) -> None:
        write_json(self.out / name, values)

    def close(self) -> None:
        finished = False
        if self.logger.begun and self.cfg is not None:
            # The log holds the last epoch's train record (by this attempt or an earlier one).
            last = self.cfg.train.epochs + self.cfg.train.finetune_epochs - 1
            finished = any(r.get("event") == "train" and r.get("epoch") == last for r in self.logger.read())
        self.logger.close(finished)
