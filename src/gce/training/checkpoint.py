"""Atomic, verifiable checkpoints.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
the old one, so a crash (even SIGKILL) mid-write never leaves a half-written ``last.pt``. The
previous good checkpoint is kept as ``prev.pt``; loading falls back to it when ``last.pt`` is
unreadable. Checkpoints hold only tensors and plain Python values so they load with
``torch.load(weights_only=True)``, which cannot execute code from a tampered file.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gce.errors import CheckpointError

if TYPE_CHECKING:
    from gce.config import ExperimentConfig
    from gce.models import EmbeddingModel

LAST = "last.pt"
PREVIOUS = "prev.pt"
_FORMAT = 1


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], folder: str | Path) -> Path:
    """Write ``state`` as ``folder/last.pt`` atomically; the old one becomes ``prev.pt``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format": _FORMAT, "state": state}, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    _remove_stale_temporaries(folder)
    tmp = folder / f".{LAST}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        (folder / f".{LAST}.sha256.tmp").write_text(digest)
    except OSError as exc:  # disk full, quota, folder gone: the old checkpoints are untouched
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write a checkpoint to {folder}: {exc.strerror or exc};"
                              f" the previous checkpoint is kept") from None
    last = folder / LAST
    if last.exists():
        # The checksum moves first: a kill between the two renames then leaves last.pt without a
        # checksum (loaded unverified, it is complete) rather than prev.pt with last.pt's old
        # checksum of another file (a mismatch, and no last.pt to load instead).
        sha, previous_sha = folder / f"{LAST}.sha256", folder / f"{PREVIOUS}.sha256"
        if sha.exists():
            os.replace(sha, previous_sha)
        elif previous_sha.exists():  # last.pt lost its checksum to a kill: prev.pt must not get a stale one
            os.unlink(previous_sha)
        os.replace(last, folder / PREVIOUS)
    os.replace(tmp, last)
    os.replace(folder / f".{LAST}.sha256.tmp", folder / f"{LAST}.sha256")
    _fsync_dir(folder)
    return last


def save_export(state: dict[str, Any], path: str | Path) -> Path:
    """Write a single-file export (e.g. ``model.pt``) in the checkpoint container, atomically.

    It loads with :func:`load_checkpoint` like a training checkpoint, but keeps no ``prev.pt``.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({"format": _FORMAT, "state": state}, buffer)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return path


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete ``.last.pt.tmp-<pid>`` files left by killed writers (one checkpoint size each)."""
    prefix = f".{LAST}.tmp-"
    for name in os.listdir(folder):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue  # another live process is writing (it should not be, but leave its file alone)
        try:
            os.unlink(folder / name)
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours (EPERM)
        return True
    return True


def _read_verified(path: Path) -> dict[str, Any]:
    payload = path.read_bytes()
    sha_file = path.with_name(path.name + ".sha256")
    if sha_file.exists() and hashlib.sha256(payload).hexdigest() != sha_file.read_text().strip():
        raise CheckpointError(f"{path}: checksum mismatch (file is damaged or half-written)")
    try:
        blob = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged zip/pickle
        raise CheckpointError(f"{path}: cannot be read ({_load_problem(exc)})") from None
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: not a gce checkpoint")
    return blob["state"]


def _load_problem(exc: Exception) -> str:
    """torch.load's error on one line. Its weights-only refusal is a paragraph that suggests
    weights_only=False; what matters is the last line (the refused global or opcode)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "Weights only load failed" in str(exc):
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        detail = [line for line in lines if not line.startswith(boilerplate)]
        return f"refused by the weights-only loader: {detail[0] if detail else 'unsupported content'}"
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def load_checkpoint(path_or_folder: str | Path, *, warn=print) -> tuple[dict[str, Any], Path]:
    """Load a checkpoint file, or the newest good one in a run folder.

    For a folder, ``last.pt`` is tried first and ``prev.pt`` if it is damaged (with a message).
    """
    target = Path(path_or_folder)
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
def save_model_only(model: EmbeddingModel, cfg: ExperimentConfig, path: Path) -> None:
    """An export for evaluation and search: weights plus the model config, no optimiser state."""
    save_export({"config": cfg.to_dict(), "model": model.state_dict()}, path)


def require_keys(state: dict[str, Any], keys: tuple[str, ...], path: str | Path) -> None:
    missing = [key for key in keys if key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a gce checkpoint of this version (missing {', '.join(missing)})")


def check_same_model(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a run whose model/data/sampler settings differ from the checkpoint's."""
    differences = []
    for section in ("model", "data", "metaclass", "loss", "sampler", "optim"):
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key) and key not in ("workers",):
                differences.append(f"{section}.{key}: checkpoint {a.get(key)!r}, config {b.get(key)!r}")
    if differences:
        raise CheckpointError("checkpoint was written with another configuration: " + "; ".join(differences))


def load_model(path: str | Path, device: str = "cpu") -> tuple[EmbeddingModel, ExperimentConfig]:
    """Load an exported ``model.pt``/``best.pt`` or a training checkpoint for evaluation."""
    from gce.config import config_from_dict
    from gce.models import build_model

    state, _ = load_checkpoint(path)
    require_keys(state, ("config", "model"), path)
    cfg = config_from_dict(state["config"])
    m = cfg.model
    model = build_model(backbone=m.backbone, head=m.head, num_learners=m.num_learners,
                        embedding_dim=m.embedding_dim, pretrained=False, freeze_bn=m.freeze_bn, pooling=m.pooling,
                        block_channels=m.block_channels, input_mixing=m.input_mixing,
                        block=m.block, block_residual=m.block_residual, grouped_trunk_layers=m.grouped_trunk_layers)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model in its config ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval(), cfg
