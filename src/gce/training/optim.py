"""Optimisers and learning-rate schedules, by the names ``optim.name`` and ``optim.scheduler`` accept."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from gce.config.vocabulary import OPTIMIZERS, SCHEDULERS
from gce.registry import Registry

if TYPE_CHECKING:
    from gce.config import ExperimentConfig, OptimConfig
    from gce.models import EmbeddingModel

__all__ = ["OPTIMIZER_REGISTRY", "SCHEDULER_REGISTRY", "build_optimizer", "build_scheduler"]

OptimizerFactory = Callable[[list[dict[str, Any]], "OptimConfig"], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, "OptimConfig", int], torch.optim.lr_scheduler.LRScheduler]

OPTIMIZER_REGISTRY: Registry[OptimizerFactory] = Registry("optimiser", "optim.name", OPTIMIZERS)
SCHEDULER_REGISTRY: Registry[SchedulerFactory] = Registry("scheduler", "optim.scheduler", SCHEDULERS)


# foreach=True: one fused kernel per parameter group instead of a Python loop (also on CPU).
@OPTIMIZER_REGISTRY.register("adam")
def _adam(groups: list[dict[str, Any]], o: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, foreach=True)


@OPTIMIZER_REGISTRY.register("adamw")
def _adamw(groups: list[dict[str, Any]], o: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, foreach=True)


@OPTIMIZER_REGISTRY.register("sgd")
def _sgd(groups: list[dict[str, Any]], o: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, momentum=o.momentum, nesterov=o.momentum > 0, foreach=True)


@SCHEDULER_REGISTRY.register("none")
def _constant(optimizer: torch.optim.Optimizer, o: OptimConfig, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@SCHEDULER_REGISTRY.register("cosine")
def _cosine(optimizer: torch.optim.Optimizer, o: OptimConfig, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)


@SCHEDULER_REGISTRY.register("step")
def _step(optimizer: torch.optim.Optimizer, o: OptimConfig, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=o.step_size, gamma=o.gamma)


def build_optimizer(
    model: EmbeddingModel, cfg: ExperimentConfig, loss: torch.nn.Module | None = None
) -> torch.optim.Optimizer:
    """``cfg.optim.name`` over the model's parameter groups (trunk and head learning rates) and,
    when the loss has parameters (a proxy loss's proxies), their own group first, at
    ``optim.lr x loss.proxy_lr_multiplier`` (proxies learn faster than the network, as the proxy
    losses' papers train them). First, so that the last group stays the head's (the logged lr)."""
    o = cfg.optim
    groups = model.param_groups(backbone_lr=o.backbone_lr or o.lr, head_lr=o.lr, weight_decay=o.weight_decay)
    proxies = [] if loss is None else [p for p in loss.parameters() if p.requires_grad]
    if proxies:
        lr = o.lr * cfg.loss.proxy_lr_multiplier
        groups = [{"name": "loss", "params": proxies, "lr": lr, "weight_decay": o.weight_decay}, *groups]
    return OPTIMIZER_REGISTRY[o.name](groups, o)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ExperimentConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """``cfg.optim.scheduler``, stepped once per epoch over training and fine-tuning epochs."""
    total = cfg.train.epochs + cfg.train.finetune_epochs
    return SCHEDULER_REGISTRY[cfg.optim.scheduler](optimizer, cfg.optim, total)
