"""Training survives SIGKILL at any moment, Ctrl-C and a diverging loss, and loses nothing.

The end-to-end kill test drives tests/helpers/kill_resume.py (>= 10 SIGKILLs plus Ctrl-Cs, then a
bitwise comparison with an uninterrupted run). The other tests pin down the pieces it relies on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gce.cli import main
from gce.config import load_config
from gce.errors import GceError
from gce.training import checkpoint as ckpt
from gce.training.checkpoint import LAST, PREVIOUS, load_checkpoint, save_checkpoint
from gce.training.logging import MetricsLogger
from gce.training.parts import build_parts
from gce.training.trainer import NonFiniteLossError, Trainer
from helpers import kill_resume
from helpers.process_signals import signal_group_in_epoch_1

REPO = Path(__file__).resolve().parents[2]

CONFIG = kill_resume.CONFIG  # the benchmark's tiny run: resnet18 from scratch, K=2, D=16, 32 px


def write_config(tmp_path: Path, root: Path, out: Path, epochs: int = 2, batches: int = 4) -> Path:
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(CONFIG.format(root=root, out=out, epochs=epochs, batches=batches))
    return path


def records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def assert_same_weights(a: Path, b: Path) -> None:
    sa, _ = load_checkpoint(a)
    sb, _ = load_checkpoint(b)
    assert sa.keys() == sb.keys()
    for key, tensor in sa["model"].items():
        assert torch.equal(tensor, sb["model"][key]), key
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])


def all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------------------ kill and resume
@pytest.mark.slow
def test_ten_kills_and_two_ctrl_c_resume_to_bitwise_equal_result(tmp_path):
    started = time.perf_counter()
    summary = kill_resume.run_benchmark(
        tmp_path, kills=10, sigints=2, seed=0, epochs=3, batches=4, launcher="forkserver"
    )
    outcome, comparison = summary["outcome"], summary["comparison"]
    kills = [s for s in outcome.stops if s.signal == "SIGKILL"]
    assert len(kills) >= 10
    assert all(s.exit_code == -signal.SIGKILL for s in kills)
    assert any("writing a checkpoint" in s.phase for s in kills), "no kill landed during a checkpoint write"
    assert outcome.resumes >= 5
    assert comparison["last.pt differing"] == [] and comparison["model.pt differing"] == []
    assert comparison["metrics.jsonl equal"] and comparison["final_metrics.json equal"]
    assert comparison["equal"]
    # Nothing a killed writer left behind survives the run (each would be a whole checkpoint).
    leftovers = [p.name for p in (tmp_path / "interrupted").iterdir() if ".tmp" in p.name]
    assert leftovers == []
    print(f"kill/resume test: {time.perf_counter() - started:.0f} s")


@pytest.mark.parametrize("die_after", [0, 1, 2, 3])
def test_checkpoint_write_killed_between_any_two_steps_still_loads(tmp_path, monkeypatch, die_after):
    """A kill after N of the 4 renames in save_checkpoint (prev.pt.sha256, last.pt -> prev.pt,
    last.pt.sha256, last.pt): the folder still holds a loadable,
    verified checkpoint (the old one or the new one), and the next saves leave a consistent
    last.pt/prev.pt pair (prev.pt verifies too) and no temporary files."""
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, tmp_path)
    save_checkpoint({"epoch": 2, "w": torch.full((3,), 2.0)}, tmp_path)

    class Killed(BaseException):
        pass

    real_replace, calls = os.replace, []

    def dying_replace(src, dst):
        if len(calls) == die_after:
            raise Killed
        calls.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", dying_replace)
    with pytest.raises(Killed):
        save_checkpoint({"epoch": 3, "w": torch.full((3,), 3.0)}, tmp_path)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    messages: list[str] = []
    state, path = load_checkpoint(tmp_path, warn=messages.append)
    assert state["epoch"] == 2, (path, messages)  # the new file is renamed in last, checksum first
    assert torch.equal(state["w"], torch.full((3,), float(state["epoch"])))
    assert messages == []  # never a checksum mismatch
    save_checkpoint({"epoch": 4, "w": torch.full((3,), 4.0)}, tmp_path)
    assert load_checkpoint(tmp_path)[0]["epoch"] == 4
    assert load_checkpoint(tmp_path / PREVIOUS)[0]["epoch"] == state["epoch"]
    save_checkpoint({"epoch": 5, "w": torch.full((3,), 5.0)}, tmp_path)
    assert load_checkpoint(tmp_path / PREVIOUS)[0]["epoch"] == 4
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]


def test_temp_files_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    (tmp_path / f".{LAST}.tmp-{dead_pid}").write_bytes(b"half a checkpoint")
    (tmp_path / f".{LAST}.tmp-{os.getppid()}").write_bytes(b"someone alive")  # our parent runs
    save_checkpoint({"epoch": 1}, tmp_path)
    names = set(os.listdir(tmp_path))
    assert f".{LAST}.tmp-{dead_pid}" not in names
    assert f".{LAST}.tmp-{os.getppid()}" in names
    assert {LAST, f"{LAST}.sha256"} <= names


def test_log_truncation_on_resume_keeps_only_what_the_checkpoint_covers(tmp_path):
    logger = MetricsLogger(tmp_path)
    for epoch in range(3):
        logger.log("metaclass", epoch, {"moved_fraction": 0.0})
        logger.log("train", epoch, {"loss": 1.0})
        logger.log("test", epoch, {"recall@1": 0.5})
    with open(logger.path, "a") as fh:
        fh.write('{"event": "train", "ep')  # cut by a kill mid-write
    # Mid-epoch checkpoint of epoch 1: epoch 0, and the meta-class record of epoch 1, stay.
    logger.truncate_after(1, keep_at_epoch=("metaclass",))
    assert [(r["event"], r["epoch"]) for r in logger.read()] == [
        ("metaclass", 0),
        ("train", 0),
        ("test", 0),
        ("metaclass", 1),
    ]
    logger.truncate_after(1)  # an epoch-end checkpoint
    assert [r["epoch"] for r in logger.read()] == [0, 0, 0]
    assert not list(tmp_path.glob(".*tmp"))


def test_fresh_start_after_a_kill_before_the_first_checkpoint(tmp_path, shape_folder):
    out = tmp_path / "run"
    out.mkdir()
    # What a run killed during epoch 0 leaves: its config and the epoch's meta-class record.
    (out / "metrics.jsonl").write_text('{"event": "metaclass", "epoch": 0, "moved_fraction": 0.0}\n')
    config = write_config(tmp_path, shape_folder, out, epochs=1, batches=1)
    assert main(["train", str(config), "--quiet", "train.eval_test_every=0"]) == 0
    assert [(r["event"], r["epoch"]) for r in records(out)] == [("metaclass", 0), ("train", 0), ("test", 0)]


def test_a_folder_with_only_prev_pt_is_a_run_too(tmp_path, shape_folder):
    # A kill between the renames of a checkpoint write leaves prev.pt and no last.pt.
    out = tmp_path / "run"
    save_checkpoint({"epoch": 1}, out)
    os.replace(out / LAST, out / PREVIOUS)
    config = write_config(tmp_path, shape_folder, out)
    with pytest.raises(GceError, match="already holds a run; pass --resume"):
        Trainer.from_config(load_config(config), progress=False).run()


# -------------------------------------------------------------------------------------- Ctrl-C
@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_exits_130_and_resumes_bitwise(tmp_path, shape_folder):
    batches = 8
    out = tmp_path / "interrupted"
    config = write_config(tmp_path, shape_folder, out, epochs=2, batches=batches)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gce", "train", str(config), "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        for line in process.stdout:  # wait until epoch 1's batches have started
            if line.startswith("epoch 1: meta-classes updated") or time.monotonic() > deadline:
                break
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        _stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted: checkpoint written to" in stderr
    resume_line = [line for line in stderr.splitlines() if line.startswith("resume with: ")]
    assert resume_line == [f"resume with: gce train {config} --resume"]
    state, _ = load_checkpoint(out)
    assert state["batch"] > 0 or state["epoch"] > 0
    print(f"Ctrl-C checkpoint at epoch {state['epoch']}, batch {state['batch']}")
    if state["batch"]:  # mid-epoch: the steps done so far are in the checkpoint
        assert state["partial"]["steps"] == state["batch"]

    assert main(["train", str(config), "--quiet", "--resume"]) == 0
    reference = tmp_path / "reference"
    assert (
        main(["train", str(write_config(tmp_path, shape_folder, reference, epochs=2, batches=batches)), "--quiet"]) == 0
    )
    assert_same_weights(reference / LAST, out / LAST)
    for key, tensor in load_checkpoint(reference / "model.pt")[0]["model"].items():
        assert torch.equal(tensor, load_checkpoint(out / "model.pt")[0]["model"][key]), key
    assert records(reference) == records(out)


# ----------------------------------------------------------------------------------- NaN loss
class LossTurningNaN(torch.nn.Module):
    """The run's loss, replaced from call ``after + 1`` on: by NaN (``value=True``), or by the same
    value with a NaN gradient, which breaks the weights while the loss stays finite."""

    def __init__(self, real: torch.nn.Module, after: int, value: bool) -> None:
        super().__init__()
        self.real, self.after, self.value, self.calls = real, after, value, 0

    def forward(self, *args, **kwargs):
        loss, info = self.real(*args, **kwargs)
        self.calls += 1
        if self.calls > self.after:
            loss = loss * float("nan") if self.value else NaNGradient.apply(loss)
        return loss, info


class NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def nan_trainer(tmp_path: Path, shape_folder: Path, after: int, value: bool, *overrides: str) -> tuple[Trainer, Path]:
    out = tmp_path / "run"
    cfg = load_config(write_config(tmp_path, shape_folder, out, epochs=3, batches=4), list(overrides))
    parts = build_parts(cfg, progress=False)
    parts.loss = LossTurningNaN(parts.loss, after=after, value=value)
    return Trainer(parts, log=lambda _: None), out


def test_nan_loss_mid_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, shape_folder):
    trainer, out = nan_trainer(tmp_path, shape_folder, after=5, value=True)  # epoch 1, batch 1 (4 per epoch)
    with pytest.raises(NonFiniteLossError) as raised:
        trainer.run()
    message = str(raised.value)
    assert "\n" not in message and message.startswith("loss became nan (learner 1)")
    assert f"The last good checkpoint is kept: {out / LAST}" in message
    state, path = load_checkpoint(out)
    assert path.name == LAST and state["epoch"] == 1 and state["batch"] == 0
    assert all_finite(state)
    assert [r["epoch"] for r in records(out)] == [0, 0, 0, 1]  # epoch 0, and epoch 1's meta-class update


def test_huge_learning_rate_stops_at_once_without_a_checkpoint(tmp_path, shape_folder, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path, shape_folder, out, epochs=2, batches=4)
    assert main(["train", str(config), "--quiet", "optim.lr=1e30"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gce: error: loss became nan")
    assert "No checkpoint had been written yet" in err and "optim.lr" in err
    assert not (out / LAST).exists()


def test_nan_weights_from_the_last_step_of_an_epoch_are_never_checkpointed(tmp_path, shape_folder):
    """The loss of the step that breaks the weights is still finite; nothing evaluates it next
    when train.eval_test_every=0, so the check must be on the weights themselves."""
    trainer, out = nan_trainer(tmp_path, shape_folder, 7, False, "train.eval_test_every=0")  # epoch 1's last step
    with pytest.raises(NonFiniteLossError) as raised:
        trainer.run()
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("model weights became NaN or infinite during epoch 1; stopping without")
    state, _ = load_checkpoint(out)
    assert state["epoch"] == 1 and all_finite(state)


# ------------------------------------------------------- verified checkpoints, signals, resumes
def test_damaged_last_pt_without_its_checksum_falls_back_to_prev_pt(tmp_path, shape_folder, capsys):
    """Before: a last.pt with NaN-flipped weights whose .sha256 was deleted loaded unverified,
    training stopped on NaN weights and the message called that file 'the last good checkpoint';
    prev.pt was never tried."""
    out = tmp_path / "run"
    config = write_config(tmp_path, shape_folder, out, epochs=2, batches=1)
    assert main(["train", str(config), "--quiet", "train.eval_test_every=0"]) == 0
    state, _ = load_checkpoint(out)
    state["model"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save({"format": ckpt._FORMAT, "state": state}, out / LAST)  # a damaged, loadable file
    (out / f"{LAST}.sha256").unlink()
    capsys.readouterr()
    assert main(["train", str(config), "--quiet", "--resume", "train.epochs=3", "train.eval_test_every=0"]) == 0
    printed = capsys.readouterr().out
    assert (
        f"{out / LAST}: no checksum file last.pt.sha256 beside it, so it cannot be verified;"
        f" falling back to {out / PREVIOUS}"
    ) in printed
    assert f"resumed from {out / PREVIOUS} at epoch 1" in printed
    for name in (LAST, PREVIOUS):  # the damaged file was never promoted to prev.pt
        state, _ = load_checkpoint(out / name)
        assert all_finite(state)
    assert load_checkpoint(out)[0]["epoch"] == 3


class SigintAt(torch.nn.Module):
    """The run's loss, sending this process a real SIGINT (or ``sig``) during call ``at``."""

    def __init__(self, real: torch.nn.Module, at: int, sig: signal.Signals = signal.SIGINT) -> None:
        super().__init__()
        self.real, self.at, self.calls, self.sig = real, at, 0, sig

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.sig)
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_in_the_final_epoch_stops_with_a_checkpoint_like_mid_run(tmp_path, shape_folder, sig):
    """Before: Ctrl-C in the final epoch's last step said it would write a checkpoint and stop,
    then finished the run (exit 0). SIGTERM (preemption) is handled the same way."""
    from gce.training.trainer import TrainingInterrupted

    out = tmp_path / "run"
    cfg = load_config(write_config(tmp_path, shape_folder, out, epochs=2, batches=2), ["train.eval_test_every=0"])
    parts = build_parts(cfg, progress=False)
    parts.loss = SigintAt(parts.loss, at=4, sig=sig)  # the last step of the last epoch
    with pytest.raises(TrainingInterrupted, match=r"interrupted: checkpoint written to .*training is complete"):
        Trainer(parts, log=lambda _: None).run()
    assert load_checkpoint(out)[0]["epoch"] == 2
    assert not (out / "model.pt").exists() and not (out / "final_metrics.json").exists()
    result = Trainer.from_config(cfg, resume=True, progress=False, log=lambda _: None).run()
    assert (out / "model.pt").exists() and json.loads((out / "final_metrics.json").read_text())[
        "recall@1"
    ] == result.recall[1]


def test_ctrl_c_during_start_up_is_one_message_and_exit_130(tmp_path, shape_folder, capsys, monkeypatch):
    import gce.training.parts as parts_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as if Ctrl-C arrived while the images were being checked

    out = tmp_path / "run"
    config = write_config(tmp_path, shape_folder, out, epochs=1, batches=1)
    monkeypatch.setattr(parts_module, "prepare_data", interrupted)
    assert main(["train", str(config), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines() == [
        "interrupted before the first checkpoint: nothing to resume",
        f"start again with: gce train {config}",
    ]


@pytest.mark.slow
def test_ctrl_c_while_gce_starts_prints_no_traceback(tmp_path, shape_folder):
    """A real process interrupted during its imports (before: a KeyboardInterrupt traceback)."""
    config = write_config(tmp_path, shape_folder, tmp_path / "run", epochs=1, batches=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gce", "train", str(config), "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A terminal's Ctrl-C: the default action, even when the suite itself runs in the background
        # (a shell starts `cmd &` with SIGINT ignored, and Python then never raises KeyboardInterrupt).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(1.0)  # the interpreter is up; torch is still being imported (the command's own imports)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr


def test_resume_refuses_changed_data_and_seed_and_records_what_it_continued_with(tmp_path, capsys):
    """Before: with classes removed the class split was redrawn (test classes trained on); with
    classes added, an IndexError traceback; another train.seed was accepted silently; config.yaml
    kept the first attempt's settings."""
    import shutil

    from gce.data.synthetic import make_pattern_folder

    data = make_pattern_folder(tmp_path / "data", num_classes=12, per_class=4)
    out = tmp_path / "run"
    config = write_config(tmp_path, data, out, epochs=1, batches=1)
    assert main(["train", str(config), "--quiet", "train.eval_test_every=0"]) == 0
    capsys.readouterr()

    assert main(["train", str(config), "--quiet", "--resume", "train.epochs=2", "train.seed=1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "gce: error: checkpoint was written with another configuration: train.seed: checkpoint 0, config 1"

    assert main(["train", str(config), "--quiet", "--resume", "train.epochs=2", "train.eval_test_every=0"]) == 0
    assert "resuming with changed settings: train.epochs: 1 -> 2 (written to config.yaml)" in capsys.readouterr().out
    assert load_config(out / "config.yaml").train.epochs == 2

    shutil.copytree(data / "class_03", data / "class_99")
    assert main(["train", str(config), "--quiet", "--resume", "train.epochs=3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"the data changed since {out / LAST} was written (" in err and "class_99" in err
    assert re.search(r"(train|test): .*classes added", err), err  # 13 classes redraw the class split too
    shutil.rmtree(data / "class_99")
    shutil.rmtree(data / "class_05")
    assert main(["train", str(config), "--quiet", "--resume", "train.epochs=3"]) == 1
    err = capsys.readouterr().err
    assert "the data changed since" in err and "classes removed" in err and "class_05" in err
    assert load_checkpoint(out)[0]["epoch"] == 2  # nothing was trained on the changed data


def test_sigterm_to_the_process_group_with_loader_workers_still_checkpoints_mid_epoch(tmp_path, shape_folder):
    """A scheduler's SIGTERM reaches the trainer and its DataLoader workers alike; the workers
    ignore it, so the trainer finishes its step and writes a mid-epoch checkpoint (before: a worker
    killed by the signal made the DataLoader raise inside the step, exit 1 with a traceback)."""
    out = tmp_path / "term"
    config = write_config(tmp_path, shape_folder, out, epochs=2, batches=40)
    config.write_text(config.read_text().replace("workers: 0", "workers: 2"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gce", "train", str(config), "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    stdout, stderr = signal_group_in_epoch_1(process, signal.SIGTERM, timeout_s=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted: checkpoint written to" in stderr
    assert "SIGTERM: finishing the current step" in stdout
    state, _ = load_checkpoint(out)
    assert state["epoch"] == 1 and 0 < state["batch"] < 40
