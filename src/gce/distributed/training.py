"""Training on N processes: the single-process run's parts, wrapped; the same loop.

:func:`distribute_parts` takes the parts :func:`gce.training.parts.build_parts` made on every rank
(same seed, so the same initial weights, plan and augmentation everywhere) and swaps:

* ``train_model``: the model with BatchNorm over the global batch (the head's always, the
  trunk's with ``train.sync_bn``), in ``DistributedDataParallel`` (gradients averaged);
* ``loss``: :class:`~gce.distributed.loss.DistributedGCELoss` (local anchors against the
  gathered global batch, scaled so the averaged gradient is the single-process one), or for the
  other losses :class:`~gce.distributed.loss.GatheredGCELoss` (the global batch's loss, proxies'
  gradients averaged over the ranks);
* ``embed``: sharded extraction, gathered on every rank in dataset order;
* ``reading``: meta-class refreshes computed once, on rank 0, and broadcast;
* ``writer``: rank 0's writes; the other ranks read checkpoints but write nothing.

* ``batch_part``: the rank's consecutive rows of each global batch (:class:`RankShare`; the
  augmentation seeds stay those of the global positions).

:class:`DistributedTrainer` is the :class:`~gce.training.trainer.Trainer` with three small
overrides: Ctrl-C is agreed on by all ranks after each step, metrics are computed once, and every
rank's RNG state goes into the checkpoint.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from gce.config import ExperimentConfig
from gce.distributed.batchnorm import synchronise_batchnorm
from gce.distributed.collectives import all_reduce_sum
from gce.distributed.context import DistContext
from gce.distributed.loss import GatheredGCELoss, distributed_loss
from gce.distributed.sharding import compute_on_main, extract_embeddings_sharded
from gce.errors import ConfigError
from gce.evaluation import EvalResult
from gce.evaluation.pipeline import DatasetEmbedder, evaluate_split
from gce.training.parts import RunParts, build_parts, compiled
from gce.training.proxy_warm_start import ProxyWarmStart
from gce.training.readings import MetaClassUpdate, Reading
from gce.training.run_state import restore_rng
from gce.training.trainer import EpochObserver, Trainer
from gce.training.writer import RunWriter

__all__ = [
    "DistributedTrainer",
    "RankShare",
    "ShardedEmbedder",
    "SharedReading",
    "SilentWriter",
    "build_run",
    "check_distributable",
    "ddp_without_buffer_sync",
    "distribute_parts",
    "local_rows",
]


def local_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """This rank's consecutive rows of a global batch (sizes differ by at most one)."""
    base, extra = divmod(batch_size, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


@dataclass(frozen=True)
class RankShare:
    """``parts.batch_part`` of a rank: its consecutive rows of each planned batch. The items keep
    the augmentation seeds of their positions in the whole batch."""

    rank: int
    world_size: int

    def __call__(self, items: list[Any]) -> list[Any]:
        return items[local_rows(len(items), self.rank, self.world_size)]


class ShardedEmbedder:
    """The run's :class:`~gce.evaluation.pipeline.DatasetEmbedder` over all ranks (same result on each)."""

    def __init__(self, base: DatasetEmbedder, ctx: DistContext) -> None:
        self.base, self.ctx = base, ctx

    def __call__(self, model: nn.Module, dataset: Dataset, desc: str) -> tuple[Tensor, Tensor]:
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        return extract_embeddings_sharded(
            model,
            dataset,
            self.ctx,
            batch_size=self.base.batch_size,
            num_workers=self.base.workers,
            progress=self.base.progress and self.ctx.is_main,
            desc=desc,
        )


class SharedReading:
    """A reading whose refreshes run once, on rank 0; the other ranks take its assignment.

    k-means and the Hungarian matching could differ in the last bits between machines; computing
    them once makes every rank train on the same subsets by construction.
    """

    def __init__(self, base: Reading, ctx: DistContext) -> None:
        self.base, self.ctx = base, ctx

    def __getattr__(self, name: str) -> Any:  # due, needs_embeddings, assignment, restore, ...
        return getattr(self.base, name)

    def update(self, epoch: int, embeddings: Tensor | None) -> MetaClassUpdate:
        def refresh() -> tuple[np.ndarray, MetaClassUpdate]:
            update = self.base.update(epoch, embeddings)
            return np.asarray(self.base.assignment), update

        assignment, update = compute_on_main(self.ctx, refresh)
        if not self.ctx.is_main:
            self.base.restore(assignment)
        return update


class SilentWriter(RunWriter):
    """The writer of ranks other than 0: reads the run folder (resume), writes nothing."""

    def __init__(self, out: Path) -> None:  # no MetricsLogger: it would open a TensorBoard file
        self.out = out

    def start_fresh(self, cfg: ExperimentConfig) -> None:
        pass

    def log(self, event: str, epoch: int, values: dict[str, Any]) -> None:
        pass

    def truncate_log(self, epoch: int, keep_at_epoch: tuple[str, ...] = ()) -> None:
        pass

    def save_checkpoint(self, state: dict[str, Any]) -> Path:
        return self.out / "last.pt"

    def save_model(self, model: nn.Module, cfg: ExperimentConfig, name: str) -> Path:
        return self.out / name

    def write_metrics(self, name: str, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def check_distributable(cfg: ExperimentConfig, world_size: int) -> None:
    """Fail before any work (the launcher calls it before starting processes) when the global
    batch cannot be split over ``world_size`` ranks."""
    batch = cfg.sampler.classes_per_batch * cfg.sampler.samples_per_class
    if batch < 2 * world_size:
        raise ConfigError(
            f"the global batch (sampler.classes_per_batch x sampler.samples_per_class = {batch}) "
            f"needs at least 2 images per process; {world_size} processes need {2 * world_size}"
        )


def ddp_without_buffer_sync(model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """``model`` in ``DistributedDataParallel`` without the buffer sync at every forward: BatchNorm
    statistics are global (the same on every rank) here. torch 2.14 renamed ``broadcast_buffers``
    to ``forward_sync_buffers`` (the old name warns); either is used, whichever the torch has."""
    sync: dict[str, Any] = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **sync)


def distribute_parts(parts: RunParts, ctx: DistContext) -> RunParts:
    """The parts of a run on ``ctx.world_size`` ranks (see the module docstring); unchanged alone."""
    if not ctx.enabled:
        return parts
    cfg = parts.cfg
    check_distributable(cfg, ctx.world_size)
    model = parts.model
    synchronise_batchnorm(model.head, ctx.device)
    if cfg.train.sync_bn:
        synchronise_batchnorm(model.trunk, ctx.device)
    train_model = ddp_without_buffer_sync(model, ctx.device)
    assert isinstance(parts.embed, DatasetEmbedder)  # build_parts' embedder; its settings are sharded
    writer = parts.writer
    if not ctx.is_main:
        writer.close()
        writer = SilentWriter(parts.writer.out)
    loss = distributed_loss(parts.loss)
    reading: Reading
    if isinstance(parts.reading, ProxyWarmStart):  # on every rank, outside the rank-0 refresh
        assert isinstance(loss, GatheredGCELoss)
        reading = parts.reading.around(SharedReading(parts.reading.base, ctx), loss)
    else:
        reading = SharedReading(parts.reading, ctx)
    return replace(
        parts,
        train_model=compiled(train_model, cfg),
        loss=loss,
        embed=ShardedEmbedder(parts.embed, ctx),
        reading=reading,
        writer=writer,
        progress=parts.progress and ctx.is_main,
        batch_part=RankShare(ctx.rank, ctx.world_size),
    )


class DistributedTrainer(Trainer):
    """:class:`~gce.training.trainer.Trainer` for one rank of a multi-process run."""

    def __init__(
        self,
        parts: RunParts,
        ctx: DistContext,
        *,
        resume: bool = False,
        log: Callable[[str], None] = print,
        observers: Sequence[EpochObserver] = (),
    ) -> None:
        super().__init__(parts, resume=resume, log=log if ctx.is_main else _silent, observers=observers)
        self.ctx = ctx

    def _hold_run_folder(self) -> AbstractContextManager[None]:
        """Rank 0 writes the folder and holds its lock (or its launcher does); the others only read."""
        return super()._hold_run_folder() if self.ctx.is_main else nullcontext()

    def _step(self, images: Tensor, labels: Tensor, learner: int | None) -> tuple[float, int]:
        result = super()._step(images, labels, learner)
        # Ctrl-C reaches the ranks at different moments: all stop after the same step.
        flag = all_reduce_sum(torch.tensor([float(self._interrupt_requested)], device=self.ctx.device))
        self._interrupt_requested = bool(flag.item() > 0)
        return result

    def evaluate(self, dataset, desc: str, clustering: bool | None = None) -> EvalResult:
        metrics = self.parts.metrics if clustering is None else replace(self.parts.metrics, clustering=clustering)
        embedded = self.parts.embed(self.parts.model, dataset, desc)  # every rank embeds its shard
        return compute_on_main(
            self.ctx, lambda: evaluate_split(self.parts.model, dataset, lambda *_: embedded, metrics, desc).result
        )

    def _rng_state(self) -> dict[str, Any]:
        """Every rank's random state (rank 0 writes the checkpoint; each rank restores its own)."""
        mine = super()._rng_state()  # with this rank's GPU generator on CUDA
        every: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(every, mine)
        return {**every[0], "ranks": every}

    def _restore_rng(self, state: dict[str, Any]) -> None:
        ranks = state["rng"].get("ranks")
        if ranks is None or len(ranks) != self.ctx.world_size:  # another world size: rank 0's state
            super()._restore_rng(state)
            return
        restore_rng(ranks[self.ctx.rank], self.parts.device)


def _silent(_: str) -> None:
    pass


def build_run(
    cfg: ExperimentConfig,
    ctx: DistContext,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    observers: Sequence[EpochObserver] = (),
) -> Trainer:
    """The trainer of this process: single-process, or one rank of ``ctx.world_size``."""
    if ctx.enabled:
        check_distributable(cfg, ctx.world_size)  # before the data are read and verified
    parts = build_parts(cfg, resume=resume, progress=progress and ctx.is_main)
    parts = distribute_parts(parts, ctx)
    if not ctx.enabled:
        return Trainer(parts, resume=resume, log=log, observers=observers)
    return DistributedTrainer(parts, ctx, resume=resume, log=log, observers=observers)
