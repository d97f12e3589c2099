"""Reading a config: YAML files (with ``extends:``), ``key.sub=value`` overrides, one-line errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gce.config.schema import ExperimentConfig
from gce.errors import ConfigError
from gce.io import write_text

__all__ = [
    "apply_override",
    "config_from_dict",
    "load_config",
    "parse_override",
    "read_config_tree",
    "read_yaml_mapping",
    "save_config",
]


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{key}'"
    if first["type"] == "missing":
        return f"missing config key '{key}'"
    if not key:  # a cross-field check: its message already names the keys
        return msg
    return f"bad value for '{key}': {msg} (got {first.get('input')!r})"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], value); the value is parsed as YAML (1e-4, true, [1, 2])."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return parts, value


def apply_override(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{'.'.join(parts)}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(tree: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message on one line: the problem and where (its own text spans several lines)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: ``{}``); one-line errors naming the
    file for a missing path, a folder, a non-UTF-8 or binary file and invalid YAML (a tab ...)."""
    if not os.fspath(path).strip():  # Path("") is ".", the current folder
        raise ConfigError(f"{what}: the path is empty")
    path = Path(os.path.expanduser(os.fspath(path)))
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; expected a YAML {what}")
    if not path.exists():
        raise ConfigError(f"{what} not found: {path}")
    if not path.is_file():  # a FIFO would block the read, /dev/zero never end it
        raise ConfigError(f"{path}: not a regular file (a pipe, socket or device); expected a YAML {what}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return loaded or {}


def read_config_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config; ``extends: other.yaml`` (relative to the file) is merged underneath."""
    if not os.fspath(path).strip():  # Path("") is ".", the current folder
        raise ConfigError("config file: the path is empty")
    path = Path(os.path.expanduser(os.fspath(path)))
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    tree = read_yaml_mapping(path, "config file")
    parent = tree.pop("extends", None)
    if parent is not None:
        base = read_config_tree(path.parent / str(parent), (*_seen, path.resolve()))
        tree = _merge(base, tree)
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load a YAML config file, apply ``key=value`` overrides, validate everything."""
    tree: dict[str, Any] = read_config_tree(path) if path is not None else {}
    for text in overrides:
        apply_override(tree, *parse_override(text))
    return config_from_dict(tree)


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    # atomic: a kill never leaves a half-written config.yaml
    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False), what="config")
