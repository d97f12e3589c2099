"""The names a model folder and an ``hf://`` reference are made of (no imports: everything here uses them)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CARD", "CONFIG", "HUB_SCHEME", "WEIGHTS", "HubReference"]

CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
HUB_SCHEME = "hf://"


@dataclass(frozen=True)
class HubReference:
    """``hf://repo_id[@revision]``: a model repository on the Hub, at a branch, tag or commit."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return HUB_SCHEME + self.repo_id + (f"@{self.revision}" if self.revision else "")
