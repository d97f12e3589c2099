"""Experiment trackers mirror metrics.jsonl: chosen by train.trackers, MLflow in a local store,
a resume continuing the same tracked run with each epoch logged once."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from gce.cli import main
from gce.config import load_config
from gce.errors import ConfigError, GceError
from gce.training.checkpoint import LAST
from gce.training.trackers import (
    MLFLOW_RUN_FILE,
    MLflowTracker,
    Resume,
    TensorBoardTracker,
    flatten_params,
    mlflow_name,
    scalars,
)
from gce.training.trainer import Trainer
from helpers import kill_resume

mlflow = pytest.importorskip("mlflow")  # the 'mlflow' extra (in `make test`)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made, copied into each run folder as its mlflow.db:
    creating the tables (MLflow's schema migrations) takes seconds, a copy none."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def write_config(tmp_path: Path, root: Path, out: Path, epochs: int = 2) -> Path:
    """The tiny run of the kill benchmark (resnet18 from scratch, 32 px), one batch per epoch."""
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(kill_resume.CONFIG.format(root=root, out=out, epochs=epochs, batches=1))
    return path


def train(config: Path, trackers: str, *extra: str) -> None:
    assert main(["train", str(config), "--quiet", f"train.trackers={trackers}", *extra]) == 0


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def client(out: Path):
    return mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")


def history(out: Path, run_id: str) -> dict[tuple[str, int], list[float]]:
    """(metric, step) -> every value the run holds there (more than one: a duplicate)."""
    c = client(out)
    points: dict[tuple[str, int], list[float]] = {}
    for key in c.get_run(run_id).data.metrics:
        for m in c.get_metric_history(run_id, key):
            points.setdefault((key, m.step), []).append(m.value)
    return points


def mirrored(rows: list[dict], skip: tuple[str, ...] = ()) -> dict[tuple[str, int], list[float]]:
    """What the MLflow run should hold for these metrics.jsonl records: each number once, at its epoch."""
    return {
        (mlflow_name(tag), row["epoch"]): [float(value)]
        for row in rows
        for tag, value in scalars(row)
        if tag.split("/")[1] not in skip
    }


@pytest.mark.slow
def test_the_mlflow_store_gets_the_config_and_every_epoch(tmp_path, shape_folder, empty_store):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(empty_store, out / "mlflow.db")  # the default store: sqlite:///<out>/mlflow.db
    train(write_config(tmp_path, shape_folder, out), "[mlflow]")
    run_id = json.loads((out / MLFLOW_RUN_FILE).read_text())["run_id"]
    run = client(out).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client(out).get_experiment(run.info.experiment_id).name == "killtest"  # the config's name
    params = run.data.params
    assert params["train.epochs"] == "2" and params["model.num_learners"] == "2"
    assert params["train.trackers"] == '["mlflow"]' and params["data.root"] == str(shape_folder)
    assert params == flatten_params(load_config(out / "config.yaml").to_dict())  # every leaf of the config
    rows = records(out)
    assert {r["event"] for r in rows} == {"metaclass", "train", "test"}
    assert history(out, run_id) == mirrored(rows)  # each number of metrics.jsonl once, step = epoch
    assert ("test/recall_at_1", 1) in history(out, run_id)
    assert not (out / "tensorboard").exists()


@pytest.mark.slow
def test_a_resume_continues_the_same_run_and_logs_each_epoch_once(tmp_path, shape_folder, empty_store):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(empty_store, out / "mlflow.db")
    config = write_config(tmp_path, shape_folder, out)
    train(config, "[mlflow]", "train.epochs=1")  # stops after epoch 0: a checkpoint at epoch 1
    run_id = json.loads((out / MLFLOW_RUN_FILE).read_text())["run_id"]
    assert client(out).get_run(run_id).info.status == "FINISHED"
    train(config, "[mlflow]", "--resume")  # 2 epochs: continues with epoch 1
    assert json.loads((out / MLFLOW_RUN_FILE).read_text())["run_id"] == run_id
    assert len(client(out).search_runs([client(out).get_run(run_id).info.experiment_id])) == 1
    assert history(out, run_id) == mirrored(records(out))
    # MLflow params cannot change: the run keeps the config it started with (config.yaml has 2).
    assert client(out).get_run(run_id).data.params["train.epochs"] == "1"

    # A kill after epoch 1 was logged, before its checkpoint: the resume redoes epoch 1 from the
    # epoch-1 checkpoint (prev.pt). The store keeps one point per (metric, epoch): the first one.
    first = history(out, run_id)
    (out / LAST).unlink()
    (out / f"{LAST}.sha256").unlink()
    train(config, "[mlflow]", "--resume")
    assert json.loads((out / MLFLOW_RUN_FILE).read_text())["run_id"] == run_id
    assert history(out, run_id) == first
    # The redone epoch computes the same numbers (a CPU run is bit-exact), its timing aside.
    assert mirrored(records(out), skip=("seconds",)) == {
        k: v for k, v in first.items() if not k[0].endswith("/seconds")
    }
    assert client(out).get_run(run_id).info.status == "FINISHED"


def test_no_trackers_write_only_metrics_jsonl(tmp_path, shape_folder):
    out = tmp_path / "run"
    train(write_config(tmp_path, shape_folder, out, epochs=1), "[]")
    assert {p.name for p in out.iterdir()} == {
        "config.yaml",
        "metrics.jsonl",
        "last.pt",
        "last.pt.sha256",
        "model.pt",
        "model.pt.sha256",
        "final_metrics.json",
    }
    assert {r["event"] for r in records(out)} == {"metaclass", "train", "test"}


@pytest.mark.parametrize(
    "value, message",
    [
        ("[wandb]", r"^bad value for 'train\.trackers\.0': Input should be 'tensorboard' or 'mlflow' \(got 'wandb'\)$"),
        ("[mlflow, mlflow]", r"^bad value for 'train\.trackers': lists mlflow more than once"),
        ("mlflow", r"^bad value for 'train\.trackers': Input should be a valid list"),
    ],
)
def test_a_bad_tracker_choice_is_a_one_line_config_error(tmp_path, shape_folder, value, message):
    config = write_config(tmp_path, shape_folder, tmp_path / "run")
    with pytest.raises(ConfigError, match=message) as err:
        load_config(config, [f"train.trackers={value}"])
    assert "\n" not in str(err.value)


def test_the_default_trackers_are_tensorboard(tmp_path, shape_folder):
    cfg = load_config(write_config(tmp_path, shape_folder, tmp_path / "run"))
    assert cfg.train.trackers == ["tensorboard"] and cfg.train.mlflow_uri is None


def test_a_missing_mlflow_is_one_line_before_any_work(tmp_path, shape_folder, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    out = tmp_path / "run"
    cfg = load_config(write_config(tmp_path, shape_folder, out), ["train.trackers=[tensorboard, mlflow]"])
    with pytest.raises(GceError) as err:
        Trainer.from_config(cfg, progress=False)
    assert str(err.value) == (
        "the mlflow tracker (train.trackers) needs mlflow (the 'mlflow' extra): pip install 'gce-dml[mlflow]'"
    )
    assert not out.exists()  # before the run folder, the data and the model


def test_a_failing_store_warns_once_and_training_goes_on(tmp_path):
    cfg = load_config(
        write_config(tmp_path, tmp_path / "data", tmp_path / "run"), ["train.trackers=[mlflow]", "train.mlflow_uri=x"]
    )
    tracker = MLflowTracker(cfg, tmp_path)

    class Down:
        def log_batch(self, *args, **kwargs):
            raise ConnectionError("store unreachable\nsecond line")

    tracker._client, tracker.run_id = Down(), "r"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(2):
            tracker.log_metrics({"event": "train", "epoch": epoch, "loss": 1.0})
    assert [str(w.message) for w in caught] == ["mlflow: logging to x failed: store unreachable"]
    assert tracker._logged == set()  # not logged: a resume sends it


def test_tensorboard_hides_what_a_killed_attempt_logged_at_the_redone_epochs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(write_config(tmp_path, tmp_path / "data", tmp_path / "run"))

    def rows(epochs, loss, meta=()):
        out = [{"event": "metaclass", "epoch": e, "moved": 0.1 * e} for e in meta]
        return out + [{"event": "train", "epoch": e, "loss": loss + e, "nmi": float("nan")} for e in epochs]

    first = TensorBoardTracker(cfg, tmp_path)
    first.begin(None)
    for row in rows([0, 1, 2], 10.0, meta=[0, 1, 2]):
        first.log_metrics(row)
    first.close(False)
    # Killed in epoch 2 after its meta-class update, resumed from the mid-epoch-1 checkpoint: the
    # log keeps epoch 0 and epoch 1's meta-class record; epoch 1's training is redone.
    kept = rows([0], 10.0, meta=[0, 1])
    second = TensorBoardTracker(cfg, tmp_path)
    second.begin(Resume(epoch=1, records=kept))
    for row in [*rows([1], 20.0), *rows([2], 20.0, meta=[2])]:
        second.log_metrics(row)
    second.close(True)

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("train/loss")] == [(0, 10.0), (1, 21.0), (2, 22.0)]
    assert [(s.step, round(s.value, 6)) for s in events.Scalars("metaclass/moved")] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert "train/nmi" not in events.Tags()["scalars"]  # NaN: in metrics.jsonl as null only


def test_ranks_other_than_zero_open_no_tracker(tmp_path):
    """distribute_parts closes the writer build_parts made on a rank other than 0 and gives it one
    that writes nothing: no tracker file, no MLflow run, whatever the trackers."""
    from gce.distributed.training import SilentWriter
    from gce.training.writer import RunWriter

    out = tmp_path / "run"
    cfg = load_config(write_config(tmp_path, tmp_path / "data", out), ["train.trackers=[tensorboard, mlflow]"])
    RunWriter(out, cfg).close()
    silent = SilentWriter(out)
    silent.start_fresh(cfg)
    silent.log("train", 0, {"loss": 1.0})
    silent.truncate_log(0)
    silent.close()
    assert list(out.iterdir()) == []
