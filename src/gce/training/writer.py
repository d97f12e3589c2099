"""Everything a run writes to its folder goes through one :class:`RunWriter`.

The log (``metrics.jsonl``, TensorBoard), the resumable checkpoints (``last.pt``/``prev.pt``), the
model files (``best.pt``, ``model.pt``), ``config.yaml`` and ``final_metrics.json``. A distributed
run gives rank 0 this writer and the other ranks one that writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from gce.config import ExperimentConfig, save_config
from gce.runtime import write_json
from gce.training.checkpoint import LAST, PREVIOUS, load_checkpoint, save_checkpoint, save_model_only
from gce.training.logging import MetricsLogger

__all__ = ["RunWriter"]


class RunWriter:
    """Writes one run folder ``out``."""

    def __init__(self, out: Path, tensorboard: bool = True) -> None:
        self.out = out
        self.logger = MetricsLogger(out, tensorboard=tensorboard)

    def holds_checkpoint(self) -> bool:
        return (self.out / LAST).exists() or (self.out / PREVIOUS).exists()

    def kept_checkpoint(self) -> str:
        """Where the last good checkpoint is, for error messages."""
        if self.holds_checkpoint():
            return f"The last good checkpoint is kept in {self.out} (last.pt)"
        return "No checkpoint had been written yet"

    def start_fresh(self, cfg: ExperimentConfig) -> None:
        # No checkpoint here: records left by a run killed before its first checkpoint would
        # otherwise precede this run's in the log.
        self.logger.clear()
        save_config(cfg, self.out / "config.yaml")

    def log(self, event: str, epoch: int, values: dict[str, Any]) -> None:
        self.logger.log(event, epoch, values)

    def truncate_log(self, epoch: int, keep_at_epoch: tuple[str, ...] = ()) -> None:
        self.logger.truncate_after(epoch, keep_at_epoch=keep_at_epoch)

    def save_checkpoint(self, state: dict[str, Any]) -> Path:
        return save_checkpoint(state, self.out)

    def load_checkpoint(self, warn: Callable[[str], None]) -> tuple[dict[str, Any], Path]:
        return load_checkpoint(self.out, warn=warn)

    def save_model(self, model: nn.Module, cfg: ExperimentConfig, name: str) -> Path:
        path = self.out / name
        save_model_only(model, cfg, path)
        return path

    def write_metrics(self, name: str, values: dict[str, Any]) -> None:
        write_json(self.out / name, values)

    def close(self) -> None:
        self.logger.close()
