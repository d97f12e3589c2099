"""``gce train CONFIG --nproc 2`` starts the run under torch's elastic launcher (torchrun)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gce
from gce.distributed.launch import torchrun_command
from gce.errors import ConfigError
from gce.training.checkpoint import load_checkpoint
from helpers.process_signals import signal_group_in_epoch_1

# The gce these tests import (PYTHONPATH may name another checkout): their subprocesses run it too.
SRC = Path(gce.__file__).resolve().parent.parent
CONFIG = """\
name: nproc-test
data: {{dataset: folder, root: {root}, image_size: 32, test_resize: 32, workers: 0,
        options: {{test_fraction: 0.25, seed: 0}}}}
model: {{backbone: resnet18, head: gce, num_learners: 2, embedding_dim: 16, pretrained: false}}
metaclass: {{strategy: random}}
sampler: {{classes_per_batch: 3, samples_per_class: 2, batches_per_epoch: 2}}
train: {{epochs: 1, seed: 0, out_dir: {out}, num_threads: 1}}
eval: {{batch_size: 8, clustering: false}}
"""


def test_launcher_command_line():
    command = torchrun_command(["train", "c.yaml", "a.b=1"], nproc=4, max_restarts=3)
    assert command[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=4",
        "--max-restarts=3",
        "-m",
        "gce",
        "train",
        "c.yaml",
        "a.b=1",
    ]
    with pytest.raises(ConfigError, match="--nproc"):
        torchrun_command(["train"], nproc=0)


def test_gce_train_nproc_2_runs_once_and_writes_once(tmp_path, shape_folder):
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.format(root=shape_folder, out=out))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "gce", "train", str(config), "--nproc", "2", "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("final test metrics") == 1  # rank 0 prints, rank 1 does not
    assert (out / "model.pt").exists() and (out / "final_metrics.json").exists()
    assert len(list((out / "tensorboard").iterdir())) == 1
    assert [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]


def test_a_collective_timeout_is_one_line_naming_the_key():
    from gce.distributed import CollectiveTimeout, DistContext, distributed_errors

    ctx = DistContext(rank=1, world_size=2, timeout_s=5)
    with (
        pytest.raises(CollectiveTimeout, match=r"rank 1: .*train\.dist_timeout_s=5 s; another rank hung or died"),
        distributed_errors(ctx),
    ):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Timed out waiting 5000ms")
    with pytest.raises(CollectiveTimeout, match="lost the connection"), distributed_errors(ctx):
        raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")
    with pytest.raises(ValueError, match=r"^not a collective$"), distributed_errors(ctx):  # passed through unchanged
        raise ValueError("not a collective")


def test_sync_bn_needs_trainable_batchnorm(tmp_path):
    from gce.config import load_config

    config = tmp_path / "c.yaml"
    (tmp_path / "data").mkdir()  # the run folder may not lie inside the dataset root
    config.write_text(CONFIG.format(root=tmp_path / "data", out=tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"train\.sync_bn=true needs model\.freeze_bn=false"):
        load_config(config, ["train.sync_bn=true"])
    assert load_config(config, ["train.sync_bn=true", "model.freeze_bn=false"]).train.sync_bn


def _gce(*args: str, **popen) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "gce", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )


def test_ctrl_c_under_nproc_checkpoints_mid_epoch_and_resumes_to_the_uninterrupted_run(tmp_path, shape_folder):
    """Ctrl-C in the terminal (SIGINT to gce and its launcher, not to the workers, which torchrun
    starts in their own sessions): the launcher passes it on, the workers finish their step and
    write a mid-epoch checkpoint, gce exits 130 with the resume command, and resuming ends like the
    uninterrupted run."""
    runs = {}
    for name in ("interrupted", "reference"):
        runs[name] = tmp_path / name
        (tmp_path / f"{name}.yaml").write_text(
            CONFIG.format(root=shape_folder, out=runs[name])
            .replace("strategy: random", "strategy: class_proxy, update_every: 1")
            .replace("batches_per_epoch: 2", "batches_per_epoch: 40")
            .replace("epochs: 1", "epochs: 2")
        )
    process = _gce("train", str(tmp_path / "interrupted.yaml"), "--nproc", "2", "--quiet", start_new_session=True)
    _stdout, stderr = signal_group_in_epoch_1(process, signal.SIGINT, timeout_s=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert f"resume with: gce train {tmp_path / 'interrupted.yaml'} --resume --nproc=2" in stderr
    state, _ = load_checkpoint(runs["interrupted"])
    assert state["epoch"] == 1 and 0 < state["batch"] < 40  # mid-epoch
    for name, extra in (("interrupted", ["--resume"]), ("reference", [])):
        done = _gce("train", str(tmp_path / f"{name}.yaml"), "--nproc", "2", "--quiet", *extra)
        _, err = done.communicate(timeout=600)
        assert done.returncode == 0, err[-3000:]
    final = {name: load_checkpoint(out / "model.pt")[0]["model"] for name, out in runs.items()}
    for key, tensor in final["reference"].items():
        assert torch.equal(tensor, final["interrupted"][key]), key


def test_failed_workers_end_in_one_line_without_a_traceback(tmp_path, shape_folder):
    # An image that cannot be decoded: found by the workers' image check, not by the launcher's
    # checks before it starts them (which list the data but decode nothing).
    data = tmp_path / "data"
    shutil.copytree(shape_folder, data)
    (data / "class_00" / "img_0.png").write_bytes(b"not a png")
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.format(root=data, out=tmp_path / "run"))
    done = _gce("train", str(config), "--nproc", "2", "--quiet")
    _, stderr = done.communicate(timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in stderr
    assert stderr.count("class_00/img_0.png") == 2  # each worker's own error
    # Both workers fail on the image; the launcher SIGTERMs the slower one once the first has
    # exited, which may land before or after it exits by itself.
    assert stderr.strip().splitlines()[-1] in (
        "gce: error: 2 of 2 worker processes failed (exit code 1); their errors are printed above",
        (
            "gce: error: 1 of 2 worker processes failed (exit code 1); the launcher stopped the other 1;"
            " their errors are printed above"
        ),
    )
    bad = _gce("train", str(config), "train.no_such_key=1", "--nproc", "2")
    _, stderr = bad.communicate(timeout=120)
    assert bad.returncode == 1 and "no_such_key" in stderr and "worker" not in stderr  # before any process
    config.write_text(CONFIG.format(root=tmp_path / "missing", out=tmp_path / "run"))
    missing = _gce("train", str(config), "--nproc", "2")
    _, stderr = missing.communicate(timeout=120)
    assert missing.returncode == 1 and stderr.count("does not exist") == 1 and "worker process" not in stderr
