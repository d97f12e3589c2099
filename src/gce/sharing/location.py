"""What a ``--checkpoint`` names, and the one resolver of model folders and ``hf://`` references.

A checkpoint is a ``.pt`` file, a run folder (its ``last.pt``), a model folder written by
``gce model save`` (``config.json`` + ``model.safetensors``) or ``hf://org/name[@revision]``, a
model folder on the Hugging Face Hub, fetched into the Hub's cache. :func:`model_folder` tells the
last two apart from the first two; ``gce.training.checkpoint.load_model`` (which every command and
``Embedder.from_checkpoint`` load through) calls it. Torch-free: the commands' parsers import it.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from gce.errors import CheckpointError
from gce.io.paths import path_argument, user_path
from gce.sharing.names import CARD, CONFIG, HUB_SCHEME, WEIGHTS, HubReference

__all__ = [
    "CARD",
    "CONFIG",
    "HUB_SCHEME",
    "WEIGHTS",
    "HubReference",
    "checkpoint_argument",
    "folder_files",
    "is_model_folder",
    "model_folder",
    "parse_hub_reference",
]

# The Hub's repo names: letters, digits, '-', '_', '.'; one namespace (a user or an organisation).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def parse_hub_reference(text: str | os.PathLike) -> HubReference | None:
    """The reference ``text`` names, None when it is not an ``hf://`` one; a malformed one is an error.

    Only a ``str`` can be one: ``Path("hf://a/b")`` has lost a slash (``hf:/a/b``) and is a path.
    """
    if not isinstance(text, str) or not text.startswith(HUB_SCHEME):
        return None
    repo_id, at, revision = text[len(HUB_SCHEME) :].partition("@")
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or (at and not revision.strip()):
        raise CheckpointError(f"{text}: expected hf://org/name or hf://org/name@revision")
    return HubReference(repo_id, revision or None)


def checkpoint_argument(text: str) -> str | Path:
    """argparse ``type=`` of ``--checkpoint``: ``hf://org/name[@revision]`` kept as text (checked),
    anything else a path (as :func:`gce.io.path_argument`)."""
    try:
        return str(parse_hub_reference(text)) if text.startswith(HUB_SCHEME) else path_argument(text)
    except CheckpointError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a model folder's files (a run folder holds neither)."""
    target = Path(os.path.expanduser(os.fspath(path)))
    return target.is_dir() and any(os.path.lexists(target / name) for name in (CONFIG, WEIGHTS))


def folder_files(folder: str | os.PathLike) -> list[Path]:
    """The files a model folder is read from: the inputs an output path must never replace."""
    target = Path(os.path.expanduser(os.fspath(folder)))
    return [target / name for name in (CONFIG, WEIGHTS, CARD)]


def model_folder(checkpoint: str | os.PathLike) -> Path | None:
    """The local model folder ``checkpoint`` names (an ``hf://`` reference is fetched into, or found
    in, the Hub's cache), or None for a ``.pt`` file or run folder. Errors are one line."""
    reference = parse_hub_reference(checkpoint)
    if reference is not None:
        from gce.sharing.hub import snapshot

        return snapshot(reference)
    target = user_path(checkpoint, "--checkpoint")
    return target if is_model_folder(target) else None
