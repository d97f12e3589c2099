"""Atomic, verified checkpoints.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
the old one, so a crash (even SIGKILL) mid-write never leaves a half-written ``last.pt``. The
previous good checkpoint is kept as ``prev.pt``; loading falls back to it when ``last.pt`` fails
its check. Every file loaded here (``last.pt``, ``prev.pt``, ``model.pt``, ``best.pt``) must match
its ``<name>.sha256``: a missing checksum is a failed check, so a damaged file whose checksum was
deleted is never trusted. Checkpoints hold only tensors and plain Python values so they load with
``torch.load(weights_only=True)``, which cannot execute code from a tampered file; what they hold
is then checked against what gce writes (types and keys) before it is used.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gce.errors import CheckpointError, ConfigError
from gce.io import (
    checksum_path,
    fsync_dir,
    fsync_file,
    remove_stale_temporaries,
    sha256_of,
    verify_checksum,
    write_bytes,
    write_checksum,
    write_text,
)
from gce.sharing.location import folder_files, is_model_folder, model_folder, parse_hub_reference

if TYPE_CHECKING:
    from gce.config import ExperimentConfig
    from gce.models import EmbeddingModel

LAST = "last.pt"
PREVIOUS = "prev.pt"
_FORMAT = 1


def save_checkpoint(state: dict[str, Any], folder: str | Path) -> Path:
    """Write ``state`` as ``folder/last.pt`` atomically; the old one becomes ``prev.pt``.

    The steps are ordered so that a kill between any two of them leaves a checkpoint that
    verifies (the old one or the new one): (1) ``prev.pt.sha256`` gets the old ``last.pt``'s
    checksum (only ``prev.pt`` is then unverifiable, ``last.pt`` still is); (2) ``last.pt`` becomes
    ``prev.pt``; (3) the new checksum becomes ``last.pt.sha256``; (4) the new file becomes
    ``last.pt``. An old ``last.pt`` that fails its own check skips (1) and (2): a damaged file is
    never promoted over a good ``prev.pt``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format": _FORMAT, "state": state}, buffer)
    payload = buffer.getvalue()
    digest = sha256_of(payload)
    last, sha, previous_sha = folder / LAST, checksum_path(folder / LAST), checksum_path(folder / PREVIOUS)
    for path in (last, sha):  # temporaries of killed writers (one checkpoint size each)
        remove_stale_temporaries(path)
    tmp, sha_tmp = (path.with_name(f".{path.name}.tmp-{os.getpid()}") for path in (last, sha))
    try:
        for path, data in ((tmp, payload), (sha_tmp, digest.encode("ascii"))):
            path.write_bytes(data)
            fsync_file(path)
    except OSError as exc:  # disk full, quota, folder gone: the old checkpoints are untouched
        tmp.unlink(missing_ok=True)
        sha_tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"cannot write a checkpoint to {folder}: {exc.strerror or exc}; the previous checkpoint is kept"
        ) from None
    if last.exists():
        try:
            verify_checksum(last)
            old_digest = sha.read_text().split()[0]
        except (CheckpointError, OSError, IndexError):
            old_digest = None
        if old_digest:
            write_text(previous_sha, old_digest, what="checksum")
            os.replace(last, folder / PREVIOUS)
        # else: a last.pt that fails its check (damaged, or its checksum deleted) never becomes
        # prev.pt; the prev.pt that is there (loaded instead of it) is kept, and last.pt replaced.
    os.replace(sha_tmp, sha)
    os.replace(tmp, last)
    fsync_dir(folder)
    return last


def save_export(state: dict[str, Any], path: str | Path) -> Path:
    """Write a single-file export (e.g. ``model.pt``) in the checkpoint container, atomically,
    with its ``.sha256`` beside it.

    It loads with :func:`load_checkpoint` like a training checkpoint, but keeps no ``prev.pt``.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({"format": _FORMAT, "state": state}, buffer)
    payload = buffer.getvalue()
    write_bytes(path, payload, what="model file")
    write_checksum(path, payload)
    return path


def _read_verified(path: Path) -> dict[str, Any]:
    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    verify_checksum(path, payload)
    try:
        blob = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged zip/pickle
        raise CheckpointError(f"{path}: cannot be read ({_load_problem(exc)})") from None
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT or not isinstance(blob.get("state"), dict):
        raise CheckpointError(f"{path}: not a gce checkpoint")
    return blob["state"]


def checkpoint_files(path_or_folder: str | Path) -> list[Path]:
    """The files :func:`load_model` may read for ``path_or_folder`` (with their checksums):
    the inputs an output path must never replace. A model folder's files; none for an ``hf://``
    reference (its files are in the Hub's cache, and nothing is fetched to check an output)."""
    if parse_hub_reference(path_or_folder) is not None:
        return []
    if is_model_folder(path_or_folder):
        return folder_files(path_or_folder)
    target = Path(os.path.expanduser(os.fspath(path_or_folder)))
    files = [target / LAST, target / PREVIOUS] if target.is_dir() else [target]
    return [*files, *(checksum_path(f) for f in files)]


def _load_problem(exc: Exception) -> str:
    """torch.load's error on one line. Its weights-only refusal is a paragraph that suggests
    weights_only=False; what matters is the last line (the refused global or opcode)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "Weights only load failed" in str(exc):
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        detail = [line for line in lines if not line.startswith(boilerplate)]
        return f"refused by the weights-only loader: {detail[0] if detail else 'unsupported content'}"
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def load_checkpoint(path_or_folder: str | os.PathLike, *, warn=print) -> tuple[dict[str, Any], Path]:
    """Load a checkpoint file, or the newest good one in a run folder.

    For a folder, ``last.pt`` is tried first and ``prev.pt`` if it fails its check (with a
    message). Every file must match its ``.sha256``; see the module docstring.
    """
    target = Path(os.path.expanduser(os.fspath(path_or_folder)))
    if target.is_file():
        return _read_verified(target), target
    if not target.is_dir():
        raise CheckpointError(f"no checkpoint at {target}")
    errors = []
    for name in (LAST, PREVIOUS):
        candidate = target / name
        if not candidate.exists():
            continue
        try:
            state = _read_verified(candidate)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        if errors:
            warn(f"warning: {errors[0]}; falling back to {candidate}")
        return state, candidate
    if errors:
        raise CheckpointError("; ".join(errors))
    raise CheckpointError(f"no checkpoint in {target} (expected {LAST})")


# ------------------------------------------------------------- model files
def save_model_only(model: torch.nn.Module, cfg: ExperimentConfig, path: Path) -> None:
    """An export for evaluation and search: weights plus the model config, no optimiser state."""
    save_export({"config": cfg.to_dict(), "model": model.state_dict()}, path)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


#: What gce writes under each key: a check, and the words for the error message.
_EXPECTED: dict[str, tuple[Any, str]] = {
    "config": (lambda v: isinstance(v, dict), "a mapping of config sections"),
    "epoch": (_is_count, "a non-negative integer"),
    "batch": (_is_count, "a non-negative integer"),
    "partial": (
        lambda v: (
            isinstance(v, dict)
            and all(
                isinstance(v.get(k), (int, float)) and not isinstance(v.get(k), bool)
                for k in ("loss_sum", "steps", "triplets")
            )
        ),
        "a mapping with loss_sum, steps and triplets",
    ),
    "best_val": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "model": (
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items()),
        "a mapping of parameter names to tensors",
    ),
    "loss": (
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items()),
        "a mapping of parameter names to tensors",
    ),
    "optimizer": (lambda v: isinstance(v, dict) and "state" in v and "param_groups" in v, "an optimiser state"),
    "scheduler": (lambda v: isinstance(v, dict), "a scheduler state"),
    "assignment": (
        lambda v: v is None or (isinstance(v, torch.Tensor) and v.dtype == torch.int64 and v.dim() in (1, 2)),
        "none or an integer tensor",
    ),
    "rng": (
        lambda v: (
            isinstance(v, dict)
            and isinstance(v.get("torch"), torch.Tensor)
            and v["torch"].dtype == torch.uint8
            and isinstance(v.get("python"), tuple)
        ),
        "torch and python RNG states",
    ),
}


def require_keys(state: dict[str, Any], keys: tuple[str, ...], path: str | os.PathLike) -> None:
    """Fail with one line unless ``state`` holds ``keys`` with the kinds of values gce writes there.

    The file passed its checksum, so a mismatch here means it was not written by this version of
    gce (or was written by another program with a valid checksum): refuse before using any of it.
    """
    missing = [key for key in keys if key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a gce checkpoint of this version (missing {', '.join(missing)})")
    for key in keys:
        check, words = _EXPECTED.get(key, (lambda v: True, ""))
        if not check(state[key]):
            raise CheckpointError(
                f"{path}: not a gce checkpoint ('{key}' should be {words}, found {type(state[key]).__name__})"
            )


#: Keys outside the model/data/training sections that still change what a run means: a resume
#: with another value is refused (train.seed draws every batch, augmentation and meta-class update).
_MEANING_KEYS = (("train", "seed"),)


def check_same_model(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a run whose model/data/sampler settings (or seed) differ from the checkpoint's."""
    differences = setting_differences(saved, current)
    if differences:
        raise CheckpointError("checkpoint was written with another configuration: " + "; ".join(differences))


def _schema_default(section: str, key: str) -> Any:
    """The schema's default of ``section.key`` (None when it has none)."""
    from gce.config import ExperimentConfig

    model = ExperimentConfig.model_fields[section].annotation
    field = getattr(model, "model_fields", {}).get(key)
    return None if field is None or field.is_required() else field.get_default(call_default_factory=True)


def setting_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings that make ``current`` another run than the checkpoint's ``saved`` config, as
    ``section.key: checkpoint A, config B`` (empty: the same run)."""
    differences = []
    for section in ("model", "data", "metaclass", "loss", "sampler", "optim"):
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            # A key added to the schema after the checkpoint was written had its default then.
            old = a[key] if key in a else _schema_default(section, key)
            if old != b.get(key) and key not in ("workers",):
                differences.append(f"{section}.{key}: checkpoint {old!r}, config {b.get(key)!r}")
    for section, key in _MEANING_KEYS:
        a, b = saved.get(section, {}).get(key), current.get(section, {}).get(key)
        if a != b:
            differences.append(f"{section}.{key}: checkpoint {a!r}, config {b!r}")
    return differences


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings a resume may change (epochs, evaluation, device, threads ...) that it does
    change, as ``key: old -> new``: said aloud on resume, and written to ``config.yaml``."""
    changes = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section), current.get(section)
        if not isinstance(a, dict) or not isinstance(b, dict):
            if a != b and section != "name":
                changes.append(f"{section}: {a!r} -> {b!r}")
            continue
        for key in sorted(set(a) | set(b)):
            old = a[key] if key in a else _schema_default(section, key)  # a key added since: its default
            if old != b.get(key):
                changes.append(f"{section}.{key}: {old!r} -> {b.get(key)!r}")
    return changes


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[EmbeddingModel, ExperimentConfig]:
    """Load an exported ``model.pt``/``best.pt``, a training checkpoint or run folder, a model folder
    (``gce model save``) or ``hf://org/name[@revision]`` for evaluation: every ``--checkpoint`` of
    every command, and ``Embedder.from_checkpoint``, load through here."""
    from gce.config import config_from_dict
    from gce.models import build_model

    folder = model_folder(path)
    if folder is not None:
        from gce.sharing.folder import load_model_folder

        return load_model_folder(folder, device, shown=path)
    state, _ = load_checkpoint(path)
    require_keys(state, ("config", "model"), path)
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: the config saved in it is not valid ({exc})") from None
    model = build_model(cfg.model, pretrained=False)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{path}: weights do not fit the model in its config ({str(exc).splitlines()[0]})"
        ) from None
    return model.to(device).eval(), cfg
