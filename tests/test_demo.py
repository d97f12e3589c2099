"""`gce demo` on a tiny dataset: comparison table, retrieval grid and training curve."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gce.cli import main
from gce.data.records import ImageRecords
from gce.demo import pick_queries, write_retrieval_grid

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
