"""The tiny training run many tests share: its config (resnet18 from scratch, 32 px, K=2) and runner."""

from __future__ import annotations

from pathlib import Path

from gce.cli import main

CONFIG = """
name: tiny
data: {{dataset: folder, root: {root}, image_size: 32, test_resize: 32, workers: 0,
        options: {{test_fraction: 0.25, seed: 0}}}}
model: {{backbone: resnet18, head: gce, num_learners: 2, embedding_dim: 32, pretrained: false,
         freeze_bn: false}}
metaclass: {{strategy: class_proxy, update_every: 1}}
sampler: {{classes_per_batch: 3, samples_per_class: 2, batches_per_epoch: 6}}
optim: {{name: adam, lr: 1.0e-3}}
train: {{epochs: 3, seed: 0, out_dir: {out}, eval_test_every: 1}}
eval: {{batch_size: 16}}
"""


def write_config(tmp_path: Path, root: Path, out: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(CONFIG.format(root=root, out=out))
    return path


def run_train(config: Path, *extra: str) -> int:
    return main(["train", str(config), "--quiet", *extra])
