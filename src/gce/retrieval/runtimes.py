"""Inference runtimes: what turns preprocessed images ``(N, 3, S, S)`` into raw embeddings ``(N, D)``.

``torch`` runs the PyTorch model (eager); ``onnx`` runs the same model exported by
:func:`gce.retrieval.export.export_model` in ONNX Runtime (2-3x faster on CPU, measured in
docs/retrieval.md). :func:`open_runtime` resolves a ``--runtime`` choice (``auto``, ``torch``,
``onnx``) for one :class:`~gce.retrieval.embedder.Embedder`:

- the ONNX file is the one given (``onnx_file``), else ``gce export``'s ``<model>.onnx`` beside the
  checkpoint when its ``.onnx.json`` names this model id, else ``<model>.onnx-cache/<model_id>.onnx``
  beside the checkpoint, exported once and reused while the model id matches (a folder gce cannot
  write: ``$XDG_CACHE_HOME/gce/onnx``); a cached file that fails to load or to agree is exported again;
- every ONNX session is checked against PyTorch on a fixed seeded batch with the bound
  ``gce export`` uses (:data:`~gce.retrieval.export.PARITY_LIMIT`), so embeddings of either runtime
  share an index (the model id does not depend on the runtime);
- ``auto`` is ONNX Runtime on CPU when it is installed and agrees, else torch with one line on
  stderr saying why; an explicit ``onnx`` that cannot be had is a one-line error.

Both runtimes take their intra-op thread count from torch's setting (:func:`set_threads`, the one
place that sets it), so ``--threads`` means the same for either.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from gce.config.vocabulary import RUNTIME_CHOICES, RUNTIME_NAMES
from gce.errors import GceError
from gce.registry import Registry

if TYPE_CHECKING:
    from gce.retrieval.embedder import Embedder

__all__ = [
    "RUNTIMES",
    "RUNTIME_CHOICES",
    "OnnxRuntime",
    "Runtime",
    "RuntimeUnavailable",
    "TorchRuntime",
    "cached_onnx_path",
    "open_runtime",
    "set_threads",
]


class Runtime(Protocol):
    name: str
    threads: int
    #: whether a server should pad batches to a few fixed sizes (see gce.serve.service)
    pads_batches: bool

    def __call__(self, images: torch.Tensor) -> np.ndarray: ...

    def describe(self) -> str: ...


RUNTIMES: Registry[Callable[..., Runtime]] = Registry("runtime", "--runtime", RUNTIME_NAMES)


class RuntimeUnavailable(Exception):
    """Why a runtime cannot be used here (auto says it and falls back; an explicit choice fails)."""


class NotExported(RuntimeUnavailable):
    """No ONNX file yet, and this caller does not want one made (auto then uses torch silently)."""


def set_threads(threads: int | None = None) -> int:
    """Set the intra-op threads of torch and of ONNX Runtime sessions created afterwards (``None``:
    keep torch's setting); returns the count in force."""
    if threads:
        torch.set_num_threads(int(threads))
    return int(torch.get_num_threads())


@RUNTIMES.register("torch")
class TorchRuntime:
    """The PyTorch model itself, eager, under ``inference_mode``."""

    name = "torch"
    pads_batches = True  # oneDNN keeps compiled kernels per input shape

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self.threads = set_threads()

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(torch.as_tensor(images).to(self.device))
        if not isinstance(out, torch.Tensor):
            raise GceError(f"the model returned {type(out).__name__}, expected a tensor")
        return out.float().cpu().numpy()

    def describe(self) -> str:
        return f"torch {torch.__version__} on {self.device}, {self.threads} thread(s)"


def _import_onnxruntime():  # one place, so that tests can make it fail
    import onnxruntime

    return onnxruntime


@RUNTIMES.register("onnx")
class OnnxRuntime:
    """One ONNX Runtime session of an exported model (thread-safe: ``run`` may be called concurrently)."""

    name = "onnx"
    pads_batches = False

    def __init__(
        self, path: Path, device: torch.device, providers: list[str] | None = None, *, threads: int | None = None
    ) -> None:
        try:
            ort = _import_onnxruntime()
        except ImportError:
            raise RuntimeUnavailable("onnxruntime is not installed (pip install 'gce-dml[export]')") from None
        self.path = Path(path)
        self.threads = int(threads) if threads else set_threads()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1  # one graph, run op after op: threads go to each op
        # no spinning between ops: on a shared or busy machine a spinning pool takes the CPU that the
        # decoding processes (gce embed) and the request threads (gce serve) need
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        if providers is None:
            providers = ["CUDAExecutionProvider"] if device.type == "cuda" else []
            providers.append("CPUExecutionProvider")
        missing = [p for p in providers if p not in available]
        if missing:
            raise RuntimeUnavailable(f"onnxruntime here lacks {', '.join(missing)} (it has {', '.join(available)})")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own types (a damaged file, an opset it lacks)
            raise RuntimeUnavailable(f"onnxruntime cannot load {self.path.name} ({_first_line(exc)})") from None
        self.providers = list(self.session.get_providers())
        self.input_name = self.session.get_inputs()[0].name
        self.version = str(ort.__version__)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = np.ascontiguousarray(torch.as_tensor(images).detach().cpu().numpy(), dtype=np.float32)
        return self.session.run(None, {self.input_name: x})[0]

    def describe(self) -> str:
        return f"onnxruntime {self.version} ({self.providers[0]}), {self.threads} thread(s)"


# -- choosing and opening a runtime ----------------------------------------------------------------


def open_runtime(
    embedder: Embedder,
    requested: str = "torch",
    *,
    onnx_file: str | os.PathLike | None = None,
    export: bool = True,
    say: Callable[[str], None] | None = None,
) -> Runtime:
    """The runtime ``requested`` (``auto``, ``torch`` or ``onnx``) for ``embedder``'s model.

    ``export=False``: ``auto`` uses an ONNX file that is already there but exports none (for a
    few queries an export costs seconds that the faster runtime never wins back). ``say`` hears
    that an export is being made (it takes seconds); why ``auto`` fell back goes to stderr."""
    if requested not in RUNTIME_CHOICES:
        raise GceError(f"--runtime {requested!r} is unknown; choose one of {', '.join(RUNTIME_CHOICES)}")
    torch_runtime = RUNTIMES["torch"](embedder.model, embedder.device)
    if requested == "torch" or (requested == "auto" and embedder.device.type != "cpu" and onnx_file is None):
        return torch_runtime  # auto on a GPU: torch (ONNX Runtime's CUDA speed is not measured here)
    try:
        return _checked_onnx(embedder, torch_runtime, onnx_file, say or _silent, export or requested == "onnx")
    except NotExported:
        return torch_runtime
    except RuntimeUnavailable as exc:
        if requested == "onnx":
            raise GceError(f"--runtime onnx: {exc}") from None
        _stderr(f"runtime auto: using torch ({exc})")
        return torch_runtime


def parity_batch(image_size: int) -> torch.Tensor:
    """The fixed inputs every ONNX session is checked on (those of ``gce export``'s check)."""
    return torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))


def _checked_onnx(
    embedder: Embedder,
    reference: Runtime,
    onnx_file: str | os.PathLike | None,
    warn: Callable[[str], None],
    export: bool = True,
) -> Runtime:
    """A session on ``onnx_file``, else on the model's ``gce export`` beside it, else on the cached
    export (made now if missing; made again if it fails to load or to agree)."""
    _import_check()
    if onnx_file is not None:
        return _session(embedder, reference, Path(onnx_file))
    source = Path(embedder.source) if embedder.source else None
    beside = source.with_suffix(".onnx") if source is not None and source.is_file() else None
    if beside is not None and _is_cache_of(beside, embedder.model_id):  # `gce export`'s file of this model
        try:
            return _session(embedder, reference, beside)
        except RuntimeUnavailable as exc:
            _stderr(f"not using {beside}: {exc}")
    path = cached_onnx_path(embedder)
    if _is_cache_of(path, embedder.model_id):
        with suppress(RuntimeUnavailable):  # a damaged file: exported again below
            return _session(embedder, reference, path)
    if not export:
        raise NotExported("no ONNX file of this model yet")
    _remove_cached(path)  # ours (named by the model id): a leftover or a damaged file
    return _session(embedder, reference, _export(embedder, path, warn))


def _session(embedder: Embedder, reference: Runtime, path: Path) -> Runtime:
    """An ONNX Runtime session on ``path`` that agrees with PyTorch on :func:`parity_batch`."""
    from gce.retrieval.export import PARITY_LIMIT

    runtime = RUNTIMES["onnx"](path, embedder.device)
    difference = parity_difference(embedder, runtime, reference)
    if not difference <= PARITY_LIMIT:  # NaN fails too
        raise RuntimeUnavailable(
            f"the ONNX model differs from PyTorch by {difference:.1e} (> {PARITY_LIMIT:g}) on the parity batch"
        )
    return runtime


def parity_difference(embedder: Embedder, runtime: Runtime, reference: Runtime) -> float:
    """The largest difference of the two runtimes' embeddings (learner slices normalised) on
    :func:`parity_batch`; compare it with :data:`~gce.retrieval.export.PARITY_LIMIT`."""
    x = parity_batch(embedder.image_size)
    return float(np.abs(embedder.normalized(runtime(x)) - embedder.normalized(reference(x))).max())


def _import_check() -> None:
    try:
        _import_onnxruntime()
    except ImportError:
        raise RuntimeUnavailable("onnxruntime is not installed (pip install 'gce-dml[export]')") from None


# -- the ONNX cache --------------------------------------------------------------------------------


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/gce/onnx`` (``~/.cache/gce/onnx``): for models beside which gce cannot write."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gce" / "onnx"


def cached_onnx_path(embedder: Embedder) -> Path:
    """Where the ONNX file of ``embedder``'s model is cached: ``<checkpoint>.onnx-cache/<id>.onnx``
    when that folder can be written, else in :func:`user_cache_dir`."""
    name = f"{embedder.model_id}.onnx"
    source = Path(embedder.source) if embedder.source else None
    if source is not None and source.exists():
        folder = source.with_name(source.name + ".onnx-cache")
        try:
            folder.mkdir(exist_ok=True)
            if os.access(folder, os.W_OK | os.X_OK):
                return folder / name
        except OSError:
            pass
    return user_cache_dir() / name


def _is_cache_of(path: Path, model_id: str) -> bool:
    try:
        meta = json.loads(_sidecar(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return path.is_file() and isinstance(meta, dict) and meta.get("model_id") == model_id


def _export(embedder: Embedder, path: Path, warn: Callable[[str], None]) -> Path:
    from gce.extras import missing_modules
    from gce.retrieval.export import export_model

    missing = missing_modules("export")
    if missing:
        raise RuntimeUnavailable(f"exporting to ONNX needs {', '.join(missing)} (pip install 'gce-dml[export]')")
    warn(f"exporting the model to ONNX once (cached as {path})")
    problem = f"cannot write {path}"
    for target in (path, user_cache_dir() / path.name):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            export_model(embedder, target, "onnx")
            return target
        except OSError as exc:  # a read-only or full folder: the user cache, then give up
            problem = f"cannot write {target} ({exc.strerror or exc})"
        except GceError as exc:
            raise RuntimeUnavailable(f"the ONNX export failed ({exc})") from None
    raise RuntimeUnavailable(problem)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _remove_cached(path: Path) -> None:
    for file in (path, _sidecar(path)):
        with suppress(OSError):
            file.unlink(missing_ok=True)


def _silent(message: str) -> None:
    pass


def _stderr(message: str) -> None:
    print(f"gce: {message}", file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__
