"""CUDA paths (skipped without a GPU; benchmarks/gpu_check.sh runs them on a GPU machine).

Every tensor of a step stays on the GPU, results agree with the CPU, bf16 autocast leaves the loss
in fp32, and the embedding pass of a sharded/single extraction matches the CPU one. Then every
command that runs a model with a device setting, end to end on the GPU with a tiny resnet18 at
32 px: ``gce train`` (meta-class refreshes, test evaluation, checkpoints, resume on the GPU and on
the CPU), the all-data reading, ``gce eval``, ``gce demo`` and ``gce ablate``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from gce.cli import main
from gce.config import ModelConfig, load_config
from gce.distributed import SINGLE, DistContext
from gce.distributed.sharding import extract_embeddings_sharded
from gce.evaluation import extract_embeddings
from gce.losses import GCELoss
from gce.metaclass import build_strategy, class_proxies
from gce.metaclass.relabel import PerLearnerMetaClasses
from gce.models import build_model
from gce.training.checkpoint import load_checkpoint
from gce.training.parts import build_parts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def full_fp32_on_the_gpu():
    """cuDNN convolutions run in TF32 by default (10-bit mantissa, ~1e-3 relative error): the
    comparisons with the CPU below are of fp32 against fp32, so TF32 is off while they run."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        ModelConfig(backbone="resnet18", head="gce", num_learners=2, embedding_dim=16, pretrained=False, freeze_bn=True)
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 3, 32, 32, generator=g), torch.arange(12) % 4


def test_forward_and_loss_on_gpu_match_cpu():
    images, labels = _batch()
    model = _model()
    loss_fn = GCELoss(margin=0.3, mining="all")
    cpu_loss, _ = loss_fn(model(images), labels, slice(0, 8))
    gpu_model = model.cuda()
    gpu_out = gpu_model(images.cuda())
    assert gpu_out.is_cuda
    gpu_loss, _ = loss_fn(gpu_out, labels.cuda(), slice(0, 8))
    assert gpu_loss.is_cuda
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_forward_keeps_the_loss_in_fp32():
    images, labels = _batch()
    model = _model().cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images.cuda())
    loss, _parts = GCELoss(margin=0.3, mining="all")(out.float(), labels.cuda(), slice(0, 8))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_extraction_on_gpu_matches_cpu():
    images, labels = _batch()
    dataset = TensorDataset(images, labels)
    cpu, cpu_labels = extract_embeddings_sharded(_model(), dataset, SINGLE, batch_size=5, progress=False)
    ctx = DistContext(device=torch.device("cuda", 0))
    gpu, gpu_labels = extract_embeddings_sharded(_model().cuda(), dataset, ctx, batch_size=5, progress=False)
    assert not gpu.is_cuda  # results come back on the CPU, where metrics are computed
    assert torch.equal(gpu_labels, cpu_labels)
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


def test_many_non_blocking_copies_back_match_the_cpu():
    images, labels = _batch()
    dataset = TensorDataset(images, labels)
    cpu, _ = extract_embeddings(_model(), dataset, batch_size=1, progress=False)
    gpu, gpu_labels = extract_embeddings(_model().cuda(), dataset, batch_size=1, device="cuda", progress=False)
    assert gpu.device.type == "cpu" and torch.equal(gpu_labels, labels)
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


def test_loss_parts_on_gpu_are_the_cpu_floats():
    images, labels = _batch()
    out = _model()(images).detach()
    loss_fn = GCELoss(margin=0.3, mining="all", full_embedding_weight=0.5)
    _, cpu_parts = loss_fn(out, labels, slice(0, 8))
    _, gpu_parts = loss_fn(out.cuda(), labels.cuda(), slice(0, 8))
    assert set(gpu_parts) == set(cpu_parts) and all(type(v) is float for v in gpu_parts.values())
    for key, value in cpu_parts.items():
        assert gpu_parts[key] == pytest.approx(value, abs=1e-4), key


def test_meta_class_refreshes_take_gpu_embeddings():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 3)
    embeddings = torch.from_numpy(rng.normal(size=(len(labels), 8)).astype(np.float32))
    torch.testing.assert_close(
        class_proxies(embeddings.cuda(), torch.from_numpy(labels), 8).cpu(),
        class_proxies(embeddings, torch.from_numpy(labels), 8),
    )
    strategy = build_strategy("class_proxy", num_metaclasses=2)
    expected = strategy.assign(embeddings, labels, 8, seed=3)
    assert np.array_equal(strategy.assign(embeddings.cuda(), torch.from_numpy(labels).cuda(), 8, seed=3), expected)
    per_learner = PerLearnerMetaClasses(strategy, num_learners=2)
    slices = [slice(0, 4), slice(4, 8)]
    assert np.array_equal(
        per_learner.assign(embeddings.cuda(), labels, 8, slices, seed=3),
        per_learner.assign(embeddings, labels, 8, slices, seed=3),
    )


RUN = """
name: tiny-cuda
data: {{dataset: folder, root: {root}, image_size: 32, test_resize: 32, workers: 2,
        options: {{test_fraction: 0.25, seed: 0}}}}
model: {{backbone: resnet18, head: gce, num_learners: 2, embedding_dim: 16, pretrained: false}}
metaclass: {{strategy: class_proxy, update_every: 1}}
sampler: {{classes_per_batch: 3, samples_per_class: 2, batches_per_epoch: 3}}
train: {{epochs: 2, seed: 0, out_dir: {out}, eval_test_every: 1, device: cuda, amp: true, channels_last: true}}
eval: {{batch_size: 16}}
"""


def _write_run(tmp_path: Path, root: Path, out: Path, name: str = "tiny.yaml") -> Path:
    config = tmp_path / name
    config.write_text(RUN.format(root=root, out=out))
    return config


def test_gce_train_on_gpu_refreshes_evaluates_and_resumes_on_gpu_and_cpu(tmp_path, shape_folder, capsys):
    out = tmp_path / "run"
    config = _write_run(tmp_path, shape_folder, out)
    assert main(["train", str(config), "--quiet"]) == 0
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["event"] == "metaclass"] == [0, 1]
    assert [r["epoch"] for r in log if r["event"] == "test"] == [0, 1]
    state, _ = load_checkpoint(out)
    assert isinstance(state["rng"]["cuda"], torch.Tensor)  # the GPU generator is checkpointed
    assert all(t.device.type == "cpu" for t in state["model"].values())  # loaded with map_location
    # Continue on the GPU, then on the CPU (the checkpoint's tensors were saved from the GPU).
    assert main(["train", str(config), "--quiet", "--resume", "train.epochs=3"]) == 0
    assert (
        main(["train", str(config), "--quiet", "--resume", "train.epochs=4", "train.device=cpu", "train.num_threads=2"])
        == 0
    )
    assert load_checkpoint(out)[0]["epoch"] == 4
    final = json.loads((out / "final_metrics.json").read_text())
    for device in ("cuda", "cpu"):
        assert (
            main(
                [
                    "eval",
                    "--checkpoint",
                    str(out / "model.pt"),
                    "--device",
                    device,
                    "--batch-size",
                    "16",
                    "--workers",
                    "0",
                    "--quiet",
                    "--out",
                    str(tmp_path / f"{device}.json"),
                ]
            )
            == 0
        )
        metrics = json.loads((tmp_path / f"{device}.json").read_text())
        assert metrics["recall@1"] == pytest.approx(final["recall@1"], abs=0.15), device


def test_parts_name_the_gpu_and_the_all_data_reading_trains_on_it(tmp_path, shape_folder):
    config = _write_run(tmp_path, shape_folder, tmp_path / "all")
    overrides = [
        "metaclass.learner_data=all",
        "metaclass.num_metaclasses=3",
        "train.epochs=1",
        "train.eval_test_every=0",
    ]
    parts = build_parts(load_config(config, overrides), progress=False)
    assert parts.device == torch.device("cuda", torch.cuda.current_device())
    assert all(p.device == parts.device for p in parts.model.parameters())
    del parts
    assert main(["train", str(config), "--quiet", *overrides]) == 0
    assert (tmp_path / "all" / "final_metrics.json").exists()


def test_gce_demo_on_gpu(tmp_path, shape_folder):
    config = _write_run(tmp_path, shape_folder, tmp_path / "run")
    assert main(["demo", str(config), "--quiet", "--out", str(tmp_path / "demo"), "train.epochs=1"]) == 0
    for name in ("comparison.json", "retrieval_grid.png", "retrieval_grid_untrained.png", "training_curve.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0, name


def test_gce_ablate_on_gpu(tmp_path, shape_folder):
    _write_run(tmp_path, shape_folder, tmp_path / "unused", name="base.yaml")
    ablation = tmp_path / "abl.yaml"
    ablation.write_text(
        f"base: base.yaml\nout_dir: {tmp_path / 'abl'}\nseeds: [0]\n"
        "overrides: [train.epochs=1, train.eval_test_every=0]\n"
        "variants:\n  gce: []\n  single: [model.head=linear_split, model.num_learners=1, "
        "metaclass.strategy=none]\n"
    )
    assert main(["ablate", str(ablation), "--quiet"]) == 0
    summary = (tmp_path / "abl" / "summary.md").read_text()
    assert "| gce | 1 |" in summary and "| single | 1 |" in summary


def test_nccl_gather_and_its_reduce_scatter_backward_run_on_the_gpu(tmp_path):
    """The NCCL calls of the differentiable gather (all-gather forward, reduce-scatter backward) and
    of the row counts, on a one-rank NCCL group started as init_distributed starts one. A one-GPU
    machine cannot hold two NCCL ranks (one process per GPU), so the multi-rank arithmetic is tested
    on gloo (tests/test_distributed_*.py); this checks that the NCCL code path itself runs."""
    import torch.distributed as dist

    from gce.distributed.collectives import _AllGatherRows, gather_sizes

    device = torch.device("cuda", 0)
    dist.init_process_group(
        "nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1, device_id=device
    )
    try:
        assert dist.get_backend() == dist.Backend.NCCL
        assert gather_sizes(5, device) == [5]
        x = torch.randn(5, 4, device=device, requires_grad=True)
        weights = torch.randn(5, 4, device=device)
        gathered = _AllGatherRows.apply(x, [5])
        assert gathered.is_cuda and torch.equal(gathered, x.detach())
        (gathered * weights).sum().backward()
        torch.testing.assert_close(x.grad, weights)  # one rank: the reduce-scatter sum is its own gradient
    finally:
        dist.destroy_process_group()
