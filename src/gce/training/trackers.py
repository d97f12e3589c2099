"""Experiment trackers: mirrors of a run's ``metrics.jsonl`` (TensorBoard, MLflow), chosen by ``train.trackers``.

``metrics.jsonl`` is the record of truth; a tracker receives every record written there and the
flattened config. On resume a tracker is handed the log as the checkpoint left it and brings its
own copy in line, so a killed and resumed run mirrors the same epochs once each.
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gce.config import ExperimentConfig
from gce.config.vocabulary import TRACKER_NAMES
from gce.errors import GceError
from gce.extras import require_extra
from gce.io import write_json
from gce.registry import Registry

__all__ = ["TRACKER_REGISTRY", "Resume", "Tracker", "build_trackers", "check_trackers", "flatten_params", "scalars"]

Record = Mapping[str, Any]  # {"event": ..., "epoch": ..., **values}: one line of metrics.jsonl


@dataclass(frozen=True)
class Resume:
    """Where a resumed run starts: ``epoch`` is the first epoch it (re)does; ``records`` is
    ``metrics.jsonl`` as the checkpoint left it (a mid-epoch checkpoint keeps that epoch's
    meta-class record, which is not redone)."""

    epoch: int
    records: list[dict[str, Any]]


class Tracker(Protocol):
    def begin(self, resume: Resume | None) -> None:
        """Open a new tracked run (``None``: a fresh run) or continue the run folder's."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The run's flattened config (``{"train.epochs": 15, ...}``)."""

    def log_metrics(self, record: Record) -> None:
        """One record of ``metrics.jsonl``; its step is its epoch."""

    def close(self, finished: bool) -> None:
        """``finished``: the run trained its last epoch (else it stopped early and may be resumed)."""


TrackerFactory = Callable[[ExperimentConfig, Path], Tracker]
TRACKER_REGISTRY: Registry[TrackerFactory] = Registry("tracker", "train.trackers", TRACKER_NAMES)

#: The extra a tracker cannot run without (a missing one is an error before any work starts).
_REQUIRED_EXTRA = {"mlflow": "mlflow"}


def check_trackers(cfg: ExperimentConfig) -> None:
    """Fail now, in one line naming the pip command, if a chosen tracker's package is missing."""
    for name in cfg.train.trackers:
        TRACKER_REGISTRY[name]  # an unknown name: a ConfigError naming the valid ones
        if name in _REQUIRED_EXTRA:
            require_extra(_REQUIRED_EXTRA[name])


def build_trackers(cfg: ExperimentConfig, folder: Path) -> list[Tracker]:
    """The trackers ``cfg.train.trackers`` names, writing under the run folder ``folder`` (nothing yet)."""
    return [TRACKER_REGISTRY[name](cfg, folder) for name in cfg.train.trackers]


def scalars(record: Record) -> Iterator[tuple[str, float]]:
    """``("event/key", value)`` for each finite number of ``record`` (lists, strings, NaN: skipped)."""
    for key, value in record.items():
        if key in ("event", "epoch"):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield f"{record['event']}/{key}", value


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": "3"}``; lists and null as JSON."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat


@TRACKER_REGISTRY.register("tensorboard")
class TensorBoardTracker:
    """Event files in ``<run>/tensorboard``; without the ``tensorboard`` package, a warning and nothing."""

    def __init__(self, cfg: ExperimentConfig, folder: Path) -> None:
        self.folder: Path | None = folder / "tensorboard"
        self._writer: Any = None
        self._purge_step: int | None = None

    def _open(self) -> Any:
        """The writer, opened at the first record (a run that never logs leaves no event file)."""
        if self._writer is None and self.folder is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard hides what earlier attempts logged at the redone epochs.
                self._writer = SummaryWriter(log_dir=str(self.folder), purge_step=self._purge_step)
            except ImportError:  # the 'tensorboard' extra is optional: metrics.jsonl has every record
                warnings.warn(
                    "tensorboard is not installed: metrics go to metrics.jsonl only"
                    " (pip install 'gce-dml[tensorboard]' for TensorBoard event files)",
                    stacklevel=3,
                )
                self.folder = None
        return self._writer

    def begin(self, resume: Resume | None) -> None:
        if resume is not None:
            self._purge_step = resume.epoch
            for record in resume.records:  # kept records of the redone epoch: the purge hides them
                if int(record.get("epoch", -1)) >= resume.epoch:
                    self.log_metrics(record)

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass  # config.yaml has them; TensorBoard's scalars are the mirror

    def log_metrics(self, record: Record) -> None:
        writer = self._open()
        if writer is not None:
            for tag, value in scalars(record):
                writer.add_scalar(tag, value, int(record["epoch"]))
            writer.flush()

    def close(self, finished: bool) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


#: What the MLflow tracker keeps in the run folder: the run a resume continues.
MLFLOW_RUN_FILE = "mlflow_run.json"
_MLFLOW_NAME = re.compile(r"[^\w\-. :/]")  # the characters MLflow refuses in metric and param names
_BATCH = 100  # MLflow's limit of params per log_batch call (metrics: 1000)


def mlflow_name(key: str) -> str:
    """``test/recall@1`` -> ``test/recall_at_1``: MLflow names allow no ``@``."""
    return _MLFLOW_NAME.sub("_", key.replace("@", "_at_"))


@contextmanager
def _quiet_mlflow() -> Iterator[None]:
    # Deprecations inside mlflow and its database layer are theirs to fix, not the user's to read.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(mlflow|sqlalchemy|alembic)\b")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(mlflow|sqlalchemy|alembic)\b")
        yield


@TRACKER_REGISTRY.register("mlflow")
class MLflowTracker:
    """One MLflow run per gce run: experiment = ``cfg.name``, params = the flattened config,
    metrics ``event/key`` with step = epoch. The store is ``train.mlflow_uri``, by default a local
    SQLite file in the run folder (offline). A resume continues the run named in ``mlflow_run.json``
    and logs each (metric, epoch) once: the values an earlier attempt logged for a redone epoch stay.
    """

    def __init__(self, cfg: ExperimentConfig, folder: Path) -> None:
        self.folder, self.uri_setting, self.experiment = folder, cfg.train.mlflow_uri, cfg.name
        self.uri = self.uri_setting or f"sqlite:///{(folder / 'mlflow.db').resolve()}"
        self.run_id: str | None = None
        self._client: Any = None
        self._logged: set[tuple[str, int]] = set()  # (metric, step) pairs the run holds
        self._failed = False

    def begin(self, resume: Resume | None) -> None:
        try:
            with _quiet_mlflow():
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient(tracking_uri=self.uri)
                self.run_id = self._continued_run() if resume is not None else None
                if self.run_id is None:
                    self.run_id = self._new_run()
                else:
                    self._client.update_run(self.run_id, status="RUNNING")
                    self._logged = self._held_steps()
        except Exception as exc:  # a bad URI, an unreachable server: before training, one line
            raise GceError(f"mlflow tracker ({self.uri}): {_first_line(exc)}") from None
        for record in resume.records if resume is not None else ():
            self.log_metrics(record)  # what the store lacks (an attempt killed between the two logs)

    def _continued_run(self) -> str | None:
        path = self.folder / MLFLOW_RUN_FILE
        try:
            saved = json.loads(path.read_text())
            run_id = saved["run_id"] if saved.get("tracking_uri") == self.uri_setting else None
        except (OSError, ValueError, KeyError, TypeError):
            run_id = None
        if run_id is not None:
            try:
                if self._client.get_run(run_id).info.lifecycle_stage == "active":
                    return str(run_id)
            except Exception:
                pass
        warnings.warn(
            f"mlflow: no run of this folder in {self.uri}: starting a new one with the records so far",
            stacklevel=4,
        )
        return None

    def _new_run(self) -> str:
        experiment = self._client.get_experiment_by_name(self.experiment)
        if experiment is None:
            # The default store keeps artifacts beside it, in the run folder (not in the cwd).
            location = None if self.uri_setting else (self.folder / "mlartifacts").resolve().as_uri()
            experiment_id = self._client.create_experiment(self.experiment, artifact_location=location)
        elif experiment.lifecycle_stage != "active":
            raise GceError(f"experiment {self.experiment!r} is deleted: restore it or rename the config")
        else:
            experiment_id = experiment.experiment_id
        run_id = str(self._client.create_run(experiment_id).info.run_id)
        write_json(self.folder / MLFLOW_RUN_FILE, {"tracking_uri": self.uri_setting, "run_id": run_id})
        return run_id

    def _held_steps(self) -> set[tuple[str, int]]:
        run = self._client.get_run(self.run_id)
        return {
            (key, int(m.step)) for key in run.data.metrics for m in self._client.get_metric_history(self.run_id, key)
        }

    def log_params(self, params: Mapping[str, Any]) -> None:
        # MLflow params cannot change: a resume adds the keys the run lacks and keeps the others
        # (config.yaml has the settings as the run continued).
        if self._client is None:
            return
        from mlflow.entities import Param

        def send() -> None:
            held = self._client.get_run(self.run_id).data.params
            new = [Param(mlflow_name(k), str(v)[:6000]) for k, v in params.items() if mlflow_name(k) not in held]
            for i in range(0, len(new), _BATCH):
                self._client.log_batch(self.run_id, params=new[i : i + _BATCH])

        self._send(send)

    def log_metrics(self, record: Record) -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        step, now = int(record["epoch"]), int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, step)
            for key, value in ((mlflow_name(tag), value) for tag, value in scalars(record))
            if (key, step) not in self._logged
        ]
        if metrics and self._send(lambda: self._client.log_batch(self.run_id, metrics=metrics)):
            self._logged.update((m.key, step) for m in metrics)

    def close(self, finished: bool) -> None:
        if self._client is not None:
            self._send(lambda: self._client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED"))
            self._client = None

    def _send(self, call: Callable[[], object]) -> bool:
        """Whether ``call`` succeeded. A failed one warns (once) and training goes on: metrics.jsonl
        has the record, and a resume logs what the store lacks."""
        try:
            with _quiet_mlflow():
                call()
            return True
        except Exception as exc:
            if not self._failed:
                warnings.warn(f"mlflow: logging to {self.uri} failed: {_first_line(exc)}", stacklevel=3)
            self._failed = True
            return False


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
