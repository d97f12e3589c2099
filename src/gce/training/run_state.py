"""What a training checkpoint holds, and how the run's parts are captured into it and restored from it.

A checkpoint is the run's whole state at a batch boundary: settings and data split (to refuse a
resume that would mean another run), position (epoch, batch, partial epoch statistics), the
learned state (model, a proxy loss's proxies, optimiser, scheduler, meta-class assignment) and the
random streams (torch, Python, the run's GPU generator). Restoring all of it reproduces the
uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from gce.training.parts import RunParts

__all__ = ["CHECKPOINT_KEYS", "capture", "load_learned_state", "restore_rng", "rng_state"]

CHECKPOINT_KEYS = (
    "config",
    "epoch",
    "batch",
    "partial",
    "best_val",
    "model",
    "optimizer",
    "scheduler",
    "assignment",
    "rng",
)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The random state a resumed run continues from (on CUDA, the run's GPU generator too)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(rng: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    # A GPU run resumed on the CPU has no generator to restore; a CPU run resumed on a GPU
    # keeps the freshly seeded one.
    if isinstance(rng.get("cuda"), torch.Tensor) and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def capture(parts: RunParts, position: dict[str, Any], rng: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint of ``parts`` at ``position`` (config, split, epoch, batch, partial, best_val),
    with the random state ``rng`` (:func:`rng_state`, or every rank's in a distributed run)."""
    assignment = parts.reading.assignment
    return {
        **position,
        "model": parts.model.state_dict(),
        "loss": parts.loss.state_dict(),  # a proxy loss's proxies (empty for the triplet loss)
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "assignment": None if assignment is None else torch.from_numpy(assignment.copy()),
        "rng": rng,
    }


def load_learned_state(parts: RunParts, state: dict[str, Any]) -> None:
    """Model, proxies, optimiser and scheduler from ``state`` (a checkpoint older than proxy losses has
    no ``loss``: nothing to load). Raises what ``load_state_dict`` raises on a mismatch."""
    parts.model.load_state_dict(state["model"])
    parts.loss.load_state_dict(state.get("loss", {}))
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
