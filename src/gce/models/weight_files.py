"""State-dict files of a backbone (``model.weights``, a downloaded checkpoint) and their strict loading.

A file is read on the CPU without running code (``torch.load(weights_only=True)``, or safetensors)
and loaded into the torchvision or timm model it was saved from, before the classifier is dropped.
Every key must fit: a missing, unexpected or wrongly shaped tensor is a one-line
:class:`~gce.errors.GceError` naming the first few, never torch's multi-line report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gce.errors import GceError

__all__ = ["StateFile", "load_strict", "read_state_file"]

#: How many key names an error lists of each kind.
_SHOWN = 3


@dataclass(frozen=True)
class StateFile:
    """A state dict and where it came from (what errors name)."""

    state: dict[str, Any]
    source: str


def _unwrap(state: Any) -> Any:
    """The tensors of a training checkpoint that wraps them (``{"state_dict": ...}``, ``{"model": ...}``)."""
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                return state[key]
    return state


def read_state_file(path: str | Path, what: str) -> StateFile:
    """Read a ``.safetensors`` file or a torch ``.pth``/``.pt`` state dict; ``what`` names it in errors."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise GceError(f"{what}={path}: no such file")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: one line, not the reader's traceback
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise GceError(f"cannot read {what}={path} ({type(exc).__name__}: {first.strip()})") from exc
    state = _unwrap(state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GceError(f"{what}={path} is not a state dict (a mapping of names to tensors)")
    return StateFile(state, f"{what}={path}")


def _first(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def load_strict(model: nn.Module, weights: StateFile, name: str) -> None:
    """Load ``weights`` into ``model`` with every key and shape matching, or raise a one-line GceError."""
    own = model.state_dict()
    given = weights.state
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    wrong = [
        f"{k} {tuple(given[k].shape)} (model {tuple(own[k].shape)})"
        for k in own
        if k in given and tuple(given[k].shape) != tuple(own[k].shape)
    ]
    problems = [
        f"{label}: {_first(keys)}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        if keys
    ]
    if problems:
        raise GceError(f"{weights.source} does not fit backbone {name}: {'; '.join(problems)}")
    model.load_state_dict(given)
