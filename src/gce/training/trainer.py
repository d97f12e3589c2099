"""The training loop: meta-class refreshes, per-learner triplet steps, validation, checkpoints.

One epoch = a fixed plan of class-balanced batches (P classes x M images), each drawn from one
learner's data subset, round-robin over learners. The plan, the augmentation of every image and the
meta-class refreshes are functions of (seed, epoch, batch), so a run resumed from any checkpoint,
even one written mid-epoch on Ctrl-C, reproduces the uninterrupted run bit for bit on CPU.

The loop runs over the parts it is given (:class:`~gce.training.parts.RunParts`); it builds none.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from gce.config import ExperimentConfig
from gce.data.images import ImageDataset
from gce.data.seeded import item_seed
from gce.data.split_record import check_same_split, split_record
from gce.errors import CheckpointError, GceError
from gce.evaluation import EvalResult
from gce.evaluation.pipeline import evaluate_split
from gce.training.checkpoint import changed_settings, check_same_model, require_keys
from gce.training.epoch_loader import EpochLoader
from gce.training.parts import RunParts, build_parts
from gce.training.run_folder import hold_run_folder
from gce.training.run_state import CHECKPOINT_KEYS, capture, load_learned_state, restore_rng, rng_state

EXIT_INTERRUPTED = 130
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(GceError):
    """Raised after Ctrl-C once the current step is finished and a checkpoint is written."""


class NonFiniteLossError(GceError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class EpochObserver(Protocol):
    """Extra measurements of the model, logged as ``event`` records: before training (epoch -1)
    and after every epoch. They run under a forked torch RNG, so they never change the run."""

    event: str

    def __call__(self, model: nn.Module, desc: str) -> dict[str, Any]: ...


def _fresh_partial() -> dict[str, float]:
    return {"loss_sum": 0.0, "steps": 0, "triplets": 0}


class Trainer:
    """Trains the run that ``parts`` make up; ``run()`` returns the final test metrics."""

    def __init__(
        self,
        parts: RunParts,
        *,
        resume: bool = False,
        log: Callable[[str], None] = print,
        observers: Sequence[EpochObserver] = (),
    ) -> None:
        self.parts = parts
        self.cfg: ExperimentConfig = parts.cfg
        self.resume = resume
        self.log = log
        self.observers = tuple(observers)
        self.total_epochs = self.cfg.train.epochs + self.cfg.train.finetune_epochs
        self.start_epoch, self.start_batch = 0, 0
        self.partial = _fresh_partial()
        self.best_val = -1.0
        self.last_test: EvalResult | None = None
        self._interrupt_requested = False
        self._split: dict[str, Any] | None = None
        self._epoch_loader: EpochLoader | None = None

    @classmethod
    def from_config(
        cls,
        cfg: ExperimentConfig,
        *,
        resume: bool = False,
        progress: bool = True,
        log: Callable[[str], None] = print,
        observers: Sequence[EpochObserver] = (),
    ) -> Trainer:
        return cls(build_parts(cfg, resume=resume, progress=progress), resume=resume, log=log, observers=observers)

    # -------------------------------------------------------------- checkpoint
    def split(self) -> dict[str, Any]:
        """What this run's data is (class lists and file digests per split), kept in checkpoints."""
        if self._split is None:
            d = self.parts.data
            self._split = split_record({"train": d.train, "val": d.val, "test": d.test})
        return self._split

    def _state(self, epoch: int, batch: int) -> dict[str, Any]:
        position = {
            "config": self.cfg.to_dict(),
            "split": self.split(),
            "epoch": epoch,
            "batch": batch,
            "partial": dict(self.partial),
            "best_val": self.best_val,
        }
        return capture(self.parts, position, self._rng_state())

    def _rng_state(self) -> dict[str, Any]:
        return rng_state(self.parts.device)

    def _restore_rng(self, state: dict[str, Any]) -> None:
        restore_rng(state["rng"], self.parts.device)

    def _save(self, epoch: int, batch: int) -> Path:
        self._check_finite_weights(f"epoch {epoch}, batch {batch}" if batch else f"epoch {epoch - 1}")
        return self.parts.writer.save_checkpoint(self._state(epoch, batch))

    def _check_finite_weights(self, where: str) -> None:
        """Never evaluate or checkpoint NaN/inf weights (a step can diverge with a finite loss)."""
        # One flag for all parameters: a single device-to-host sync on a GPU, not one per tensor.
        flags = [torch.isfinite(p).all() for p in self.parts.model.parameters()]
        if not flags or bool(torch.stack(flags).all()):
            return
        raise NonFiniteLossError(
            f"model weights became NaN or infinite during {where}; stopping without writing a checkpoint. "
            f"{self.parts.writer.kept_checkpoint()}; lower optim.lr or enable optim.grad_clip"
        )

    def _restore(self) -> None:
        p = self.parts
        state, path = p.writer.load_checkpoint(warn=self.log)
        require_keys(state, (*CHECKPOINT_KEYS, *(("loss",) if "loss" in state else ())), path)  # older: none
        # Everything that could make the checkpoint mean another run is checked before any of it
        # is used: the settings (seed included), then the data it was trained on.
        check_same_model(state["config"], self.cfg.to_dict())
        check_same_split(state.get("split"), self.split(), str(path), warn=self.log)
        try:
            load_learned_state(p, state)
            self.start_epoch, self.start_batch = int(state["epoch"]), int(state["batch"])
            if state["assignment"] is not None:
                p.reading.restore(state["assignment"].numpy())
                self._configure_sampler(finetune=self.start_epoch >= self.cfg.train.epochs)
            self._restore_rng(state)
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"{path}: its state does not fit this run ({type(exc).__name__}: {first})") from None
        changes = changed_settings(state["config"], self.cfg.to_dict())
        if changes:  # allowed (epochs, evaluation, device ...), but said, and recorded in config.yaml
            self.log(f"resuming with changed settings: {'; '.join(changes)} (written to config.yaml)")
        p.writer.record_config(self.cfg)
        self.partial = dict(state["partial"])
        self.best_val = float(state["best_val"])
        # Drop log records written after this checkpoint so the log matches an uninterrupted run.
        # Mid-epoch, the epoch's meta-class record is already there and is not redone; its
        # train/val/test records (written by an attempt killed after the epoch) are redone.
        p.writer.truncate_log(self.start_epoch, keep_at_epoch=("metaclass",) if self.start_batch else ())
        where = f"epoch {self.start_epoch}" + (f", batch {self.start_batch}" if self.start_batch else "")
        self.log(f"resumed from {path} at {where}")

    # ------------------------------------------------------------- meta-class
    def _configure_sampler(self, finetune: bool) -> None:
        if finetune:  # the full embedding on all data
            self.parts.sampler.set_assignment(None, num_groups=1)
        else:
            self.parts.reading.configure_sampler(self.parts.sampler)

    def _prepare_epoch(self, epoch: int, finetune: bool) -> None:
        if finetune:
            if epoch == self.cfg.train.epochs:
                self.log(f"epoch {epoch}: fine-tuning the full embedding on all data")
            self._configure_sampler(finetune=True)
        elif self.parts.reading.due(epoch):
            self._update_metaclasses(epoch)

    def _update_metaclasses(self, epoch: int) -> None:
        p = self.parts
        embeddings = None
        if p.reading.needs_embeddings:
            embeddings, _ = p.embed(p.model, p.train_eval_set, f"epoch {epoch}: proxies")
        update = p.reading.update(epoch, embeddings)
        p.reading.configure_sampler(p.sampler)
        p.writer.log("metaclass", epoch, update.values)
        self.log(f"epoch {epoch}: {update.message}")

    # ------------------------------------------------------------------ steps
    def _loader(self, epoch: int, plan: list[tuple[int, list[int]]], first: int) -> DataLoader:
        # Seeds follow positions in the whole planned batch, so a part of it is augmented the same way.
        keyed = [
            self.parts.batch_part(
                [(idx, item_seed(self.cfg.train.seed, epoch, b, pos)) for pos, idx in enumerate(indices)]
            )
            for b, (_, indices) in enumerate(plan)
        ][first:]
        if self._epoch_loader is None:  # one loader for the run: its workers persist between epochs
            self._epoch_loader = EpochLoader(
                self.parts.train_set,
                self.cfg.data.workers,
                pin_memory=self.parts.device.type == "cuda",
                seed=item_seed(self.cfg.train.seed, 0, 0, 0),
            )
        return self._epoch_loader.loader_for(keyed)

    def _step(self, images: torch.Tensor, labels: torch.Tensor, learner: int | None) -> tuple[float, int]:
        """One optimisation step on a batch planned for ``learner`` (``None``: the full embedding)."""
        p, device = self.parts, self.parts.device
        p.train_model.train()
        memory = torch.channels_last if self.cfg.train.channels_last else torch.preserve_format
        images = images.to(device, non_blocking=True, memory_format=memory)
        labels = labels.to(device, non_blocking=True)
        use_amp = self.cfg.train.amp and device.type == "cuda"
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            embeddings = p.train_model(images)
        loss, info = p.reading.batch_loss(p.loss, embeddings.float(), labels, learner)
        value = loss.item()  # the step's one wait for the GPU: the check below needs the value
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"loss became {value} ({'full embedding' if learner is None else f'learner {learner}'}); "
                f"stopping. {p.writer.kept_checkpoint()}; lower optim.lr or enable optim.grad_clip"
            )
        p.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(p.model.parameters(), self.cfg.optim.grad_clip)
        p.optimizer.step()
        return float(value), int(info.get("triplets", 0))

    def _train_epoch(self, epoch: int, finetune: bool) -> dict[str, float]:
        plan = self.parts.sampler.plan_epoch(epoch)
        first = self.start_batch if epoch == self.start_epoch else 0
        if first == 0:
            self.partial = _fresh_partial()
        bar = tqdm(
            total=len(plan),
            initial=first,
            desc=f"epoch {epoch}",
            disable=not self.parts.progress,
            leave=False,
            dynamic_ncols=True,
        )
        for b, (images, labels) in enumerate(self._loader(epoch, plan, first), start=first):
            loss, triplets = self._step(images, labels, None if finetune else plan[b][0])
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
        """Metrics of ``dataset``; ``clustering`` overrides ``eval.clustering`` when given."""
        metrics = self.parts.metrics if clustering is None else replace(self.parts.metrics, clustering=clustering)
        return evaluate_split(self.parts.model, dataset, self.parts.embed, metrics, desc).result

    def _validate(self, epoch: int) -> str:
        p = self.parts
        assert p.val_set is not None  # called only for runs with a validation split
        val = self.evaluate(p.val_set, f"epoch {epoch}: validation", clustering=False)
        p.writer.log("val", epoch, val.to_dict())
        r1 = val.recall[min(val.recall)]
        if r1 > self.best_val:  # model selection uses held-out training classes only
            self.best_val = r1
            p.writer.save_model(p.model, self.cfg, "best.pt")
        return f", val R@1 {100 * r1:.1f}"

    def _test(self, epoch: int) -> str:
        test = self.evaluate(self.parts.test_set, f"epoch {epoch}: test")
        self.parts.writer.log("test", epoch, test.to_dict())
        self.last_test = test
        msg = f", test R@1 {100 * test.recall[min(test.recall)]:.1f}"
        if test.nmi is not None:
            msg += f" NMI {100 * test.nmi:.1f}"
        return msg + f" MAP@R {100 * test.map_at_r:.1f}"

    def _end_of_epoch(self, epoch: int, train_stats: dict[str, float], seconds: float) -> None:
        self._check_finite_weights(f"epoch {epoch}")
        lrs = [g["lr"] for g in self.parts.optimizer.param_groups]
        self.parts.writer.log("train", epoch, {**train_stats, "seconds": seconds, "lr": lrs[-1]})
        msg = f"epoch {epoch}: loss {train_stats['loss']:.4f} ({seconds:.0f} s)"
        if self.parts.val_set is not None:
            msg += self._validate(epoch)
        every = self.cfg.train.eval_test_every
        if (every and epoch % every == 0) or epoch == self.total_epochs - 1:
            msg += self._test(epoch)
        self.log(msg)

    def _observe(self, epoch: int) -> None:
        for observer in self.observers:
            # Embedding passes draw a DataLoader seed from the global torch RNG: fork it so that
            # observing a run leaves its random stream, and so its results, unchanged.
            with torch.random.fork_rng(devices=[]):
                values = observer(self.parts.model, f"epoch {epoch}: {observer.event}")
            self.parts.writer.log(observer.event, epoch, values)

    # -------------------------------------------------------------------- run
    def _on_stop_signal(self, signum, frame) -> None:  # signal handler signature
        if self._interrupt_requested:  # a second Ctrl-C (or SIGTERM) aborts at once
            raise KeyboardInterrupt
        self._interrupt_requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.log(f"\n{name}: finishing the current step and writing a checkpoint (a second one aborts)")

    def _run_epoch(self, epoch: int) -> None:
        finetune = epoch >= self.cfg.train.epochs
        if not (epoch == self.start_epoch and self.start_batch > 0):  # not resuming mid-epoch
            self._prepare_epoch(epoch, finetune)
        started = time.perf_counter()
        stats = self._train_epoch(epoch, finetune)
        self.parts.scheduler.step()
        self._end_of_epoch(epoch, stats, time.perf_counter() - started)
        self._observe(epoch)
        self.start_batch = 0
        path = self._save(epoch + 1, 0)
        if self._interrupt_requested:
            # Ctrl-C during the epoch's last step or its evaluation, the final epoch's too: stop
            # here; a resume of a finished run only evaluates and exports.
            done = (
                " (training is complete; resuming evaluates and exports model.pt)"
                if epoch + 1 == self.total_epochs
                else ""
            )
            raise TrainingInterrupted(f"interrupted: checkpoint written to {path}{done}")

    def run(self) -> EvalResult:
        # One training per run folder: the lock is held from the checkpoint read to model.pt (a
        # no-op when the caller, e.g. `gce train` or the ablation runner, holds it already).
        with self._hold_run_folder():
            return self._run()

    def _hold_run_folder(self) -> AbstractContextManager[None]:
        return hold_run_folder(self.parts.writer.out)

    def _run(self) -> EvalResult:
        p = self.parts
        if self.resume:
            self._restore()
        else:
            p.writer.start_fresh(self.cfg)
        # SIGTERM (a scheduler's preemption, torchrun stopping its workers) is handled like Ctrl-C.
        previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in STOP_SIGNALS} if _is_main_thread() else {}
        try:
            if self.start_epoch == 0 and self.start_batch == 0:
                self.log(
                    f"training {self.cfg.name}: {len(p.data.train)} images / {p.data.train.num_classes} classes,"
                    f" {p.sampler.batches_per_epoch} batches per epoch, {self.total_epochs} epochs -> {p.writer.out}"
                )
                self._observe(-1)
            for epoch in range(self.start_epoch, self.total_epochs):
                self._run_epoch(epoch)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            p.writer.close()
        if self.last_test is None:  # resumed a finished run: evaluate the final weights
            self.last_test = self.evaluate(p.test_set, "test")
        p.writer.save_model(p.model, self.cfg, "model.pt")
        p.writer.write_metrics("final_metrics.json", self.last_test.to_dict())
        return self.last_test


def _is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
