"""A run, assembled from parts: :func:`build_parts` turns an experiment config into :class:`RunParts`.

The :class:`~gce.training.trainer.Trainer` only runs the loop over the parts it is given, so each
part can be replaced on its own: a test passes a tiny model or a fake loss, a distributed run wraps
the model (``train_model``), the loss, the embedder (sharded extraction and gather) and the writer
(rank 0 writes) without touching the loop.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gce.config import ExperimentConfig
from gce.data.images import ImageDataset
from gce.data.records import ImageRecords
from gce.data.run_data import RunData, prepare_data
from gce.data.samplers import SubsetBalancedBatchSampler
from gce.data.seeded import SeededAugmentedDataset
from gce.data.transforms import test_transform, train_transform
from gce.errors import ConfigError
from gce.evaluation.pipeline import DatasetEmbedder, EmbedFn, MetricSettings
from gce.losses import GCELoss, LossShape, ZooGCELoss, build_loss
from gce.models import EmbeddingModel, build_model
from gce.runtime import flush_denormals, resolve_device, seed_everything
from gce.training.optim import build_optimizer, build_scheduler
from gce.training.proxy_warm_start import ProxyWarmStart
from gce.training.readings import Reading, build_reading
from gce.training.run_folder import prepare_run_folder
from gce.training.writer import RunWriter

__all__ = ["RunParts", "build_parts", "build_run_loss", "check_sampler_feasible", "compiled"]


KeyedItem = tuple[int, int]  # (image index, augmentation seed)


def whole_batch(batch: list[KeyedItem]) -> list[KeyedItem]:
    return batch


@dataclass
class RunParts:
    """Everything one training run works with.

    ``model`` is the embedding model itself (its weights are checkpointed and evaluated);
    ``train_model`` is what a training step calls, the model or a wrapper of it (e.g.
    ``DistributedDataParallel``). ``embed`` embeds a dataset (metric refreshes, evaluation);
    ``metrics`` says which metrics evaluation computes; ``writer`` writes the run folder.
    ``batch_part`` picks the part of each planned batch this process loads (all of it here; one
    rank's share in a distributed run, whose ranks together load the batch one process would).
    """

    cfg: ExperimentConfig
    device: torch.device
    data: RunData
    model: EmbeddingModel
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    reading: Reading
    loss: GCELoss
    train_set: SeededAugmentedDataset
    train_eval_set: ImageDataset
    val_set: ImageDataset | None
    test_set: ImageDataset
    sampler: SubsetBalancedBatchSampler
    embed: EmbedFn
    metrics: MetricSettings
    writer: RunWriter
    progress: bool = True
    batch_part: Callable[[list[KeyedItem]], list[KeyedItem]] = whole_batch


def check_sampler_feasible(cfg: ExperimentConfig, train: ImageRecords) -> None:
    """Fail before training when the batches the config asks for cannot be drawn."""
    s, k, classes = cfg.sampler, cfg.model.num_learners, train.num_classes
    if classes < 2 * k:
        raise ConfigError(
            f"model.num_learners={k} needs at least {2 * k} training classes (2 per learner);"
            f" the training split has {classes}"
        )
    if s.classes_per_batch > classes:
        raise ConfigError(
            f"sampler.classes_per_batch={s.classes_per_batch} is larger than the {classes} training classes"
        )
    m = cfg.metaclass
    if m.learner_data == "all" and k > 1:  # batches come from all data
        if m.num_metaclasses * 2 > classes:
            raise ConfigError(
                f"metaclass.num_metaclasses={m.num_metaclasses} needs at least "
                f"{2 * m.num_metaclasses} training classes (2 per meta-class);"
                f" the training split has {classes}"
            )
        return
    _check_smallest_subset(cfg, classes)


def _check_smallest_subset(cfg: ExperimentConfig, classes: int) -> None:
    # Batches come from one learner's subset. With subsets balanced by classes the smallest has
    # classes // K of them, known now: fail before training rather than train every learner on
    # smaller batches than configured. (Unbalanced, image-balanced and sample-level subsets vary;
    # the sampler then warns and uses all classes of a subset that is short.)
    s, m, k = cfg.sampler, cfg.metaclass, cfg.model.num_learners
    even = (m.strategy == "random" and m.balance_by == "classes") or (
        m.strategy == "class_proxy" and m.balanced and m.balance_by == "classes"
    )
    if k > 1 and even and s.classes_per_batch > classes // k:
        raise ConfigError(
            f"sampler.classes_per_batch={s.classes_per_batch} is larger than the {classes // k} classes of the "
            f"smallest learner subset ({classes} training classes split evenly over model.num_learners={k}); "
            f"use sampler.classes_per_batch <= {classes // k} or fewer learners"
        )


def build_run_loss(cfg: ExperimentConfig, learner_slices: list[slice], num_classes: int) -> GCELoss:
    """The loss ``cfg.loss`` names, its proxies (if any) sized for this run (:class:`LossShape`).

    Proxies are drawn from a generator seeded by ``train.seed`` with the global RNG forked: a
    proxy loss changes nothing of the model's initial weights or of the run's random stream.
    """
    k, mc = len(learner_slices), cfg.metaclass
    relabel = mc.learner_data == "all" and k > 1
    shape = LossShape(
        num_classes=num_classes,
        embedding_dim=cfg.model.embedding_dim,
        learner_slices=tuple(learner_slices) if k > 1 else (),
        learner_classes=mc.num_metaclasses if relabel else num_classes,
        # One learner, fine-tuning epochs and a weighted whole-embedding term use the whole embedding.
        full=k == 1 or cfg.loss.full_embedding_weight > 0 or cfg.train.finetune_epochs > 0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return build_loss(cfg.loss, shape)


def _datasets(
    cfg: ExperimentConfig, data: RunData
) -> tuple[SeededAugmentedDataset, ImageDataset, ImageDataset | None, ImageDataset]:
    """Augmented training images; un-augmented train (meta-class refreshes), validation and test images."""
    d = cfg.data
    train = SeededAugmentedDataset(
        data.train, train_transform(d.image_size, scale=d.crop_scale, hflip=d.hflip, random_crop=d.random_crop)
    )
    eval_tf = test_transform(d.image_size, resize_to=d.test_resize)
    val = ImageDataset(data.val, eval_tf) if data.val is not None else None
    return train, ImageDataset(data.train, eval_tf), val, ImageDataset(data.test, eval_tf)


def compiled(model: nn.Module, cfg: ExperimentConfig) -> nn.Module:
    """What a training step calls: ``torch.compile(model)`` with ``train.compile``, else the model."""
    return torch.compile(model) if cfg.train.compile else model  # type: ignore[return-value]


def build_parts(cfg: ExperimentConfig, *, resume: bool = False, progress: bool = True) -> RunParts:
    """Check the run folder, seed, load and verify the data, and build every part of the run.

    The order is fixed: the model's initial weights are the first draws from the freshly seeded
    torch RNG, so a run is reproducible from ``train.seed``.
    """
    device = resolve_device(cfg.train.device, "train.device")
    if device.type == "cuda" and device.index is None:  # "cuda": name the GPU (a rank's own, under torchrun)
        device = torch.device("cuda", torch.cuda.current_device())
    out = prepare_run_folder(cfg, resume)
    if not cfg.model.pretrained and cfg.model.freeze_bn:
        warnings.warn(
            "model.pretrained=false with model.freeze_bn=true: the trunk's BatchNorm layers keep their"
            " initial statistics (mean 0, variance 1) and never learn them, which can collapse every"
            " embedding to one point; training from scratch needs model.freeze_bn=false",
            stacklevel=2,
        )
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    flush_denormals(device)
    seed_everything(cfg.train.seed)
    data = prepare_data(cfg, progress)
    check_sampler_feasible(cfg, data.train)
    model = build_model(cfg.model).to(device)
    if cfg.train.channels_last:  # the trainer converts each batch as well
        model = model.to(memory_format=torch.channels_last)
    loss = build_run_loss(cfg, model.learner_slices(), data.train.num_classes).to(device)
    optimizer = build_optimizer(model, cfg, loss)
    reading = build_reading(cfg, model.learner_slices(), data.train.labels, data.train.num_classes, device)
    if cfg.loss.proxy_warm_start:
        assert isinstance(loss, ZooGCELoss)  # the config allows it for proxy losses only
        reading = ProxyWarmStart(reading, loss, data.train.labels, data.train.num_classes)
    s = cfg.sampler
    train_set, train_eval_set, val_set, test_set = _datasets(cfg, data)
    return RunParts(
        cfg=cfg,
        device=device,
        data=data,
        model=model,
        train_model=compiled(model, cfg),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg),
        reading=reading,
        loss=loss,
        train_set=train_set,
        train_eval_set=train_eval_set,
        val_set=val_set,
        test_set=test_set,
        sampler=SubsetBalancedBatchSampler(
            labels=data.train.labels,
            group_of_sample=None,
            classes_per_batch=s.classes_per_batch,
            samples_per_class=s.samples_per_class,
            batches_per_epoch=s.batches_per_epoch,
            seed=cfg.train.seed,
            num_groups=1,
        ),
        embed=DatasetEmbedder.from_config(cfg, device, progress),
        metrics=MetricSettings.from_config(cfg),
        writer=RunWriter(out, cfg),
        progress=progress,
    )
