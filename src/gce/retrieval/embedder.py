"""Embed images with a trained model, its test-time preprocessing taken from its checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from gce.data.images import load_rgb, to_rgb
from gce.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TEST_RESIZE_RATIO,
    test_transform,
)
from gce.errors import GceError
from gce.retrieval.files import shown_path

if TYPE_CHECKING:
    from gce.config import ExperimentConfig
    from gce.models import EmbeddingModel
    from gce.retrieval.runtimes import Runtime

__all__ = [
    "Embedder",
    "learner_slices_problem",
    "model_fingerprint",
    "normalize_learners",
    "slices_from_json",
    "slices_to_json",
]


def slices_to_json(slices: Sequence[slice]) -> list[list[int]]:
    return [[int(s.start), int(s.stop)] for s in slices]


def slices_from_json(values: Sequence[Sequence[int]]) -> list[slice]:
    return [slice(int(a), int(b)) for a, b in values]


def learner_slices_problem(values: Any, dim: Any, num_learners: Any) -> str | None:
    """Why ``values`` are not the learner slices of a model with ``num_learners`` learners in ``dim``
    dimensions, or None. A GCE head gives learner ``k`` the dimensions ``[k*d, (k+1)*d)``, d = D/K:
    slices that overlap, leave a gap, are empty or unequal would silently change every score."""
    if not _positive_int(dim) or not _positive_int(num_learners):
        return f"embedding_dim and num_learners must be positive integers, got {dim!r} and {num_learners!r}"
    if dim % num_learners:
        return f"embedding_dim {dim} is not a multiple of num_learners {num_learners}"
    width = dim // num_learners
    expected = [[k * width, (k + 1) * width] for k in range(num_learners)]
    if values != expected:
        shown = str(values)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return f"learner_slices {shown} are not the {num_learners} slices of {width} dimensions a model of D={dim} has"
    return None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def normalize_learners(x: np.ndarray, slices: Sequence[slice]) -> np.ndarray:
    """float32 copy of ``x`` (N x D) with each learner's slice scaled to unit length (zero rows stay zero)."""
    out = np.array(x, dtype=np.float32, copy=True)
    for s in slices:
        norms = np.linalg.norm(out[:, s], axis=1, keepdims=True)
        out[:, s] /= np.maximum(norms, 1e-12)
    return out


def model_fingerprint(
    model: torch.nn.Module, preprocessing: dict[str, Any], model_config: dict[str, Any] | None = None
) -> str:
    """sha256 of what decides the embeddings: architecture config, preprocessing and every weight.

    It names the *model*, not a file: ``model.pt`` and the training checkpoint it was exported
    from agree, so embeddings made with either can share an index.
    """
    digest = hashlib.sha256()
    config = dict(model_config or {})
    digest.update(json.dumps({"model": config, "preprocessing": preprocessing}, sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Embedder:
    """A loaded embedding model plus its preprocessing.

    ``embed_images`` / ``embed_paths`` return float32 ``N x D`` arrays in which each learner's slice
    (:attr:`learner_slices`) has unit length, as the model was trained.

    ``runtime`` runs the model: ``"torch"`` (PyTorch eager), ``"onnx"`` (ONNX Runtime on an export
    of it: ``onnx_file``, else one cached beside the checkpoint) or ``"auto"`` (ONNX Runtime on CPU
    when it is installed and matches PyTorch, else torch; with ``export_onnx=False`` only if an
    ONNX file is already there); see :mod:`gce.retrieval.runtimes`. The model id is the model's,
    whatever runs it.
    """

    def __init__(
        self,
        model: EmbeddingModel,
        *,
        image_size: int,
        resize_to: int | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        source: str | None = None,
        model_config: dict[str, Any] | None = None,
        runtime: str = "torch",
        onnx_file: str | os.PathLike | None = None,
        export_onnx: bool = True,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.image_size = int(image_size)
        self.resize_to = int(resize_to) if resize_to is not None else round(self.image_size * TEST_RESIZE_RATIO)
        self.transform = test_transform(self.image_size, resize_to=self.resize_to)
        self.batch_size = int(batch_size)
        self.source = source
        self.model_config: dict[str, Any] = dict(model_config or {})  # the checkpoint's model section
        #: the checkpoint's data section (dataset, root, split options), when loaded from one
        self.training_data: dict[str, Any] | None = None
        self.learner_slices: list[slice] = list(model.learner_slices())
        self.num_learners: int = int(model.num_learners)
        self.embedding_dim: int = int(model.embedding_dim)
        self.model_id: str = model_fingerprint(model, self.preprocessing(), self.model_config)
        # opened on first use: a command's input errors come before any export, alone on stderr
        self._runtime: Runtime | None = None
        self._runtime_request = (runtime, onnx_file, say)
        #: ``auto`` may export the model to ONNX (seconds) when no ONNX file is there yet; settable
        #: until the runtime opens (``gce embed`` allows it only for catalogues that repay it)
        self.export_onnx = export_onnx

    @property
    def runtime(self) -> Runtime:
        """What runs the model (its ``name``, ``threads`` and ``describe()`` say which), opened on
        first use; ``say`` (if given) hears about an export and then which runtime runs."""
        if self._runtime is None:
            from gce.retrieval.runtimes import open_runtime

            runtime, onnx_file, say = self._runtime_request
            opened = open_runtime(self, runtime, onnx_file=onnx_file, export=self.export_onnx, say=say)
            if say is not None:
                say(f"runtime {opened.name}: {opened.describe()}")
            self._runtime = opened
        return self._runtime

    @runtime.setter
    def runtime(self, value: Runtime) -> None:
        self._runtime = value

    def normalized(self, raw: np.ndarray) -> np.ndarray:
        """``raw`` model outputs (N x D) with each learner slice scaled to unit length."""
        return normalize_learners(raw, self.learner_slices)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str = "cpu",
        batch_size: int = 64,
        *,
        runtime: str = "torch",
        onnx_file: str | os.PathLike | None = None,
        export_onnx: bool = True,
        say: Callable[[str], None] | None = None,
    ) -> Embedder:
        """Load ``model.pt``/``best.pt``/a training checkpoint or run folder, a model folder or
        ``hf://org/name[@revision]`` (one-line errors)."""
        from gce.runtime import resolve_device
        from gce.training.checkpoint import load_model

        resolve_device(device, "--device")
        model, cfg = load_model(path, device=device)
        return cls.from_model(
            model,
            cfg,
            device=device,
            batch_size=batch_size,
            source=str(path),
            runtime=runtime,
            onnx_file=onnx_file,
            export_onnx=export_onnx,
            say=say,
        )

    @classmethod
    def from_model(
        cls,
        model: EmbeddingModel,
        cfg: ExperimentConfig,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        source: str | None = None,
        runtime: str = "torch",
        onnx_file: str | os.PathLike | None = None,
        export_onnx: bool = True,
        say: Callable[[str], None] | None = None,
    ) -> Embedder:
        """An embedder of a loaded model with the preprocessing and id its config gives it."""
        # pretrained=False: the weights come from the checkpoint (and the id stays what it was
        # when the model carried its build arguments itself)
        model_config = {**cfg.model.model_dump(), "pretrained": False}
        embedder = cls(
            model,
            image_size=cfg.data.image_size,
            resize_to=cfg.data.test_resize,
            device=device,
            batch_size=batch_size,
            source=source,
            model_config=model_config,
            runtime=runtime,
            onnx_file=onnx_file,
            export_onnx=export_onnx,
            say=say,
        )
        embedder.training_data = cfg.data.model_dump()
        return embedder

    # ------------------------------------------------------------------ description
    def preprocessing(self) -> dict[str, Any]:
        """What an image must go through before the model (for exports and other runtimes)."""
        return {
            "resize_short_side": self.resize_to,
            "center_crop": self.image_size,
            "color": "RGB",
            "scale": "pixels / 255",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "layout": "NCHW float32",
            "alpha": "composited onto white",
        }

    def metadata(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "embedding_dim": self.embedding_dim,
            "num_learners": self.num_learners,
            "learner_slices": slices_to_json(self.learner_slices),
            "image_size": self.image_size,
            "preprocessing": self.preprocessing(),
            "model": dict(self.model_config),
            "source": shown_path(self.source) if self.source else self.source,
        }

    # ------------------------------------------------------------------ embedding
    def embed_tensors(self, batch: torch.Tensor, runtime: Runtime | None = None) -> np.ndarray:
        """Preprocessed ``B x 3 x S x S`` images -> ``B x D`` float32, each learner slice unit length
        (``runtime``: another session of this model's runtime, e.g. one of :mod:`.batch_lanes`)."""
        out = (runtime or self.runtime)(batch)
        if out.ndim != 2 or out.shape != (len(batch), self.embedding_dim):
            raise GceError(f"the model returned {out.shape}, expected ({len(batch)}, {self.embedding_dim})")
        return normalize_learners(out, self.learner_slices)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.transform(to_rgb(im)) for im in images[start : start + self.batch_size]])
            chunks.append(self.embed_tensors(batch))
        return np.concatenate(chunks)

    def embed_paths(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """Embed image files; an unreadable one raises :class:`~gce.errors.BadImageError` naming it."""
        chunks = [
            self.embed_images([load_rgb(p) for p in paths[start : start + self.batch_size]])
            for start in range(0, len(paths), self.batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.embedding_dim), dtype=np.float32)

    def __repr__(self) -> str:
        return (
            f"Embedder(K={self.num_learners}, D={self.embedding_dim}, {self.image_size} px,"
            f" model_id={self.model_id[:12]}, source={Path(self.source).name if self.source else None})"
        )
