"""The training loop: meta-class refreshes, per-learner triplet steps, validation, checkpoints.

One epoch = a fixed plan of class-balanced batches (P classes x M images), each drawn from one
learner's data subset, round-robin over learners. The plan, the augmentation of every image and the
meta-class refreshes are functions of (seed, epoch, batch), so a run resumed from any checkpoint,
even one written mid-epoch on Ctrl-C, reproduces the uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gce.config import ExperimentConfig, save_config
from gce.data.images import ImageDataset
from gce.data.run_data import prepare_data
from gce.data.samplers import SubsetBalancedBatchSampler
from gce.data.seeded import SeededAugmentedDataset, item_seed
from gce.data.transforms import test_transform, train_transform
from gce.errors import ConfigError, GceError
from gce.evaluation import EvalResult, default_recall_ks, evaluate_embeddings, extract_embeddings
from gce.losses import GCELoss
from gce.metaclass import assignment_stats, build_strategy
from gce.metaclass.relabel import PerLearnerMetaClasses
from gce.models import EmbeddingModel, build_model
from gce.runtime import check_writable, resolve_device, seed_everything, write_json
from gce.training.checkpoint import (
    check_same_model,
    load_checkpoint,
    require_keys,
    save_checkpoint,
    save_model_only,
)
from gce.training.logging import MetricsLogger

EXIT_INTERRUPTED = 130


class TrainingInterrupted(GceError):
    """Raised after Ctrl-C once the current step is finished and a checkpoint is written."""


class NonFiniteLossError(GceError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def build_optimizer(model: EmbeddingModel, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = model.param_groups(backbone_lr=o.backbone_lr or o.lr, head_lr=o.lr, weight_decay=o.weight_decay)
    # foreach=True: one fused kernel per parameter group instead of a Python loop (also on CPU).
    if o.name == "adam":
        return torch.optim.Adam(groups, foreach=True)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, foreach=True)
    return torch.optim.SGD(groups, momentum=o.momentum, nesterov=o.momentum > 0, foreach=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ExperimentConfig) -> torch.optim.lr_scheduler.LRScheduler:
    o, total = cfg.optim, cfg.train.epochs + cfg.train.finetune_epochs
    if o.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if o.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=o.step_size, gamma=o.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


class Trainer:
    """Trains one experiment config; ``run()`` returns the final test metrics."""

    def __init__(self, cfg: ExperimentConfig, *, resume: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.resume = resume
        self.progress = progress
        self.log = log
        self.out = Path(cfg.train.out_dir)
        self.device = resolve_device(cfg.train.device, "train.device")
        self._interrupt_requested = False

    # ----------------------------------------------------------------- set-up
    def setup(self) -> None:
        cfg = self.cfg
        check_writable(self.out)
        if not self.resume and ((self.out / "last.pt").exists() or (self.out / "prev.pt").exists()):
            raise GceError(f"{self.out} already holds a run; pass --resume to continue it or choose another train.out_dir")
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        seed_everything(cfg.train.seed)
        self.data = prepare_data(cfg, self.progress)
        self._check_sampler_feasible()
        m = cfg.model
        self.model = build_model(
            backbone=m.backbone, head=m.head, num_learners=m.num_learners, embedding_dim=m.embedding_dim,
            pretrained=m.pretrained, freeze_bn=m.freeze_bn, pooling=m.pooling,
            block_channels=m.block_channels, input_mixing=m.input_mixing,
            block=m.block, block_residual=m.block_residual, grouped_trunk_layers=m.grouped_trunk_layers,
        ).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        mc = cfg.metaclass
        # learner_data=all: each learner partitions ALL classes into num_metaclasses meta-classes.
        relabel = mc.learner_data == "all" and m.num_learners > 1
        self.strategy = build_strategy(
            mc.strategy, num_learners=mc.num_metaclasses if relabel else m.num_learners,
            balanced=mc.balanced, balance_by=mc.balance_by, redraw=mc.redraw, warm_start=mc.warm_start,
        )
        self.per_learner = PerLearnerMetaClasses(self.strategy, m.num_learners) if relabel else None
        self.loss_fn = GCELoss(margin=cfg.loss.margin, mining=cfg.loss.mining,
                               full_embedding_weight=cfg.loss.full_embedding_weight, distance=cfg.loss.distance)
        d = cfg.data
        self.train_set = SeededAugmentedDataset(
            self.data.train, train_transform(d.image_size, scale=d.crop_scale, hflip=d.hflip, random_crop=d.random_crop))
        eval_tf = test_transform(d.image_size, resize_to=d.test_resize)
        self.train_eval_set = ImageDataset(self.data.train, eval_tf)
        self.test_set = ImageDataset(self.data.test, eval_tf)
        self.val_set = ImageDataset(self.data.val, eval_tf) if self.data.val is not None else None
        s = cfg.sampler
        batch = s.classes_per_batch * s.samples_per_class
        self.batches_per_epoch = s.batches_per_epoch or max(1, len(self.data.train) // batch)
        self.assignment: np.ndarray | None = None
        self.sampler = SubsetBalancedBatchSampler(
            labels=self.data.train.labels, group_of_sample=np.zeros(len(self.data.train), dtype=np.int64),
            classes_per_batch=s.classes_per_batch, samples_per_class=s.samples_per_class,
            batches_per_epoch=self.batches_per_epoch, seed=cfg.train.seed, num_groups=1,
        )
        self.logger = MetricsLogger(self.out)
        self.start_epoch, self.start_batch, self.partial = 0, 0, {"loss_sum": 0.0, "steps": 0, "triplets": 0}
        self.best_val = -1.0
        if self.resume:
            self._restore()
        else:
            # No checkpoint here (checked above): records left by a run killed before its first
            # checkpoint would otherwise precede this run's in the log.
            self.logger.truncate_after(0)
            save_config(cfg, self.out / "config.yaml")

    def _check_sampler_feasible(self) -> None:
        s, k = self.cfg.sampler, self.cfg.model.num_learners
        classes = self.data.train.num_classes
        if classes < 2 * k:
            raise ConfigError(
                f"model.num_learners={k} needs at least {2 * k} training classes (2 per learner); the training split has {classes}"
            )
        if s.classes_per_batch > classes:
            raise ConfigError(
                f"sampler.classes_per_batch={s.classes_per_batch} is larger than the {classes} training classes"
            )
        # Batches come from one learner's subset. With subsets balanced by classes the smallest
        # has classes // K of them, known now: fail before training rather than train every
        # learner on smaller batches than configured. (Unbalanced, image-balanced and sample-level
        # subsets vary; the sampler then warns and uses all classes of a subset that is short.)
        m = self.cfg.metaclass
        if m.learner_data == "all" and k > 1:
            if m.num_metaclasses * 2 > classes:
                raise ConfigError(f"metaclass.num_metaclasses={m.num_metaclasses} needs at least "
                                  f"{2 * m.num_metaclasses} training classes (2 per meta-class); the training split has {classes}")
            return  # batches come from all data
        even = (m.strategy == "random" and m.balance_by == "classes") or (
            m.strategy == "class_proxy" and m.balanced and m.balance_by == "classes")
        if k > 1 and even and s.classes_per_batch > classes // k:
            raise ConfigError(
                f"sampler.classes_per_batch={s.classes_per_batch} is larger than the {classes // k} classes of the "
                f"smallest learner subset ({classes} training classes split evenly over model.num_learners={k}); "
                f"use sampler.classes_per_batch <= {classes // k} or fewer learners"
            )

    # -------------------------------------------------------------- checkpoint
    def _state(self, epoch: int, batch: int) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "epoch": epoch,
            "batch": batch,
            "partial": dict(self.partial),
            "best_val": self.best_val,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "assignment": None if self.assignment is None else torch.from_numpy(self.assignment.copy()),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }

    def _save(self, epoch: int, batch: int) -> Path:
        self._check_finite_weights(f"epoch {epoch}, batch {batch}" if batch else f"epoch {epoch - 1}")
        return save_checkpoint(self._state(epoch, batch), self.out)

    def _kept_checkpoint(self) -> str:
        if (self.out / "last.pt").exists() or (self.out / "prev.pt").exists():
            return f"The last good checkpoint is kept in {self.out} (last.pt)"
        return "No checkpoint had been written yet"

    def _check_finite_weights(self, where: str) -> None:
        """Never evaluate or checkpoint NaN/inf weights (a step can diverge with a finite loss)."""
        if all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            return
        raise NonFiniteLossError(
            f"model weights became NaN or infinite during {where}; stopping without writing a checkpoint. "
            f"{self._kept_checkpoint()}; lower optim.lr or enable optim.grad_clip"
        )

    def _restore(self) -> None:
        state, path = load_checkpoint(self.out, warn=self.log)
        require_keys(state, ("config", "epoch", "batch", "partial", "best_val", "model", "optimizer", "scheduler",
                             "assignment", "rng"), path)
        check_same_model(state["config"], self.cfg.to_dict())
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["assignment"] is not None:
            self._set_assignment(state["assignment"].numpy())
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.start_epoch, self.start_batch = int(state["epoch"]), int(state["batch"])
        self.partial = dict(state["partial"])
        self.best_val = float(state["best_val"])
        # Drop log records written after this checkpoint so the log matches an uninterrupted run.
        # Mid-epoch, the epoch's meta-class record is already there and is not redone; its
        # train/val/test records (written by an attempt killed after the epoch) are redone.
        self.logger.truncate_after(self.start_epoch, keep_at_epoch=("metaclass",) if self.start_batch else ())
        where = f"epoch {self.start_epoch}" + (f", batch {self.start_batch}" if self.start_batch else "")
        self.log(f"resumed from {path} at {where}")

    # ------------------------------------------------------------- meta-class
    def _set_assignment(self, assignment: np.ndarray) -> None:
        self.assignment = assignment
        if self.per_learner is not None:  # K x C meta-class labels; batches come from all data
            self.meta_labels = torch.from_numpy(assignment).to(self.device)
            return
        if self.strategy.level == "class":
            groups = assignment[self.data.train.labels]
        else:
            groups = assignment
        self.sampler.set_assignment(groups, num_groups=self.cfg.model.num_learners)

    def _embed(self, dataset: Dataset, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        return extract_embeddings(
            self.model, dataset, batch_size=self.cfg.eval.batch_size, num_workers=self.cfg.data.workers,
            device=self.device, progress=self.progress, desc=desc,
        )

    def _update_metaclasses(self, epoch: int) -> None:
        needs_embeddings = self.cfg.metaclass.strategy in ("class_proxy", "samples")
        embeddings = None
        if needs_embeddings:
            embeddings, _ = self._embed(self.train_eval_set, f"epoch {epoch}: proxies")
        labels = self.data.train.labels
        if self.per_learner is not None:
            self._update_per_learner(epoch, embeddings, labels)
            return
        new = self.strategy.assign(embeddings, labels, self.data.train.num_classes,
                                   previous=self.assignment, seed=self.cfg.train.seed + epoch)
        stats = assignment_stats(new, labels, self.data.train.num_classes, previous=self.assignment,
                                 level=self.strategy.level)
        self._set_assignment(np.asarray(new, dtype=np.int64))
        values = {"classes_per_learner": stats.classes_per_learner, "images_per_learner": stats.images_per_learner,
                  "moved_fraction": stats.moved_fraction}
        self.logger.log("metaclass", epoch, values)
        self.log(f"epoch {epoch}: meta-classes updated: classes/learner {stats.classes_per_learner}, "
                 f"images/learner {stats.images_per_learner}, moved {stats.moved_fraction:.1%}")

    def _update_per_learner(self, epoch: int, embeddings: torch.Tensor | None, labels: np.ndarray) -> None:
        num_classes = self.data.train.num_classes
        new = self.per_learner.assign(embeddings, labels, num_classes, self.model.learner_slices(),
                                      previous=self.assignment, seed=self.cfg.train.seed + epoch)
        previous = self.assignment if self.assignment is not None else [None] * len(new)
        rows = [assignment_stats(row, labels, num_classes, previous=old, num_learners=self.per_learner.num_metaclasses)
                for row, old in zip(new, previous)]
        self._set_assignment(new)
        moved = float(np.mean([r.moved_fraction for r in rows]))
        # Every learner sees every class; the sizes that matter are its meta-classes'.
        values = {"classes_per_learner": [num_classes] * len(rows), "images_per_learner": [len(labels)] * len(rows),
                  "moved_fraction": moved, "classes_per_metaclass": [r.classes_per_learner for r in rows]}
        self.logger.log("metaclass", epoch, values)
        sizes = rows[0].classes_per_learner
        self.log(f"epoch {epoch}: per-learner meta-classes updated: {len(rows)} learners x "
                 f"{len(sizes)} meta-classes of {min(sizes)}-{max(sizes)} classes, moved {moved:.1%}")

    # ------------------------------------------------------------------ steps
    def _loader(self, epoch: int, plan: list[tuple[int, list[int]]], first: int) -> DataLoader:
        keyed = [[(idx, item_seed(self.cfg.train.seed, epoch, b, pos)) for pos, idx in enumerate(indices)]
                 for b, (_, indices) in enumerate(plan)][first:]
        workers = self.cfg.data.workers
        # Its own generator: a DataLoader draws its base seed from the global torch RNG otherwise,
        # so resuming mid-epoch (a second loader for the same epoch) would shift the RNG state.
        # (Augmentation is seeded per item, so this seed changes nothing else.)
        generator = torch.Generator().manual_seed(item_seed(self.cfg.train.seed, epoch, 0, 0))
        return DataLoader(self.train_set, batch_sampler=keyed, num_workers=workers, generator=generator,
                          persistent_workers=False, pin_memory=self.device.type == "cuda")

    def _step(self, images: torch.Tensor, labels: torch.Tensor, learner: int | None) -> tuple[float, int]:
        self.model.train()
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device)
        use_amp = self.cfg.train.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            embeddings = self.model(images)
        embeddings = embeddings.float()
        if self.per_learner is not None and learner is not None:  # learner_data=all: every learner, own labels
            slices = self.model.learner_slices()
            loss, info = self.loss_fn.all_learners(embeddings, labels, slices,
                                                   [row[labels] for row in self.meta_labels])
        else:
            learner_slice = None if learner is None else self.model.learner_slices()[learner]
            loss, info = self.loss_fn(embeddings, labels, learner_slice)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss.item()} (learner {learner}); stopping. {self._kept_checkpoint()}; "
                f"lower optim.lr or enable optim.grad_clip"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        return float(loss.item()), int(info.get("triplets", 0))

    def _train_epoch(self, epoch: int, finetune: bool) -> dict[str, float]:
        plan = self.sampler.plan_epoch(epoch)
        first = self.start_batch if epoch == self.start_epoch else 0
        if first == 0:
            self.partial = {"loss_sum": 0.0, "steps": 0, "triplets": 0}
        bar = tqdm(total=len(plan), initial=first, desc=f"epoch {epoch}", disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        for b, (images, labels) in enumerate(self._loader(epoch, plan, first), start=first):
            learner = None if finetune or self.cfg.model.num_learners == 1 else plan[b][0]
            loss, triplets = self._step(images, labels, learner)
            self.partial["loss_sum"] += loss
            self.partial["steps"] += 1
            self.partial["triplets"] += triplets
            bar.update(1)
            bar.set_postfix(loss=f"{self.partial['loss_sum'] / self.partial['steps']:.4f}")
            if self._interrupt_requested and b + 1 < len(plan):
                bar.close()
                path = self._save(epoch, b + 1)
                raise TrainingInterrupted(f"interrupted: checkpoint written to {path}")
        bar.close()
        steps = max(1, self.partial["steps"])
        return {"loss": self.partial["loss_sum"] / steps, "triplets_per_step": self.partial["triplets"] / steps}

    # ------------------------------------------------------------- evaluation
    def evaluate(self, dataset: ImageDataset, desc: str, clustering: bool | None = None) -> EvalResult:
        embeddings, labels = self._embed(dataset, desc)
        records = dataset.records
        ks = self.cfg.eval.recall_ks or list(default_recall_ks(self.cfg.data.dataset))
        return evaluate_embeddings(
            embeddings, labels, recall_ks=ks, is_query=records.is_query, is_gallery=records.is_gallery,
            clustering=self.cfg.eval.clustering if clustering is None else clustering,
            backend=self.cfg.eval.backend, seed=self.cfg.train.seed,
        )

    def _end_of_epoch(self, epoch: int, train_stats: dict[str, float], seconds: float) -> None:
        self._check_finite_weights(f"epoch {epoch}")
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.logger.log("train", epoch, {**train_stats, "seconds": seconds, "lr": lrs[-1]})
        msg = f"epoch {epoch}: loss {train_stats['loss']:.4f} ({seconds:.0f} s)"
        if self.val_set is not None:
            val = self.evaluate(self.val_set, f"epoch {epoch}: validation", clustering=False)
            self.logger.log("val", epoch, val.to_dict())
            r1 = val.recall[min(val.recall)]
            msg += f", val R@1 {100 * r1:.1f}"
            if r1 > self.best_val:  # model selection uses held-out training classes only
                self.best_val = r1
                save_model_only(self.model, self.cfg, self.out / "best.pt")
        every, last = self.cfg.train.eval_test_every, self.total_epochs - 1
        if (every and epoch % every == 0) or epoch == last:
            test = self.evaluate(self.test_set, f"epoch {epoch}: test")
            self.logger.log("test", epoch, test.to_dict())
            msg += f", test R@1 {100 * test.recall[min(test.recall)]:.1f}"
            if test.nmi is not None:
                msg += f" NMI {100 * test.nmi:.1f}"
            msg += f" MAP@R {100 * test.map_at_r:.1f}"
            self.last_test = test
        self.log(msg)

    # -------------------------------------------------------------------- run
    @property
    def total_epochs(self) -> int:
        return self.cfg.train.epochs + self.cfg.train.finetune_epochs

    def _on_sigint(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        if self._interrupt_requested:  # a second Ctrl-C aborts at once
            raise KeyboardInterrupt
        self._interrupt_requested = True
        self.log("\nCtrl-C: finishing the current step and writing a checkpoint (press again to abort)")

    def run(self) -> EvalResult:
        self.setup()
        self.last_test: EvalResult | None = None
        previous_handler = signal.signal(signal.SIGINT, self._on_sigint) if _is_main_thread() else None
        try:
            if self.start_epoch == 0 and self.start_batch == 0:
                self.log(f"training {self.cfg.name}: {len(self.data.train)} images / {self.data.train.num_classes} classes,"
                         f" {self.batches_per_epoch} batches per epoch, {self.total_epochs} epochs -> {self.out}")
            for epoch in range(self.start_epoch, self.total_epochs):
                finetune = epoch >= self.cfg.train.epochs
                resuming_mid_epoch = epoch == self.start_epoch and self.start_batch > 0
                if not resuming_mid_epoch:
                    self._prepare_epoch(epoch, finetune)
                started = time.perf_counter()
                stats = self._train_epoch(epoch, finetune)
                self.scheduler.step()
                self._end_of_epoch(epoch, stats, time.perf_counter() - started)
                self.start_batch = 0
                path = self._save(epoch + 1, 0)
                if self._interrupt_requested and epoch + 1 < self.total_epochs:
                    # Ctrl-C during the epoch's last step or its evaluation: stop here.
                    raise TrainingInterrupted(f"interrupted: checkpoint written to {path}")
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
            self.logger.close()
        if self.last_test is None:  # resumed a finished run: evaluate the final weights
            self.last_test = self.evaluate(self.test_set, "test")
        save_model_only(self.model, self.cfg, self.out / "model.pt")
        write_json(self.out / "final_metrics.json", self.last_test.to_dict())
        return self.last_test

    def _prepare_epoch(self, epoch: int, finetune: bool) -> None:
        if finetune:
            if epoch == self.cfg.train.epochs:
                self.log(f"epoch {epoch}: fine-tuning the full embedding on all data")
            self.sampler.set_assignment(np.zeros(len(self.data.train), dtype=np.int64), num_groups=1)
            return
        m = self.cfg.metaclass
        due = epoch % m.update_every == 0
        if self.assignment is None or (due and (m.strategy != "random" or m.redraw)):
            self._update_metaclasses(epoch)


def _is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


