"""A model folder: ``model.safetensors`` (the state dict), ``config.json`` (the training config and
what rebuilding and preprocessing need), ``README.md`` (the model card), the Hub's layout.

``config.json`` names the weights by their sha256, so a damaged or swapped ``model.safetensors`` is
refused on load. It is written last: a save killed midway leaves either the old folder or new
weights that the old ``config.json`` refuses (rerun the save), never a model that loads wrongly.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gce.errors import CheckpointError, ConfigError
from gce.extras import require_extra
from gce.io import OutputError, check_output_dir, sha256_of, write_bytes, write_json, write_text
from gce.sharing.names import CARD, CONFIG, WEIGHTS

if TYPE_CHECKING:
    import torch

    from gce.config import ExperimentConfig
    from gce.models import EmbeddingModel

__all__ = [
    "FORMAT",
    "check_license",
    "check_model_output",
    "load_model_folder",
    "read_folder_config",
    "read_weights",
    "save_model_folder",
]

#: The layout version in ``config.json`` (``gce_format``); a reader refuses one it does not know.
FORMAT = 1
#: What the Hub accepts as a license id (lower-case SPDX-like names: mit, apache-2.0, cc-by-nc-4.0, other).
LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")
#: What ``config.json`` must hold, and the type of each.
_KEYS: dict[str, type | tuple[type, ...]] = {
    "model_id": str,
    "embedding_dim": int,
    "num_learners": int,
    "learner_slices": list,
    "image_size": int,
    "preprocessing": dict,
    "config": dict,
    "weights": dict,
}


def check_license(license: str) -> None:
    if not LICENSE.fullmatch(license):
        raise ConfigError(f"--license {license!r}: expected a lower-case license id such as mit, apache-2.0, other")


def check_model_output(out: Path, inputs: list[Path]) -> Path:
    """Before any work: ``out`` is new, empty, or a model folder gce wrote (never anyone else's
    ``config.json``, e.g. another library's model)."""
    out = check_output_dir(out, what="model folder", inputs=inputs, marker=CONFIG)
    if (out / CONFIG).exists():
        try:
            written_by_gce = "gce_format" in json.loads((out / CONFIG).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, TypeError):
            written_by_gce = False
        if not written_by_gce:
            raise OutputError(f"model folder {out} holds a {CONFIG} that gce did not write; choose another folder")
    return out


def save_model_folder(
    out: Path,
    model: torch.nn.Module,
    cfg: ExperimentConfig,
    description: dict[str, Any],
    *,
    name: str,
    license: str,
    metrics: dict[str, Any] | None,
    repo_hint: str | None = None,
) -> dict[str, Any]:
    """Write the folder ``out`` (checked by :func:`check_model_output`); returns its ``config.json``.

    ``description`` is ``Embedder.metadata()`` of the model: its id, layout and preprocessing.
    """
    require_extra("hub")
    from safetensors.torch import save

    from gce import __version__
    from gce.sharing.card import render_card

    check_license(license)
    # Copies: safetensors refuses tensors that share memory, and the file must not depend on how
    # the module happens to store them.
    tensors = {key: value.detach().to("cpu").clone().contiguous() for key, value in model.state_dict().items()}
    # One metadata key: safetensors writes its metadata map in hash order, which differs between
    # calls, and the same model must give the same bytes (gce's layout version is in config.json).
    payload = save(tensors, metadata={"format": "pt"})
    meta = {
        "gce_format": FORMAT,
        "library_name": "gce",
        "gce_version": __version__,
        "name": name,
        "license": license,
        **{key: description[key] for key in _KEYS if key in description},
        "config": cfg.to_dict(),
        "weights": {"file": WEIGHTS, "sha256": sha256_of(payload), "bytes": len(payload)},
        "metrics": metrics,
        "source": description.get("source"),
    }
    card = render_card(meta, repo_hint=repo_hint or f"ORG/{_repo_name(name)}")
    write_bytes(out / WEIGHTS, payload, what="model weights")
    write_text(out / CARD, card, what="model card")
    write_json(out / CONFIG, meta, what="model config")  # last: it names the weights above
    return meta


def _repo_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def read_folder_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a model folder, checked (one-line errors naming the file)."""
    path = folder / CONFIG
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: not a gce model folder (no {CONFIG})") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if not isinstance(meta, dict) or "gce_format" not in meta:
        raise CheckpointError(f"{path}: not a gce model folder (no gce_format; another library's model?)")
    if meta["gce_format"] != FORMAT:
        raise CheckpointError(
            f"{path}: model folder format {meta['gce_format']!r}; this gce reads format {FORMAT} (upgrade gce)"
        )
    for key, kind in _KEYS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise CheckpointError(f"{path}: '{key}' is missing or not a {getattr(kind, '__name__', kind)}")
    if not isinstance(meta["weights"].get("sha256"), str):
        raise CheckpointError(f"{path}: 'weights' names no sha256 of {WEIGHTS}")
    return meta


def read_weights(folder: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict in ``model.safetensors``, after its sha256 matched ``config.json``'s."""
    require_extra("hub")
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = folder / WEIGHTS
    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if sha256_of(payload) != meta["weights"]["sha256"]:
        raise CheckpointError(
            f"{path}: checksum mismatch with {CONFIG} (damaged, half-written, or from another save: save again)"
        )
    try:
        return load(payload)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file ({exc})") from None


def load_model_folder(
    folder: Path, device: str | torch.device = "cpu", *, shown: str | os.PathLike | None = None
) -> tuple[EmbeddingModel, ExperimentConfig]:
    """The model of a model folder and its training config, as ``load_model`` returns them."""
    from gce.config import config_from_dict
    from gce.models import build_model

    where = shown if shown is not None else folder
    meta = read_folder_config(folder)
    try:
        cfg = config_from_dict(meta["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{where}: the config in its {CONFIG} is not valid ({exc})") from None
    state = read_weights(folder, meta)
    model = build_model(cfg.model, pretrained=False)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{where}: weights do not fit the model in its config ({str(exc).splitlines()[0]})"
        ) from None
    return model.to(device).eval(), cfg
