"""End-to-end training on a tiny generated dataset: loss goes down, checkpoints, exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from gce.cli import main
from gce.config import load_config
from gce.errors import GceError
from gce.training.checkpoint import load_checkpoint, load_model
from gce.training.trainer import Trainer
from helpers.numerics import RESNET18_GCE_DEPTH, RESNET18_LONGEST_SUM, THREADS, triplet_grad_rtol, triplet_loss_atol
from helpers.tiny_training import run_train, write_config


@pytest.mark.slow
def test_train_resume_and_eval_end_to_end(tmp_path, shape_folder, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path, shape_folder, out)
    assert run_train(config) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert [r["epoch"] for r in records if r["event"] == "test"] == [0, 1, 2]
    updates = [r for r in records if r["event"] == "metaclass"]
    assert len(updates) == 3 and all(sum(u["classes_per_learner"]) == 6 for u in updates)
    state, _ = load_checkpoint(out)
    assert state["epoch"] == 3 and state["batch"] == 0
    final = json.loads((out / "final_metrics.json").read_text())
    assert 0.0 <= final["recall@1"] <= 1.0

    # Resume from the epoch-1 checkpoint in a second folder: same weights and log as the full run.
    resumed = tmp_path / "resumed"
    config2 = write_config(tmp_path, shape_folder, resumed)
    assert run_train(config2, "train.epochs=1") == 0  # stops after epoch 0: a checkpoint at epoch 1
    assert run_train(config2, "--resume") == 0  # the epoch budget may grow on resume
    state_resumed, _ = load_checkpoint(resumed)
    for key, tensor in state["model"].items():
        assert torch.equal(tensor, state_resumed["model"][key]), key
    full_log = [r for r in records if r["event"] in ("train", "test")]
    resumed_log = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    resumed_log = [r for r in resumed_log if r["event"] in ("train", "test")]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(resumed_log) == strip(full_log)

    # The exported model evaluates through the CLI.
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "model.pt"), "--quiet", "--out", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    assert "R@1" in printed or "recall@1" in printed.lower()
    assert json.loads((tmp_path / "m.json").read_text())["recall@1"] == pytest.approx(final["recall@1"])


def test_refuses_to_overwrite_a_run_and_checks_resume_config(tmp_path, shape_folder):
    out = tmp_path / "run"
    config = write_config(tmp_path, shape_folder, out)
    assert run_train(config, "train.epochs=1", "sampler.batches_per_epoch=1", "train.eval_test_every=0") == 0
    with pytest.raises(GceError, match="already holds a run"):
        Trainer.from_config(load_config(config, ["train.epochs=1"]), progress=False).run()
    assert run_train(config, "--resume", "model.embedding_dim=64", "train.epochs=2") == 1


def test_loaded_model_matches_trained(tmp_path, shape_folder):
    out = tmp_path / "run"
    config = write_config(tmp_path, shape_folder, out)
    assert run_train(config, "train.epochs=1", "sampler.batches_per_epoch=2", "train.eval_test_every=0") == 0
    model, cfg = load_model(out / "model.pt")
    assert cfg.model.num_learners == 2
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    assert y.shape == (2, 32)
    assert torch.allclose(y[:, :16].norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.num_learners=4", "model.embedding_dim=32"], "needs at least 8 training classes"),
        (["sampler.classes_per_batch=7"], "sampler.classes_per_batch=7 is larger than the 6 training classes"),
    ],
)
def test_impossible_sampler_settings_fail_before_training(tmp_path, shape_folder, overrides, message, capsys):
    config = write_config(tmp_path, shape_folder, tmp_path / "run")
    assert run_train(config, *overrides) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_loader_workers_persist_between_epochs_and_change_nothing(tmp_path, shape_folder):
    """data.workers=2 (one DataLoader, its workers kept over the 2 epochs) trains exactly like 0."""
    weights = {}
    for workers in (0, 2):
        config = write_config(tmp_path, shape_folder, tmp_path / f"w{workers}")
        assert (
            run_train(
                config,
                "train.epochs=2",
                "sampler.batches_per_epoch=2",
                "train.eval_test_every=0",
                f"data.workers={workers}",
            )
            == 0
        )
        weights[workers] = load_checkpoint(tmp_path / f"w{workers}")[0]["model"]
    for key, tensor in weights[0].items():
        assert torch.equal(tensor, weights[2][key]), key


@pytest.mark.parametrize("option", ["train.channels_last=true", "train.compile=true"])
def test_channels_last_and_compile_compute_the_plain_step(tmp_path, shape_folder, option):
    """A training step with the option: other kernels, the same loss and gradients up to rounding."""
    torch.manual_seed(1)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 2])
    steps = {}
    threads = f"train.num_threads={THREADS}"
    for name, extra in (("plain", [threads]), ("option", [option, threads])):
        config = write_config(tmp_path, shape_folder, tmp_path / name)
        trainer = Trainer.from_config(load_config(config, extra), progress=False)
        loss, _ = trainer._step(images, labels, None)
        steps[name] = loss, {n: p.grad for n, p in trainer.parts.model.named_parameters() if p.grad is not None}
    # Other kernels, other sum orders through resnet18 + the head (tests/helpers/numerics.py): 7.1e-4.
    loss_atol = triplet_loss_atol(RESNET18_LONGEST_SUM, RESNET18_GCE_DEPTH)
    assert steps["option"][0] == pytest.approx(steps["plain"][0], abs=loss_atol)
    assert steps["option"][1].keys() == steps["plain"][1].keys()
    rtol = triplet_grad_rtol(RESNET18_LONGEST_SUM, RESNET18_GCE_DEPTH, margin=0.1)  # 3.6e-3 of each gradient's norm
    for name, grad in steps["plain"][1].items():  # relative to the gradient's norm: rounding, not a change
        assert (steps["option"][1][name] - grad).norm() <= rtol * grad.norm(), name
