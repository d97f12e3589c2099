"""2 gloo processes train exactly like 1 process, write like 1 process, and resume after a kill.

The run: resnet18 from scratch at 32 px (frozen trunk BatchNorm, the default; the head's
BatchNorm trains, over the global batch), K=2, 2 epochs of 5 steps with a class-proxy refresh
before each.

Why small learning rates: the two runs' gradients agree to float rounding (tests in
test_distributed_loss.py), but Adam's step ``lr * m / (sqrt(v) + eps)`` is about ``lr * sign(g)``
for an entry whose gradient is itself at rounding level, so such entries can move apart by up to
2 lr per step (measured: 6e-5 after 6 steps at lr 1e-3 on this randomly initialised trunk, the
trunk's own entries more), and the runs then drift apart chaotically. At head lr 1e-4 and trunk lr
1e-6 the per-step differences stay at rounding level, which is what these tests compare.
Global batches are 3 classes x 2 images, 3 rows per rank, so one class is split across the ranks
(its anchor's only positive is on the other rank) in every batch.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_helpers import run_ranks
from gce.config import load_config
from gce.distributed import SINGLE
from gce.distributed.launch import FRESH_STORE_PER_RESTART
from gce.distributed.training import DistributedTrainer, build_run, local_rows
from gce.training.checkpoint import load_checkpoint

WORLD = 2
CONFIG = """\
name: ddp-test
data: {{dataset: folder, root: {root}, image_size: 32, test_resize: 32, workers: 0,
        options: {{test_fraction: 0.25, seed: 0}}}}
model: {{backbone: resnet18, head: gce, num_learners: 2, embedding_dim: 16, pretrained: false}}
metaclass: {{strategy: class_proxy, update_every: 1}}
sampler: {{classes_per_batch: 3, samples_per_class: 2, batches_per_epoch: 5}}
optim: {{name: adam, lr: 1.0e-4, backbone_lr: 1.0e-6}}
train: {{epochs: 2, seed: 0, out_dir: {out}, eval_test_every: 1, num_threads: 1}}
eval: {{batch_size: 5}}
"""
KILL_AFTER_STEPS = 7  # rank 1 dies in the middle of epoch 1


def write_config(folder: Path, root: Path, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(CONFIG.format(root=root, out=folder / name))
    return path


def _train(ctx, config: str, resume: bool = False, kill_after: int | None = None) -> dict:
    cfg = load_config(config)
    trainer = build_run(cfg, ctx, resume=resume, progress=False, log=lambda _: None)
    refreshes: list = []
    update = trainer.parts.reading.update

    def record(epoch, embeddings):
        out = update(epoch, embeddings)
        refreshes.append(trainer.parts.reading.assignment.copy())
        return out

    trainer.parts.reading.update = record  # type: ignore[method-assign]
    if kill_after is not None and ctx.rank == 1:
        step, steps = trainer._step, [0]

        def step_then_die(*args):
            steps[0] += 1
            if steps[0] > kill_after:
                os._exit(9)  # like SIGKILL: no clean-up, no checkpoint
            return step(*args)

        trainer._step = step_then_die  # type: ignore[method-assign]
    result = trainer.run()
    return {
        "result": result.to_dict(),
        "refreshes": refreshes,
        "type": type(trainer).__name__,
        "rng": (torch.get_rng_state(), random.getstate()),
    }


def _single(config: Path) -> dict:
    threads = torch.get_num_threads()
    try:
        return _train(SINGLE, str(config))
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


def records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def weights(out: Path) -> dict[str, torch.Tensor]:
    state, _ = load_checkpoint(out / "model.pt")
    return state["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shape_folder) -> dict:
    folder = tmp_path_factory.mktemp("ddp")
    single = _single(write_config(folder, shape_folder, "single"))
    ranks = run_ranks(_train, WORLD, str(write_config(folder, shape_folder, "ddp")))
    return {"folder": folder, "single": single, "ranks": ranks}


def test_batches_split_into_consecutive_rows():
    assert [local_rows(6, r, 2) for r in range(2)] == [slice(0, 3), slice(3, 6)]
    assert [local_rows(7, r, 3) for r in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 7)]


def test_two_processes_train_like_one(runs):
    folder, single, ranks = runs["folder"], runs["single"], runs["ranks"]
    assert [r["type"] for r in ranks] == [DistributedTrainer.__name__] * WORLD
    one, two = records(folder / "single"), records(folder / "ddp")
    assert [(r["event"], r["epoch"]) for r in one] == [(r["event"], r["epoch"]) for r in two]
    losses = [(a["loss"], b["loss"]) for a, b in zip(one, two, strict=True) if a["event"] == "train"]
    assert len(losses) == 2 and all(a > 0 for a, _ in losses)
    for a, b in losses:
        assert b == pytest.approx(a, abs=1e-6)
    for a, b in zip(one, two, strict=True):
        if a["event"] == "train":
            assert a["triplets_per_step"] == b["triplets_per_step"]
    reference = weights(folder / "single")
    for name, tensor in weights(folder / "ddp").items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-5, rtol=0, msg=name)
    assert all(r["result"] == ranks[0]["result"] for r in ranks)
    for key, value in single["result"].items():
        assert ranks[0]["result"][key] == pytest.approx(value, abs=1e-6), key


def test_metaclass_refreshes_equal_one_process_exactly(runs):
    single, ranks = runs["single"], runs["ranks"]
    assert len(single["refreshes"]) == 2
    for r in ranks:
        assert all((a == b).all() for a, b in zip(r["refreshes"], single["refreshes"], strict=True))


def test_only_rank_zero_writes(runs):
    out = runs["folder"] / "ddp"
    assert len(list((out / "tensorboard").iterdir())) == 1
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    assert names == sorted(p.name for p in (runs["folder"] / "single").iterdir() if p.is_file())
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries, no probes


def test_checkpoint_holds_every_ranks_rng_state(runs):
    state, _ = load_checkpoint(runs["folder"] / "ddp")
    assert len(state["rng"]["ranks"]) == WORLD
    for rank, run in enumerate(runs["ranks"]):  # each rank's state at the end is the one saved for it
        assert torch.equal(state["rng"]["ranks"][rank]["torch"], run["rng"][0])


def test_killed_and_resumed_equals_uninterrupted(runs, shape_folder):
    folder = runs["folder"]
    config = write_config(folder, shape_folder, "killed")
    died = run_ranks(_train, WORLD, str(config), False, KILL_AFTER_STEPS, allow_failure=True)
    assert died == [None, None]  # rank 1 died, rank 0 failed on the lost connection
    state, _ = load_checkpoint(folder / "killed")
    assert (state["epoch"], state["batch"]) == (1, 0)
    resumed = run_ranks(_train, WORLD, str(config), True)
    for name, tensor in weights(folder / "killed").items():
        assert torch.equal(tensor, weights(folder / "ddp")[name]), name
    assert records(folder / "killed") == records(folder / "ddp")
    assert resumed[0]["result"] == runs["ranks"][0]["result"]


def test_a_worker_killed_under_max_restarts_restarts_on_its_own_and_equals_uninterrupted(runs, shape_folder):
    """``torchrun --max-restarts=1``: rank 1 dies mid-epoch 1, the launcher starts both workers
    again, they resume from ``last.pt`` by themselves and end with the uninterrupted run's weights."""
    folder = runs["folder"]
    config = write_config(folder, shape_folder, "restarted")
    repo = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(repo / "src"), str(repo / "tests")]),
        FRESH_STORE_PER_RESTART[0]: FRESH_STORE_PER_RESTART[1],
    }  # what gce train --nproc sets
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "--max-restarts=1",
            str(repo / "tests" / "faulty_worker.py"),
            str(KILL_AFTER_STEPS),
            str(folder / "rank1-died"),
            "train",
            str(config),
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (folder / "rank1-died").exists()  # the first attempt did fail
    for name, tensor in weights(folder / "restarted").items():
        assert torch.equal(tensor, weights(folder / "ddp")[name]), name
    assert records(folder / "restarted") == records(folder / "ddp")
