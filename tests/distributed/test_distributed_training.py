"""2 gloo processes train like 1 process, write like 1 process, and resume after a kill.

The run: resnet18 from scratch at 32 px (frozen trunk BatchNorm, the default; the head's
BatchNorm trains, over the global batch), K=2, 2 epochs of 5 steps with a class-proxy refresh
before each. Global batches are 3 classes x 2 images, 3 rows per rank, so one class is split across
the ranks (its anchor's only positive is on the other rank) in every batch.

What "2 processes train like 1" means, and how each part is tested (tolerances: tests/helpers/numerics.py):

- Every step computes the same function of the same weights and images; only the order of float
  sums differs (the head's BatchNorm statistics, the gradient all-reduce, kernels blocked for 3
  rows instead of 6). So each step's loss and gradients agree to rounding level, and under plain
  SGD at a small learning rate the weights stay within the sum of the steps' rounding: the SGD
  runs below compare every step's loss, triplet count and gradients, and the final weights.
- Adam does not keep that: its step ``lr * m / (sqrt(v) + eps)`` is about ``lr * sign(g)`` for an
  entry whose gradient is itself at rounding level, so such an entry can move apart by up to
  2 lr per step (measured: 1e-5 after 10 steps of head lr 1e-4 on some machines), and from there
  the runs drift apart. The Adam runs are held to what Adam guarantees, ``lr * steps`` (see
  numerics.adam_step_bound), and are the reference of the kill and restart tests (bit for bit:
  the same path twice, not two paths).
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

from gce.config import load_config
from gce.distributed import SINGLE
from gce.distributed.launch import FRESH_STORE_PER_RESTART
from gce.distributed.training import DistributedTrainer, build_run, local_rows
from gce.training.checkpoint import load_checkpoint
from helpers.distributed_helpers import run_ranks
from helpers.numerics import (
    RESNET18_GCE_DEPTH,
    RESNET18_LONGEST_SUM,
    THREADS,
    adam_step_bound,
    reordered,
    triplet_grad_rtol,
    triplet_loss_atol,
    ulp,
    ulps,
)

WORLD = 2
CONFIG = """\
name: ddp-test
data: {{dataset: folder, root: {root}, image_size: 32, test_resize: 32, workers: 0,
        options: {{test_fraction: 0.25, seed: 0}}}}
model: {{backbone: resnet18, head: gce, num_learners: 2, embedding_dim: 16, pretrained: false}}
metaclass: {{strategy: class_proxy, update_every: 1}}
sampler: {{classes_per_batch: 3, samples_per_class: 2, batches_per_epoch: 5}}
optim: {optim}
train: {{epochs: 2, seed: 0, out_dir: {out}, eval_test_every: 1, num_threads: {threads}}}
eval: {{batch_size: 5}}
"""
ADAM = {"name": "adam", "lr": 1.0e-4, "backbone_lr": 1.0e-6}
SGD = {"name": "sgd", "lr": 1.0e-5, "backbone_lr": 1.0e-5, "momentum": 0.0}  # plain SGD: w -= lr * (g + wd * w)
STEPS = 10
KILL_AFTER_STEPS = 7  # rank 1 dies in the middle of epoch 1

# A step's loss through resnet18 + the head (22 sums of <= 4608 terms; numerics.triplet_loss_atol):
# 7.1e-4 (a step's loss is 1e-2..1e-1 here, a triplet more or less changes it by about that much).
LOSS_ATOL = triplet_loss_atol(RESNET18_LONGEST_SUM, RESNET18_GCE_DEPTH)
# A step's gradient, per tensor, normwise, at the config's default margin 0.1
# (numerics.triplet_grad_rtol): 3.6e-3 of the tensor's gradient norm.
GRAD_RTOL = triplet_grad_rtol(RESNET18_LONGEST_SUM, RESNET18_GCE_DEPTH, margin=0.1)
# The head's BatchNorm running statistics: averages of batch statistics of the forward chain.
BUFFER_RTOL = reordered(RESNET18_LONGEST_SUM, RESNET18_GCE_DEPTH)
SAMPLED = 8192  # entries of each gradient tensor kept per step (evenly strided) for the comparison


def write_config(folder: Path, root: Path, name: str, optim: dict | None = None) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(CONFIG.format(root=root, out=folder / name, threads=THREADS, optim=json.dumps(optim or ADAM)))
    return path


def _sample(g: torch.Tensor) -> torch.Tensor:
    flat = g.detach().flatten()
    return flat[:: max(1, flat.numel() // SAMPLED)].clone()


def _train(ctx, config: str, resume: bool = False, kill_after: int | None = None, steps: bool = False) -> dict:
    cfg = load_config(config)
    trainer = build_run(cfg, ctx, resume=resume, progress=False, log=lambda _: None)
    refreshes: list = []
    update = trainer.parts.reading.update

    def record(epoch, embeddings):
        out = update(epoch, embeddings)
        refreshes.append(trainer.parts.reading.assignment.copy())
        return out

    trainer.parts.reading.update = record  # type: ignore[method-assign]
    step = trainer._step
    if kill_after is not None and ctx.rank == 1:
        done = [0]

        def step_then_die(*args):
            done[0] += 1
            if done[0] > kill_after:
                os._exit(9)  # like SIGKILL: no clean-up, no checkpoint
            return step(*args)

        trainer._step = step_then_die  # type: ignore[method-assign]
    per_step: list = []  # (loss, triplets, {name: (gradient norm, sampled gradient)})
    if steps:
        model = trainer.parts.model
        first = {n: p.detach().clone() for n, p in model.named_parameters()}

        def gradients(*_):  # after DDP's all-reduce: the gradient the optimizer applies
            per_step[-1][2].update(
                {
                    n: (float(p.grad.double().norm()), _sample(p.grad))
                    for n, p in model.named_parameters()
                    if p.grad is not None
                }
            )

        def step_and_record(*args):
            per_step.append([None, None, {}])
            per_step[-1][:2] = step(*args)
            return tuple(per_step[-1][:2])

        trainer.parts.optimizer.register_step_pre_hook(gradients)
        trainer._step = step_and_record  # type: ignore[method-assign]
    result = trainer.run()
    out = {
        "result": result.to_dict(),
        "refreshes": refreshes,
        "steps": per_step,
        "type": type(trainer).__name__,
        "rng": (torch.get_rng_state(), random.getstate()),
    }
    if steps and not ctx.enabled:
        out["moved"] = {n: float((p.detach() - first[n]).double().norm()) for n, p in model.named_parameters()}
    return out if ctx.rank == 0 or not steps else {k: out[k] for k in ("result", "refreshes", "type")}


def _single(config: Path, steps: bool = False) -> dict:
    threads = torch.get_num_threads()
    try:
        return _train(SINGLE, str(config), steps=steps)
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
    """Adam, the configs' optimizer: the reference of the kill and restart tests."""
    folder = tmp_path_factory.mktemp("ddp")
    single = _single(write_config(folder, shape_folder, "single"))
    ranks = run_ranks(_train, WORLD, str(write_config(folder, shape_folder, "ddp")))
    return {"folder": folder, "single": single, "ranks": ranks}


@pytest.fixture(scope="module")
def sgd_runs(tmp_path_factory, shape_folder) -> dict:
    """Plain SGD, every step's loss, triplet count and gradients recorded."""
    folder = tmp_path_factory.mktemp("ddp-sgd")
    single = _single(write_config(folder, shape_folder, "single", SGD), steps=True)
    ranks = run_ranks(_train, WORLD, str(write_config(folder, shape_folder, "ddp", SGD)), False, None, True)
    return {"folder": folder, "single": single, "ranks": ranks}


def test_batches_split_into_consecutive_rows():
    assert [local_rows(6, r, 2) for r in range(2)] == [slice(0, 3), slice(3, 6)]
    assert [local_rows(7, r, 3) for r in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 7)]


def test_every_step_of_two_processes_equals_one_process_to_rounding(sgd_runs):
    one, two = sgd_runs["single"]["steps"], sgd_runs["ranks"][0]["steps"]
    assert len(one) == len(two) == STEPS and sum(t for _, t, _ in one) > 0
    for step, ((loss, triplets, grads), (r_loss, r_triplets, r_grads)) in enumerate(zip(one, two, strict=False)):
        assert r_loss == pytest.approx(loss, abs=LOSS_ATOL), step
        # Discrete: a triplet flips only if it lies within rounding (< LOSS_ATOL) of a mining boundary.
        assert r_triplets == triplets, step
        assert r_grads.keys() == grads.keys(), step
        for name, (_, g) in grads.items():
            difference = float((r_grads[name][1] - g).double().norm())
            assert difference <= GRAD_RTOL * float(g.double().norm()), (step, name, difference)


def test_two_processes_end_with_the_weights_of_one_under_sgd(sgd_runs):
    folder, single = sgd_runs["folder"], sgd_runs["single"]
    reference, lrs = weights(folder / "single"), {"trunk": SGD["backbone_lr"], "head": SGD["lr"]}
    trained = 0
    for name, tensor in weights(folder / "ddp").items():
        if name in single["moved"]:  # a parameter: normwise, each step adds lr * (its gradient difference),
            # <= lr * GRAD_RTOL * ||g||, and each run rounds w - lr * g to float32 (<= ulp/2 an entry).
            drift = sum(lrs[name.split(".")[0]] * GRAD_RTOL * s[2][name][0] for s in single["steps"] if name in s[2])
            rounding = STEPS * float(ulps(reference[name]).norm())
            bound = drift + rounding
            assert float((tensor - reference[name]).double().norm()) <= bound, name
            if tensor.dim() > 1:  # not vacuous: training moved every conv/linear weight well beyond its
                # bound (a BatchNorm scale, near 1, moves less than its own rounding in 10 steps at lr 1e-5)
                assert single["moved"][name] > 10 * bound, (name, single["moved"][name], bound)
                trained += 1
        elif tensor.is_floating_point():  # the head's BatchNorm running statistics
            torch.testing.assert_close(
                tensor, reference[name], rtol=0, atol=BUFFER_RTOL * float(reference[name].abs().max()), msg=name
            )
        else:
            assert torch.equal(tensor, reference[name]), name
    assert trained == 22  # resnet18's 20 convolutions, the head's block and its embedding


def test_two_processes_log_and_evaluate_like_one(sgd_runs):
    folder, single, ranks = sgd_runs["folder"], sgd_runs["single"], sgd_runs["ranks"]
    assert [r["type"] for r in ranks] == [DistributedTrainer.__name__] * WORLD
    one, two = records(folder / "single"), records(folder / "ddp")
    assert [(r["event"], r["epoch"]) for r in one] == [(r["event"], r["epoch"]) for r in two]
    for a, b in zip(one, two, strict=False):
        if a["event"] == "train":
            assert b["loss"] == pytest.approx(a["loss"], abs=LOSS_ATOL)  # a mean of step losses
            assert a["triplets_per_step"] == b["triplets_per_step"]
    assert all(r["result"] == ranks[0]["result"] for r in ranks)
    # Recall, MAP@R, ...: functions of the neighbour ranking, which rounding changes only at near-ties.
    assert ranks[0]["result"] == single["result"]


def test_metaclass_refreshes_equal_one_process_exactly(sgd_runs):
    single, ranks = sgd_runs["single"], sgd_runs["ranks"]
    assert len(single["refreshes"]) == 2
    for r in ranks:
        assert all((a == b).all() for a, b in zip(r["refreshes"], single["refreshes"], strict=True))


def test_adam_runs_stay_within_what_adam_can_move_in_their_steps(runs):
    folder, single, ranks = runs["folder"], runs["single"], runs["ranks"]
    assert [r["type"] for r in ranks] == [DistributedTrainer.__name__] * WORLD
    one, two = records(folder / "single"), records(folder / "ddp")
    assert [(r["event"], r["epoch"]) for r in one] == [(r["event"], r["epoch"]) for r in two]
    reference, lrs = weights(folder / "single"), {"trunk": ADAM["backbone_lr"], "head": ADAM["lr"]}
    moves = sum(adam_step_bound(t) for t in range(1, STEPS + 1))  # 10.2: each run's step <= lr * bound(t)
    for name, tensor in weights(folder / "ddp").items():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # statistics of batches that went through the drifted weights: no bound from lr
        # Both runs start from the same weights; each moves by <= lr * moves, and rounds each step (<= ulp/2).
        bound = 2 * lrs[name.split(".")[0]] * moves + STEPS * ulp(reference[name])
        assert float((tensor - reference[name]).abs().max()) <= bound, name
    assert all(r["result"] == ranks[0]["result"] for r in ranks)
    assert len(single["refreshes"]) == 2


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
    repo = Path(__file__).resolve().parents[2]
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
            str(repo / "tests" / "helpers" / "faulty_worker.py"),
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
