"""The configs that ship inside the package (``gce/config/presets``): list them, read one by name.

A pip user has no checkout, so ``gce config show emoji > my.yaml`` is where a config starts. In a
checkout, ``configs/`` is a link to the same folder.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from gce.errors import ConfigError

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

__all__ = ["preset_names", "preset_text", "presets_folder", "resolve_config_path"]

_SUFFIX = ".yaml"


def _presets() -> Traversable:
    return resources.files("gce.config") / "presets"


def _walk(folder: Traversable, prefix: str = "") -> list[str]:
    names: list[str] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            names += _walk(entry, f"{prefix}{entry.name}/")
        elif entry.name.endswith(_SUFFIX):
            names.append(prefix + entry.name.removesuffix(_SUFFIX))
    return names


def preset_names() -> list[str]:
    """Names of the bundled configs, e.g. ``emoji``, ``cub200``, ``ablation/emoji_single``."""
    return _walk(_presets())


def preset_text(name: str) -> str:
    """The YAML text of bundled config ``name`` (``emoji`` or ``emoji.yaml``); a one-line error names the valid ones."""
    name = name.removesuffix(_SUFFIX)
    names = preset_names()
    if name not in names:
        raise ConfigError(f"no bundled config named {name!r}; bundled: {', '.join(names)}")
    return _presets().joinpath(*f"{name}{_SUFFIX}".split("/")).read_text(encoding="utf-8")


def presets_folder() -> Path:
    """The folder of the bundled configs on disk (an installed package is a plain folder)."""
    return Path(str(_presets()))


def resolve_config_path(text: str) -> str:
    """A config argument as a path: an existing file as given, else a bundled config's name
    (``gce train emoji``), else as given (the loader then says the file is missing)."""
    if os.path.exists(os.path.expanduser(text)):
        return text
    name = text.removesuffix(_SUFFIX)
    return str(presets_folder().joinpath(*f"{name}{_SUFFIX}".split("/"))) if name in preset_names() else text
