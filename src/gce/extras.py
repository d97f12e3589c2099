"""Optional dependencies by job: a missing one is a one-line error naming the pip command."""

from __future__ import annotations

import importlib.util

from gce.errors import GceError

__all__ = ["DISTRIBUTION", "EXTRAS", "require_extra"]

#: The name on PyPI (``gce`` there is an unrelated project).
DISTRIBUTION = "gce-dml"

#: extra -> (the job it serves, the modules it provides). pyproject.toml lists the same packages.
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "serve": ("gce serve", ("fastapi", "uvicorn", "multipart")),
    "export": ("ONNX export", ("onnx", "onnxruntime", "onnxscript")),
    "tensorboard": ("TensorBoard logging", ("tensorboard",)),
    "mlflow": ("the mlflow tracker (train.trackers)", ("mlflow",)),
    "milvus": ("the Milvus index back end", ("pymilvus", "milvus_lite")),
    "timm": ("timm backbones", ("timm",)),
    "hub": ("model folders (gce model save, hf://)", ("safetensors", "huggingface_hub")),
}


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    return [m for m in EXTRAS[extra][1] if importlib.util.find_spec(m) is None]


def require_extra(extra: str) -> None:
    """Raise :class:`GceError` naming ``pip install 'gce-dml[extra]'`` if a module of ``extra`` is missing."""
    missing = missing_modules(extra)
    if missing:
        job = EXTRAS[extra][0]
        raise GceError(f"{job} needs {', '.join(missing)} (the '{extra}' extra): pip install '{DISTRIBUTION}[{extra}]'")
