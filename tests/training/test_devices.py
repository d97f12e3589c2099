"""What crosses devices, checked without a GPU: checkpoints written by a GPU run load on the CPU,
the GPU's random state is checkpointed and restored, and meta-class refreshes accept tensors that
numpy cannot read directly. tests/distributed/test_distributed_cuda.py runs the same paths on a real GPU."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.serialization

from gce.cli import main
from gce.metaclass import build_strategy
from gce.metaclass.relabel import PerLearnerMetaClasses
from gce.training.checkpoint import load_checkpoint, load_model, require_keys, save_checkpoint
from gce.training.trainer import Trainer

CONFIG = """
name: tiny-devices
data: {{dataset: folder, root: {root}, image_size: 32, test_resize: 32, workers: 0,
        options: {{test_fraction: 0.25, seed: 0}}}}
model: {{backbone: resnet18, head: gce, num_learners: 2, embedding_dim: 16, pretrained: false}}
metaclass: {{strategy: class_proxy, update_every: 1}}
sampler: {{classes_per_batch: 3, samples_per_class: 2, batches_per_epoch: 2}}
train: {{epochs: 1, seed: 0, out_dir: {out}, eval_test_every: 0, num_threads: 1}}
eval: {{batch_size: 16, clustering: false}}
"""


@pytest.fixture
def saved_as_on_gpu(monkeypatch):
    """Every tensor torch.save writes from now on is tagged as stored on cuda:0, as a GPU run's are."""
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")


def _gpu_tagged(path: Path) -> bool:
    """Whether torch.load without map_location refuses ``path`` here (it names a GPU this machine lacks)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: a cuda-tagged file loads anyway")
    try:
        torch.load(path, weights_only=True)
    except RuntimeError as exc:
        return "CUDA" in str(exc)
    return False


def test_a_checkpoint_written_on_a_gpu_loads_on_the_cpu(tmp_path, saved_as_on_gpu):
    state = {"model": {"w": torch.ones(2, 3)}, "assignment": torch.arange(4)}
    path = save_checkpoint(state, tmp_path)
    assert _gpu_tagged(path)
    loaded, _ = load_checkpoint(tmp_path)
    assert loaded["model"]["w"].device.type == "cpu" and torch.equal(loaded["model"]["w"], torch.ones(2, 3))
    assert torch.equal(loaded["assignment"], torch.arange(4))


@pytest.mark.slow
def test_a_gpu_run_resumes_and_evaluates_on_the_cpu(tmp_path, shape_folder, monkeypatch, capsys):
    """A run whose checkpoints and model file were written on a GPU (every tensor tagged cuda:0)
    continues on a machine without one: weights, Adam state and meta-classes load on the CPU."""
    out = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG.format(root=shape_folder, out=out))
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        assert main(["train", str(config), "--quiet"]) == 0
    assert _gpu_tagged(out / "last.pt") and _gpu_tagged(out / "model.pt")
    assert main(["train", str(config), "--quiet", "--resume", "train.epochs=2"]) == 0
    state, _ = load_checkpoint(out)
    assert state["epoch"] == 2
    assert all(t.device.type == "cpu" for t in state["model"].values())
    model, _ = load_model(out / "model.pt")
    assert all(p.device.type == "cpu" for p in model.parameters())
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(out / "model.pt"),
                "--workers",
                "0",
                "--no-clustering",
                "--quiet",
                "--out",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    final = json.loads((out / "final_metrics.json").read_text())
    assert json.loads((tmp_path / "m.json").read_text())["recall@1"] == pytest.approx(final["recall@1"])


class _FakeCudaRng:
    """torch.cuda's generator state, faked: the trainer's code path for a GPU run, without one."""

    def __init__(self) -> None:
        self.state = torch.arange(16, dtype=torch.uint8)
        self.set_calls: list[tuple[torch.Tensor, torch.device]] = []

    def get(self, device: torch.device) -> torch.Tensor:
        assert device == torch.device("cuda", 0)
        return self.state.clone()

    def set(self, state: torch.Tensor, device: torch.device) -> None:
        self.set_calls.append((state, device))


def _trainer_on(device: torch.device) -> Trainer:
    cfg = SimpleNamespace(train=SimpleNamespace(epochs=1, finetune_epochs=0))
    return Trainer(SimpleNamespace(cfg=cfg, device=device), log=lambda _: None)  # type: ignore[arg-type]


def test_a_gpu_run_checkpoints_and_restores_its_gpu_random_state(monkeypatch):
    fake = _FakeCudaRng()
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set)
    trainer = _trainer_on(torch.device("cuda", 0))
    rng = trainer._rng_state()
    assert torch.equal(rng["cuda"], fake.state)
    # It is what a checkpoint holds: saved and loaded weights-only, accepted by the key check.
    buffer = io.BytesIO()
    torch.save({"rng": rng}, buffer)
    rng = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)["rng"]
    require_keys({"rng": rng}, ("rng",), "last.pt")
    expected_cpu = rng["torch"].clone()
    torch.manual_seed(123)
    random.seed(123)
    trainer._restore_rng({"rng": rng})
    assert torch.equal(torch.get_rng_state(), expected_cpu)
    assert len(fake.set_calls) == 1
    restored, device = fake.set_calls[0]
    assert torch.equal(restored, fake.state) and device == torch.device("cuda", 0)


def test_the_gpu_random_state_is_left_alone_on_the_cpu(monkeypatch):
    fake = _FakeCudaRng()
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set)
    trainer = _trainer_on(torch.device("cpu"))
    rng = trainer._rng_state()
    assert "cuda" not in rng
    trainer._restore_rng({"rng": {**rng, "cuda": fake.state}})  # a GPU run's checkpoint resumed on the CPU
    assert fake.set_calls == []


def test_per_learner_meta_classes_take_embeddings_that_are_still_in_a_graph():
    """Refreshes convert embeddings with detach().cpu(): a tensor in an autograd graph (or on a GPU,
    see tests/distributed/test_distributed_cuda.py) gives the same partitions as its numpy copy."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 3)
    embeddings = torch.from_numpy(rng.normal(size=(len(labels), 8)).astype(np.float32))
    per_learner = PerLearnerMetaClasses(build_strategy("class_proxy", num_metaclasses=2), num_learners=2)
    slices = [slice(0, 4), slice(4, 8)]
    expected = per_learner.assign(embeddings.numpy(), labels, 8, slices, seed=3)
    in_graph = embeddings.clone().requires_grad_(True) * 1.0
    assert np.array_equal(per_learner.assign(in_graph, torch.from_numpy(labels), 8, slices, seed=3), expected)
