"""The other losses per learner (Proxy Anchor, Normalized Softmax, ArcFace, Multi-Similarity): built by
``loss.name``, applied to one learner's slice, proxies trained, checkpointed and kept equal over ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gce.cli import main
from gce.config import load_config
from gce.config.vocabulary import LOSS_NAMES, PROXY_LOSSES
from gce.distributed import SINGLE
from gce.distributed.loss import GatheredGCELoss, distributed_loss
from gce.errors import ConfigError
from gce.losses import GCELoss, ZooGCELoss
from gce.losses.zoo import proxy_rows
from gce.metaclass.proxies import class_proxies
from gce.training.checkpoint import load_checkpoint
from gce.training.parts import build_run_loss
from gce.training.proxy_warm_start import ProxyWarmStart
from gce.training.readings import MetaClassUpdate
from helpers.distributed_helpers import run_ranks
from helpers.numerics import reordered

ZOO = [name for name in LOSS_NAMES if name != "triplet"]
SLICES = [slice(0, 4), slice(4, 8)]
CLASSES = 6


def _cfg(name: str, *extra: str):
    return load_config(None, ["data.dataset=emoji", "data.root=x", f"loss.name={name}", *extra])


def _loss(name: str, *extra: str) -> ZooGCELoss:
    loss = build_run_loss(_cfg(name, "model.num_learners=2", "model.embedding_dim=8", *extra), SLICES, CLASSES)
    assert isinstance(loss, ZooGCELoss)
    return loss


def _batch(seed: int = 0, per_class: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    return torch.randn(len(labels), 8, generator=g), labels


# ----------------------------------------------------------------------------- building
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_name_builds_its_loss_with_proxies_sized_per_learner(name):
    loss = build_run_loss(
        _cfg(name, "model.num_learners=2", "model.embedding_dim=8", "loss.full_embedding_weight=0.5"), SLICES, CLASSES
    )
    if name == "triplet":
        assert type(loss) is GCELoss and not list(loss.parameters())
        return
    assert isinstance(loss, ZooGCELoss)
    shapes = {n: tuple(p.shape) for n, p in loss.named_parameters()}
    if name == "multi_similarity":
        assert shapes == {} and loss.count_name == "pairs"
        return
    # Learner k: one proxy per training class, of its slice's dimension; whole embedding: of all 8.
    rows = [tuple(proxy_rows(m.loss).shape) for m in (*loss.learners, loss.full)]
    assert rows == [(CLASSES, 4), (CLASSES, 4), (CLASSES, 8)]
    assert len(shapes) == 3


def test_proxies_follow_the_reading_and_the_terms_the_run_uses():
    # learner_data=all: a learner's labels are its meta-classes.
    loss = _loss("proxy_anchor", "metaclass.learner_data=all", "metaclass.num_metaclasses=3")
    assert [tuple(m.loss.proxies.shape) for m in loss.learners] == [(3, 4), (3, 4)]
    assert loss.full is None  # unweighted, no fine-tuning: no whole-embedding proxies
    assert _loss("proxy_anchor", "train.finetune_epochs=1").full is not None
    single = build_run_loss(_cfg("arcface", "model.num_learners=1", "metaclass.strategy=none"), [slice(0, 8)], 6)
    assert isinstance(single, ZooGCELoss) and len(single.learners) == 0 and single.full is not None
    # Seeded from train.seed with the global RNG forked: reproducible, and the run's stream unchanged.
    state = torch.get_rng_state()
    again = _loss("proxy_anchor", "metaclass.learner_data=all", "metaclass.num_metaclasses=3")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(again.learners[0].loss.proxies, loss.learners[0].loss.proxies)


def test_unknown_name_and_warm_start_without_proxies_are_one_line_config_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"loss\.name") as err:
        _cfg("proxy_anchr")
    assert "\n" not in str(err.value) and "proxy_anchor" in str(err.value)
    with pytest.raises(ConfigError, match=r"proxy_warm_start=true needs a loss with proxies") as err:
        _cfg("multi_similarity", "loss.proxy_warm_start=true")
    assert "\n" not in str(err.value)
    assert main(["train", "emoji", "data.root=x", "loss.name=nope", f"train.out_dir={tmp_path}/r"]) != 0
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_the_proxies_get_their_own_param_group_at_the_multiplied_lr():
    from gce.models import build_model
    from gce.training.optim import build_optimizer

    cfg = _cfg(
        "normalized_softmax", "model.backbone=resnet18", "model.num_learners=2", "model.embedding_dim=8",
        "model.pretrained=false", "optim.lr=0.001", "loss.proxy_lr_multiplier=50",
    )  # fmt: skip
    model = build_model(cfg.model)
    loss = build_run_loss(cfg, model.learner_slices(), CLASSES)
    groups = build_optimizer(model, cfg, loss).param_groups
    assert groups[0]["name"] == "loss" and groups[0]["lr"] == pytest.approx(0.05)
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in loss.parameters()}
    assert groups[-1]["name"] == "head" and groups[-1]["lr"] == 0.001  # the logged lr is still the head's
    triplet = build_optimizer(model, cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"name": "triplet"})}))
    assert [g["name"] for g in triplet.param_groups] == [g["name"] for g in groups[1:]]


# ------------------------------------------------------------------------ one learner's term
@pytest.mark.parametrize("name", ZOO)
def test_a_learner_term_touches_only_its_slice_and_its_own_proxies(name):
    loss = _loss(name)
    x, labels = _batch()
    x.requires_grad_(True)
    total, parts = loss(x, labels, SLICES[1])
    assert "full_loss" not in parts and torch.isfinite(total)
    total.backward()
    assert torch.all(x.grad[:, :4] == 0) and x.grad[:, 4:].abs().sum() > 0
    if name in PROXY_LOSSES:
        grads = [next(m.parameters()).grad for m in loss.learners]
        assert grads[0] is None and grads[1] is not None and grads[1].abs().sum() > 0
    else:
        assert parts["pairs"] > 0


@pytest.mark.parametrize("name", ZOO)
def test_training_a_linear_embedding_lowers_the_loss_and_moves_the_proxies(name):
    """A few Adam steps on a linear embedding of separable points, each learner in turn."""
    torch.manual_seed(0)
    loss = _loss(name, "loss.full_embedding_weight=0.5")
    centres = torch.randn(CLASSES, 5) * 3
    labels = torch.arange(CLASSES).repeat_interleave(4)
    inputs = centres[labels] + 0.3 * torch.randn(len(labels), 5)
    layer = nn.Linear(5, 8)
    groups = [{"params": layer.parameters(), "lr": 1e-2}]
    if list(loss.parameters()):
        groups.append({"params": loss.parameters(), "lr": 1e-1})
    optimizer = torch.optim.Adam(groups)
    before = [p.detach().clone() for p in loss.parameters()]

    def step(k: int) -> float:
        z = torch.cat([F.normalize(layer(inputs)[:, s], dim=1) for s in SLICES], dim=1)
        total, _ = loss(z, labels, SLICES[k])
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        return total.item()

    losses = [step(i % 2) for i in range(40)]
    assert all(np.isfinite(losses))
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.8 * first, (first, last)
    assert all(not torch.equal(b, p) for b, p in zip(before, loss.parameters(), strict=True))


# ---------------------------------------------------------------------------- warm start
class _Reading:
    needs_embeddings = False

    def __init__(self, assignment: np.ndarray) -> None:
        self.assignment = None
        self._next = assignment

    def update(self, epoch, embeddings):
        self.assignment = self._next
        return MetaClassUpdate({"moved_fraction": 0.0}, "meta-classes updated")


@pytest.mark.parametrize("learner_data", ["subset", "all"])
def test_warm_start_sets_the_proxies_to_the_class_proxies_of_each_slice(learner_data):
    extra = ["loss.proxy_warm_start=true", "loss.full_embedding_weight=0.5"]
    if learner_data == "all":
        extra += ["metaclass.learner_data=all", "metaclass.num_metaclasses=3"]
    loss = _loss("normalized_softmax", *extra)
    x, labels = _batch(3)
    keep = labels != 5  # class 5 has no image: its proxies stay
    x, labels = x[keep], labels[keep]
    meta = np.array([[0, 0, 1, 1, 2, 2], [0, 1, 2, 0, 1, 2]])
    old = [proxy_rows(m.loss).detach().clone() for m in (*loss.learners, loss.full)]
    reading = ProxyWarmStart(
        _Reading(meta if learner_data == "all" else np.zeros(6, dtype=np.int64)), loss, labels.numpy(), 6
    )
    assert reading.needs_embeddings  # whatever the strategy: the warm start needs the pass
    update = reading.update(0, x)
    for k, (part, module) in enumerate(zip(SLICES, loss.learners, strict=True)):
        if learner_data == "all":
            expected = class_proxies(x[:, part], torch.from_numpy(meta[k])[labels], 3)
            assert torch.equal(proxy_rows(module.loss), expected)
        else:
            expected = class_proxies(x[:, part], labels, 6)
            assert torch.equal(proxy_rows(module.loss)[:5], expected[:5])
            assert torch.equal(proxy_rows(module.loss)[5], old[k][5])
    assert torch.equal(proxy_rows(loss.full.loss)[:5], class_proxies(x, labels, 6)[:5])
    per_learner = 3 if learner_data == "all" else 5
    assert update.values["proxies_warm_started"] == 2 * per_learner + 5
    assert update.values["moved_fraction"] == 0.0 and "warm-started" in update.message


# ------------------------------------------------------------------- run: resume bit-exact
RUN = """
name: tiny-proxy
data: {{dataset: folder, root: {root}, image_size: 32, test_resize: 32, workers: 0,
        options: {{test_fraction: 0.25, seed: 0}}}}
model: {{backbone: resnet18, head: gce, num_learners: 2, embedding_dim: 16, pretrained: false, freeze_bn: false}}
metaclass: {{strategy: class_proxy, update_every: 1}}
loss: {{name: proxy_anchor, full_embedding_weight: 0.5, proxy_warm_start: true}}
sampler: {{classes_per_batch: 3, samples_per_class: 2, batches_per_epoch: 3}}
optim: {{name: adam, lr: 1.0e-3}}
train: {{epochs: 2, seed: 0, out_dir: {out}, eval_test_every: 1}}
eval: {{batch_size: 16, clustering: false}}
"""


@pytest.mark.slow
def test_a_proxy_loss_run_resumes_bit_exact(tmp_path, shape_folder):
    def config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(RUN.format(root=shape_folder, out=tmp_path / name))
        return path

    assert main(["train", str(config("full")), "--quiet"]) == 0
    assert main(["train", str(config("resumed")), "--quiet", "train.epochs=1"]) == 0
    after_one, _ = load_checkpoint(tmp_path / "resumed")
    assert main(["train", str(config("resumed")), "--quiet", "--resume"]) == 0
    full, _ = load_checkpoint(tmp_path / "full")
    resumed, _ = load_checkpoint(tmp_path / "resumed")
    assert set(full["loss"]) == {"learners.0.loss.proxies", "learners.1.loss.proxies", "full.loss.proxies"}
    for key in ("model", "loss"):
        for name, tensor in full[key].items():
            assert torch.equal(tensor, resumed[key][name]), name
    # The proxies trained (and were warm-started again at epoch 1): not what epoch 1 began with.
    assert not torch.equal(full["loss"]["full.loss.proxies"], after_one["loss"]["full.loss.proxies"])
    logs = [
        [
            {k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (tmp_path / n / "metrics.jsonl").open()
        ]
        for n in ("full", "resumed")
    ]
    assert logs[0] == logs[1]
    warm = [r for r in logs[0] if r["event"] == "metaclass"]
    assert len(warm) == 2 and all(r["proxies_warm_started"] == 2 * 6 + 6 for r in warm)
    assert all(np.isfinite(r["loss"]) for r in logs[0] if r["event"] == "train")


# ------------------------------------------------------------------------ two processes
WORLD = 2
STEPS = 3
LR = 0.05
# The two paths differ in the linear layer's sums (5 inputs, or the gradient over <= 10 rows) and the
# gradient all-reduce; Proxy Anchor's scale alpha = 32 multiplies a similarity's rounding in the
# exponent. Depth: layer, normalisation, similarity, logsumexp, forward and backward (8); each SGD
# step adds at most LR x that of a gradient of size <= the largest entry.
RTOL = 32 * reordered(10, 8)


def _inputs() -> torch.Tensor:
    return torch.randn(10, 5, generator=torch.Generator().manual_seed(0))


def _proxy_steps(ctx) -> dict:
    """SGD steps of a DDP linear embedding and Proxy Anchor proxies (learner terms and the "all"
    reading, weighted whole-embedding term): losses, proxies and layer weights after each step."""
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 2, 3, 1, 2, 4, 4, 3])
    inputs = _inputs()
    layer = nn.Linear(5, 8)
    model = nn.parallel.DistributedDataParallel(layer) if ctx.enabled else layer
    base = _loss("proxy_anchor", "loss.full_embedding_weight=0.5", "metaclass.learner_data=subset")
    loss = distributed_loss(base) if ctx.enabled else base
    assert isinstance(loss, GatheredGCELoss) == ctx.enabled
    optimizer = torch.optim.SGD([*layer.parameters(), *base.parameters()], lr=LR)
    rows = slice(ctx.rank * 5, ctx.rank * 5 + 5) if ctx.enabled else slice(0, 10)
    out: dict = {"losses": [], "proxies": [], "weights": []}
    for step in range(STEPS):
        z = model(inputs[rows])
        z = torch.cat([F.normalize(z[:, s], dim=1) for s in SLICES], dim=1)
        if step == 2:  # the "all" reading: every learner, its own labels
            total, parts = loss.all_learners(z, labels[rows], SLICES, [labels[rows] % 3, labels[rows] // 2])
        else:
            total, parts = loss(z, labels[rows], SLICES[step])
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        out["losses"].append(parts)
        out["proxies"].append({n: p.detach().clone() for n, p in base.named_parameters()})
        out["weights"].append([p.detach().clone() for p in layer.parameters()])
    return out


@pytest.fixture(scope="module")
def proxy_runs() -> tuple[dict, list[dict]]:
    return _proxy_steps(SINGLE), run_ranks(_proxy_steps, WORLD)


def test_two_processes_train_proxies_like_one(proxy_runs):
    single, ranks = proxy_runs
    for rank in ranks:
        for step in range(STEPS):
            for key, value in single["losses"][step].items():
                assert rank["losses"][step][key] == pytest.approx(value, abs=RTOL * max(1.0, abs(value))), (step, key)
            for name, proxies in single["proxies"][step].items():
                # A proxy moves by <= LR x its gradient per step; the gradient of a logsumexp term is
                # a softmax-weighted mean of unit vectors times alpha: <= alpha per entry.
                atol = (step + 1) * LR * 32 * RTOL
                torch.testing.assert_close(rank["proxies"][step][name], proxies, atol=atol, rtol=0)
            # A weight's gradient sums <= 10 rows of (an embedding's gradient x an input).
            bound = (step + 1) * LR * 32 * RTOL * 10 * float(_inputs().abs().max())
            for got, want in zip(rank["weights"][step], single["weights"][step], strict=True):
                torch.testing.assert_close(got, want, atol=bound, rtol=0)
    # Every rank applies the same (all-reduced) proxy gradient: the proxies are the same everywhere.
    for step in range(STEPS):
        for name, proxies in ranks[0]["proxies"][step].items():
            assert torch.equal(proxies, ranks[1]["proxies"][step][name]), (step, name)
    # The proxies did move, by the learner term's and the whole-embedding term's gradients.
    first = single["proxies"][0]
    assert not torch.equal(first["learners.0.loss.proxies"], single["proxies"][-1]["learners.0.loss.proxies"])


def test_resuming_a_checkpoint_from_before_the_loss_keys_reports_no_change_of_them():
    from gce.training.checkpoint import changed_settings, setting_differences

    cfg = _cfg("triplet").to_dict()
    older = {section: dict(values) if isinstance(values, dict) else values for section, values in cfg.items()}
    for key in ("name", "proxy_anchor_alpha", "proxy_lr_multiplier", "proxy_warm_start", "temperature"):
        del older["loss"][key]
    assert setting_differences(older, cfg) == [] and changed_settings(older, cfg) == []
    cfg["loss"]["proxy_lr_multiplier"] = 10.0
    assert changed_settings(older, cfg) == ["loss.proxy_lr_multiplier: 100.0 -> 10.0"]
