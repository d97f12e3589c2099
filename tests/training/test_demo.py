"""`gce demo` on a tiny dataset: comparison table, retrieval grid and training curve."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gce.cli import main
from gce.data.records import ImageRecords
from gce.demo import being_trained, pick_queries, write_retrieval_grid
from gce.training.checkpoint import load_checkpoint

CONFIG = """
name: tiny-demo
data: {{dataset: folder, root: {root}, image_size: 32, test_resize: 32, workers: 0, options: {{test_fraction: 0.25}}}}
model: {{backbone: resnet18, head: gce, num_learners: 2, embedding_dim: 16, pretrained: false, freeze_bn: false}}
sampler: {{classes_per_batch: 3, samples_per_class: 2, batches_per_epoch: 2}}
train: {{epochs: 1, out_dir: {out}}}
"""


@pytest.mark.slow
def test_demo_writes_table_and_figures(tmp_path, shape_folder, capsys):
    config = tmp_path / "demo.yaml"
    config.write_text(CONFIG.format(root=shape_folder, out=tmp_path / "run"))
    assert main(["demo", str(config), "--quiet", "--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    assert "| resnet18 (untrained, pooled) |" in printed and "| tiny-demo (1 epochs) |" in printed
    for name in ("retrieval_grid.png", "retrieval_grid_untrained.png", "training_curve.png"):
        assert (tmp_path / "demo" / name).read_bytes()[:4] == b"\x89PNG", name
    # A second demo reuses the finished run instead of training again.
    assert main(["demo", str(config), "--quiet", "--out", str(tmp_path / "demo")]) == 0
    assert "resumed from" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_after_a_config_change_keeps_the_old_run_and_trains_anew(tmp_path, shape_folder, capsys):
    """An upgrade that changes a default (or an edited config) must not stop `make demo` with a
    refused resume: the old run is moved aside, nothing of it lost, and the demo trains anew."""
    config = tmp_path / "demo.yaml"
    run = tmp_path / "run"
    config.write_text(CONFIG.format(root=shape_folder, out=run))
    assert main(["demo", str(config), "--quiet", "--out", str(tmp_path / "demo")]) == 0
    old_weights = (run / "model.pt").read_bytes()
    capsys.readouterr()
    assert main(["demo", str(config), "--quiet", "--out", str(tmp_path / "demo"), "loss.margin=0.3"]) == 0
    printed = capsys.readouterr().out
    kept = tmp_path / "run.previous-1"
    assert f"moved it to {kept}" in printed and "loss.margin: checkpoint 0.1, config 0.3" in printed
    assert (kept / "model.pt").read_bytes() == old_weights
    state, _ = load_checkpoint(run)
    assert state["config"]["loss"]["margin"] == 0.3 and state["epoch"] == 1
    # A plain `gce train --resume` still refuses the other configuration.
    assert main(["train", str(config), "--quiet", "--resume"]) != 0
    # A lock left by a killed run does not count; a folder a live process trains in (its
    # running.lock, here the pid of this test's live parent) is never moved: the demo refuses.
    (run / "running.lock").write_text(str(_dead_pid()))
    assert not being_trained(run)
    (run / "running.lock").write_text(str(os.getppid()))
    assert being_trained(run)
    assert main(["demo", str(config), "--quiet", "--out", str(tmp_path / "demo"), "loss.margin=0.2"]) != 0
    assert (run / "last.pt").exists() and not (tmp_path / "run.previous-2").exists()


@pytest.mark.slow
def test_demo_metrics_equal_gce_eval_and_its_curve_leaves_training_unchanged(tmp_path, shape_folder):
    run = tmp_path / "run"
    config = tmp_path / "demo.yaml"
    config.write_text(CONFIG.format(root=shape_folder, out=run) + "eval: {backend: faiss}\n")
    assert main(["demo", str(config), "--quiet", "--out", str(tmp_path / "demo"), "train.epochs=2"]) == 0
    demo_rows = json.loads((tmp_path / "demo" / "comparison.json").read_text())
    # The same model.pt through `gce eval` with the configured back end: the very same numbers.
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(run / "model.pt"),
                "--backend",
                "faiss",
                "--workers",
                "0",
                "--quiet",
                "--out",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    assert demo_rows["tiny-demo (2 epochs)"] == json.loads((tmp_path / "eval.json").read_text())
    # The curve: the model before training, then after each epoch.
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [r for r in log if r["event"] == "curve"]
    assert [r["epoch"] for r in curve] == [-1, 0, 1]
    assert curve[-1]["recall@1"] == demo_rows["tiny-demo (2 epochs)"]["recall@1"]
    # Measuring the curve does not change training: `gce train` alone ends with the same weights.
    plain = tmp_path / "plain"
    assert main(["train", str(config), "--quiet", "train.epochs=2", f"train.out_dir={plain}"]) == 0
    assert (plain / "final_metrics.json").read_text() == (run / "final_metrics.json").read_text()
    for key, tensor in load_checkpoint(plain / "last.pt")[0]["model"].items():
        assert torch.equal(tensor, load_checkpoint(run / "last.pt")[0]["model"][key]), key
    assert torch.equal(
        load_checkpoint(plain / "last.pt")[0]["rng"]["torch"], load_checkpoint(run / "last.pt")[0]["rng"]["torch"]
    )


def test_retrieval_grid_marks_right_and_wrong(tmp_path, shape_folder, monkeypatch):
    paths = sorted(str(p) for p in shape_folder.rglob("*.png"))[:12]
    labels = np.repeat(np.arange(4), 3)
    records = ImageRecords(paths=paths, labels=labels, class_names=[str(i) for i in range(4)])
    embeddings = torch.nn.functional.normalize(torch.eye(4)[labels] + 0.01 * torch.randn(12, 4), dim=1)
    seen = {}
    import gce.demo as demo

    def capture(queries, neighbours, correct, path, title=""):
        seen["correct"] = correct
        return path

    monkeypatch.setattr(demo, "retrieval_grid", capture)
    write_retrieval_grid(embeddings, records, tmp_path / "g.png", queries=4, neighbours=3)
    # Two same-class neighbours exist per query, then the nearest other class: green, green, red.
    assert seen["correct"].tolist() == [[True, True, False]] * 4


def test_pick_queries_skips_lone_classes():
    labels = np.array([0, 0, 1, 2, 2, 3])
    chosen = pick_queries(labels, 10, seed=0)
    assert set(chosen.tolist()) == {0, 1, 3, 4}


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)
    return child.pid
