"""Export a trained model to ONNX or TorchScript, with its preprocessing and learner layout.

The exported graph is the whole model (trunk, group channel-wise block, per-learner
normalisation): ``images (N x 3 x S x S, ImageNet-normalised) -> embedding (N x D)`` with a dynamic
batch size. What a caller needs to feed it and to read its output (crop size, resize, mean/std,
K, D, each learner's slice, the model id) travels with it: as ONNX ``metadata_props`` (key
``gce``, a JSON string) or a TorchScript extra file ``gce.json``, and in a sidecar ``FILE.json``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gce.errors import GceError
from gce.extras import require_extra
from gce.io import OutputError, check_output_file
from gce.retrieval.files import commit_file, write_json_atomic

if TYPE_CHECKING:  # (a run-time import would close the cycle embedder -> runtimes -> export)
    from gce.retrieval.embedder import Embedder

__all__ = [
    "FORMATS",
    "PARITY_LIMIT",
    "check_export_output",
    "export_model",
    "load_exported",
    "parity_difference",
    "read_export_metadata",
]

FORMATS = ("onnx", "torchscript")
#: File extensions of each format: the readers (:func:`load_exported`) pick the runtime by it.
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".ts", ".pt", ".pth", ".torchscript")}
#: Oldest ONNX opset written: torch's exporter writes 18 and newer; for older ones it runs a version
#: converter that fails on common layers and then keeps opset 18 without saying so.
MIN_OPSET = 18
#: Largest accepted |exported - PyTorch| on unit-length learner slices. Other kernels reorder float32
#: sums: about depth x sqrt(terms) x eps, 1.8e-4 through resnet18 and 4.9e-4 through MobileNetV2
#: (tests/helpers/numerics.py); deeper trunks add to it. A wrong export (a layer, the preprocessing or the
#: normalisation) differs by 1e-2 or more.
PARITY_LIMIT = 2e-3
METADATA_KEY = "gce"
EXTRA_FILE = "gce.json"


def _metadata(embedder: Embedder, fmt: str) -> dict[str, Any]:
    return {
        **embedder.metadata(),
        "format": fmt,
        "input": {
            "name": "images",
            "shape": ["batch", 3, embedder.image_size, embedder.image_size],
            "dtype": "float32",
        },
        "output": {
            "name": "embedding",
            "shape": ["batch", embedder.embedding_dim],
            "note": "each learner slice is L2-normalised",
        },
    }


def export_suffix_problem(out: str | os.PathLike, fmt: str) -> str | None:
    """Why ``out``'s extension does not fit ``fmt`` (the readers pick the runtime by it), or None."""
    suffix = Path(out).suffix.lower()
    if suffix in SUFFIXES[fmt]:
        return None
    wanted = " or ".join(SUFFIXES[fmt])
    return f"--format {fmt} writes a {wanted} file, but --out {out} ends in {suffix or 'no extension'!r}"


def check_export_request(out: str | os.PathLike, fmt: str, opset: int | None) -> None:
    """Refuse, before any work, a format, extension or opset the export would not honour."""
    if fmt not in FORMATS:
        raise GceError(f"unknown export format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    problem = export_suffix_problem(out, fmt)
    if problem is not None:
        raise GceError(problem)
    if opset is None:
        return
    if fmt != "onnx":
        raise GceError(f"--opset {opset}: only --format onnx has an opset")
    require_extra("export")
    import onnx

    newest = int(onnx.defs.onnx_opset_version())
    if not MIN_OPSET <= opset <= newest:
        raise GceError(
            f"--opset {opset} is not supported: the exporter writes opsets {MIN_OPSET} to {newest}"
            f" (lower ones need a version conversion that fails on common layers)"
        )


def check_export_output(out: str | os.PathLike, fmt: str, *, inputs=(), opset: int | None = None) -> Path:
    """Check ``out`` and its ``out.json`` before any work; return the path to write.

    Beyond :func:`gce.io.check_output_file`'s rules (never one of ``inputs``, never a file with a
    ``.sha256``), an existing file is replaced only if it is an earlier gce export: its ``out.json``
    must be export metadata. Anything else (a run's ``config.yaml``, a user's file) is refused.
    """
    if fmt not in FORMATS:
        raise GceError(f"unknown export format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    out = check_output_file(out, what="--out", inputs=inputs)  # a folder, a FIFO ...: said first
    check_export_request(out, fmt, opset)
    sidecar = check_output_file(metadata_path(out), what="--out's metadata file", inputs=inputs)
    for path in (out, sidecar):
        if os.path.lexists(path) and not path.is_file():
            raise OutputError(f"--out {path} is not a regular file; gce export writes regular files only")
    if os.path.lexists(sidecar) and not _is_export_metadata(sidecar):
        raise OutputError(
            f"{sidecar} exists and is not the metadata of a gce export; it is not overwritten: choose another --out"
        )
    if os.path.lexists(out) and not os.path.lexists(sidecar):
        raise OutputError(
            f"--out {out} exists and is not a gce export (no {sidecar.name} beside it);"
            " gce export replaces only its own earlier exports: choose another path"
        )
    return out


def metadata_path(out: str | os.PathLike) -> Path:
    """The sidecar ``FILE.json`` of an export."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def _is_export_metadata(path: Path) -> bool:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(values, dict) and values.get("format") in FORMATS and isinstance(values.get("model_id"), str)


def export_model(
    embedder: Embedder,
    out: str | os.PathLike,
    fmt: str = "onnx",
    *,
    opset: int | None = None,
    check: Callable[[Path], None] | None = None,
    inputs=(),
) -> dict[str, Any]:
    """Write ``out`` (atomically) and ``out.json``; return the metadata.

    Everything is checked first (:func:`check_export_output`). The model goes to a temporary file;
    ``check(tmp)`` (e.g. a parity check) may refuse it by raising. Only then are ``out.json`` and
    ``out`` written: a failure leaves neither a partial file nor a folder this call created.
    """
    if Path(out).is_dir():
        example_name = "model.onnx" if fmt == "onnx" else "model.ts"
        raise GceError(f"{out} is a folder; give the file to write, e.g. {Path(out) / example_name}")
    out = check_export_output(out, fmt, inputs=inputs, opset=opset)
    created = _make_parents(out.parent)
    model = embedder.model.to("cpu").eval()
    size = embedder.image_size
    example = torch.randn(2, 3, size, size)
    meta = _metadata(embedder, fmt)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    done = False
    try:
        if fmt == "onnx":
            _export_onnx(model, example, tmp, meta, opset)
        else:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still widely loaded
                traced = torch.jit.trace(model, example, check_trace=False)
                torch.jit.save(traced, str(tmp), _extra_files={EXTRA_FILE: json.dumps(meta)})
        if check is not None:
            check(tmp)
        write_json_atomic(metadata_path(out), meta)
        commit_file(tmp, out)
        done = True
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.data").unlink(missing_ok=True)
        embedder.model.to(embedder.device)
        if not done:
            for folder in reversed(created):
                with suppress(OSError):
                    folder.rmdir()  # only if still empty
    return meta


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; return those created (outermost first)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _export_onnx(
    model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict[str, Any], opset: int | None
) -> None:
    require_extra("export")
    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    kwargs: dict[str, Any] = {"opset_version": opset} if opset else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["embedding"],
            dynamic_shapes=({0: batch},),
            verbose=False,
            **kwargs,
        )
    if program is None:
        raise GceError("torch.onnx.export returned nothing")
    program.save(str(path))
    proto = onnx.load(str(path))
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and written != opset:  # the exporter falls back to its own opset silently
        raise GceError(f"--opset {opset}: the exporter wrote opset {written} instead; no file was written")
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.save(proto, str(path))


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``gce`` metadata stored inside an exported file (not the sidecar)."""
    path = Path(path)
    if not path.is_file():
        raise GceError(f"{path}: no such file")
    if path.suffix.lower() == ".onnx":
        require_extra("export")
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf raises DecodeError and friends
            raise GceError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
        values = {p.key: p.value for p in proto.metadata_props}
        if METADATA_KEY not in values:
            raise GceError(f"{path}: an ONNX model without gce metadata")
        return _parse_metadata(path, values[METADATA_KEY])
    extra = {EXTRA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise GceError(f"{path}: not a TorchScript model ({type(exc).__name__})") from None
    if not extra[EXTRA_FILE]:
        raise GceError(f"{path}: a TorchScript model without gce metadata")
    return _parse_metadata(path, extra[EXTRA_FILE])


def _parse_metadata(path: Path, text: str | bytes) -> dict[str, Any]:
    try:
        values = json.loads(text)
    except ValueError:
        values = None
    if not isinstance(values, dict):
        raise GceError(f"{path}: its gce metadata is not a JSON object (damaged)")
    return values


def load_exported(path: str | os.PathLike, threads: int | None = None, *, fmt: str | None = None):
    """A callable ``images (N x 3 x S x S float32 numpy) -> N x D numpy`` for an exported file.

    ``fmt`` defaults to the one its extension names (``.onnx``: ONNX, else TorchScript).
    """
    path = Path(path)
    fmt = fmt or ("onnx" if path.suffix.lower() == ".onnx" else "torchscript")
    if fmt == "onnx":
        require_extra("export")
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types (an opset it lacks, a damaged file)
            raise GceError(f"{path}: onnxruntime cannot load it ({_first_line(exc)})") from None
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise GceError(f"{path}: not a TorchScript model ({type(exc).__name__})") from None

    def run(x):
        with torch.inference_mode():
            return module(torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return run


def parity_difference(embedder: Embedder, path: str | os.PathLike, fmt: str | None = None) -> float:
    """max |exported - PyTorch| on 3 seeded random inputs."""
    size = embedder.image_size
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    return float(np.abs(load_exported(path, fmt=fmt)(x.numpy()) - embedder.embed_tensors(x)).max())


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
