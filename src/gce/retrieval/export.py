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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gce.errors import GceError
from gce.extras import require_extra
from gce.retrieval.embedder import Embedder
from gce.retrieval.files import commit_file, write_json_atomic

__all__ = ["FORMATS", "export_model", "load_exported", "read_export_metadata"]

FORMATS = ("onnx", "torchscript")
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


def export_model(
    embedder: Embedder, out: str | os.PathLike, fmt: str = "onnx", *, opset: int | None = None
) -> dict[str, Any]:
    """Write ``out`` (atomically) and ``out.json``; return the metadata."""
    if fmt not in FORMATS:
        raise GceError(f"unknown export format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise GceError(
            f"{out} is a folder; give the file to write, e.g. {out / ('model.' + ('onnx' if fmt == 'onnx' else 'ts'))}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    model = embedder.model.to("cpu").eval()
    size = embedder.image_size
    example = torch.randn(2, 3, size, size)
    meta = _metadata(embedder, fmt)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if fmt == "onnx":
            _export_onnx(model, example, tmp, meta, opset)
        else:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still widely loaded
                traced = torch.jit.trace(model, example, check_trace=False)
                torch.jit.save(traced, str(tmp), _extra_files={EXTRA_FILE: json.dumps(meta)})
        commit_file(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.data").unlink(missing_ok=True)
    write_json_atomic(out.with_name(out.name + ".json"), meta)
    embedder.model.to(embedder.device)
    return meta


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
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.save(proto, str(path))


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``gce`` metadata stored inside an exported file (not the sidecar)."""
    path = Path(path)
    if not path.is_file():
        raise GceError(f"{path}: no such file")
    if path.suffix == ".onnx":
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf raises DecodeError and friends
            raise GceError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
        values = {p.key: p.value for p in proto.metadata_props}
        if METADATA_KEY not in values:
            raise GceError(f"{path}: an ONNX model without gce metadata")
        return json.loads(values[METADATA_KEY])
    extra = {EXTRA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise GceError(f"{path}: not a TorchScript model ({type(exc).__name__})") from None
    if not extra[EXTRA_FILE]:
        raise GceError(f"{path}: a TorchScript model without gce metadata")
    return json.loads(extra[EXTRA_FILE])


def load_exported(path: str | os.PathLike, threads: int | None = None):
    """A callable ``images (N x 3 x S x S float32 numpy) -> N x D numpy`` for an exported file."""
    path = Path(path)
    if path.suffix == ".onnx":
        require_extra("export")
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x):
        with torch.inference_mode():
            return module(torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return run
