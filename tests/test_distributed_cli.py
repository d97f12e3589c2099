"""``gce train CONFIG --nproc 2`` starts the run under torch's elastic launcher (torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gce.distributed.launch import torchrun_command
from gce.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
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
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                           "--max-restarts=3", "-m", "gce", "train", "c.yaml", "a.b=1"]
    with pytest.raises(ConfigError, match="--nproc"):
        torchrun_command(["train"], nproc=0)


def test_gce_train_nproc_2_runs_once_and_writes_once(tmp_path, shape_folder):
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.format(root=shape_folder, out=out))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "gce", "train", str(config), "--nproc", "2", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("final test metrics") == 1  # rank 0 prints, rank 1 does not
    assert (out / "model.pt").exists() and (out / "final_metrics.json").exists()
    assert len(list((out / "tensorboard").iterdir())) == 1
    assert [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]


def test_a_collective_timeout_is_one_line_naming_the_key():
    from gce.distributed import CollectiveTimeout, DistContext, distributed_errors

    ctx = DistContext(rank=1, world_size=2, timeout_s=5)
    with pytest.raises(CollectiveTimeout, match=r"rank 1: .*train.dist_timeout_s=5 s; another rank hung or died"):
        with distributed_errors(ctx):
            raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Timed out waiting 5000ms")
    with pytest.raises(CollectiveTimeout, match="lost the connection"):
        with distributed_errors(ctx):
            raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")
    with pytest.raises(ValueError):  # other errors pass through unchanged
        with distributed_errors(ctx):
            raise ValueError("not a collective")


def test_sync_bn_needs_trainable_batchnorm(tmp_path):
    from gce.config import load_config

    config = tmp_path / "c.yaml"
    (tmp_path / "data").mkdir()  # the run folder may not lie inside the dataset root
    config.write_text(CONFIG.format(root=tmp_path / "data", out=tmp_path / "out"))
    with pytest.raises(ConfigError, match="train.sync_bn=true needs model.freeze_bn=false"):
        load_config(config, ["train.sync_bn=true"])
    assert load_config(config, ["train.sync_bn=true", "model.freeze_bn=false"]).train.sync_bn
