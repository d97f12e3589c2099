"""`gce ... | head`: a reader that leaves early stops gce quietly (exit 141), never a traceback or a hang."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CONFIG = """
name: tiny-pipe
data: {{dataset: folder, root: {root}, image_size: 32, test_resize: 32, workers: 1, options: {{test_fraction: 0.25}}}}
model: {{backbone: resnet18, head: gce, num_learners: 2, embedding_dim: 16, pretrained: false, freeze_bn: false}}
sampler: {{classes_per_batch: 3, samples_per_class: 2, batches_per_epoch: 2}}
train: {{epochs: 1, out_dir: {out}, eval_test_every: 0}}
eval: {{clustering: false}}
"""


def _run_into_a_closed_pipe(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before gce writes a line
    try:
        return subprocess.run(
            [sys.executable, "-m", "gce", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    finally:
        os.close(write_end)


def test_a_closed_pipe_ends_a_command_quietly():
    done = _run_into_a_closed_pipe(["config", "list"], timeout=60)
    assert (done.returncode, done.stderr) == (141, "")


@pytest.mark.slow
def test_training_whose_reader_leaves_stops_with_its_loader_workers(shape_folder, tmp_path):
    """`gce train ... | head -1`. Before: the traceback of the broken pipe kept the persistent
    DataLoader workers alive, and the interpreter then waited on them forever at exit."""
    config = tmp_path / "pipe.yaml"
    config.write_text(CONFIG.format(root=shape_folder, out=tmp_path / "run"))
    process = subprocess.Popen(
        [sys.executable, "-m", "gce", "train", str(config), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert process.stdout.readline().startswith("training tiny-pipe")
        process.stdout.close()  # what head does after its line
        _, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 141, err
    assert "Traceback" not in err
