"""``gce export``: a trained model as ONNX or TorchScript, preprocessing and learner slices included."""

from __future__ import annotations

import argparse
from pathlib import Path

#: Largest accepted |exported - PyTorch| on unit-length learner slices. Other kernels reorder float32
#: sums: about depth x sqrt(terms) x eps, 1.8e-4 through resnet18 and 4.9e-4 through MobileNetV2
#: (tests/numerics.py); deeper trunks add to it. A wrong export (a layer, the preprocessing or the
#: normalisation) differs by 1e-2 or more.
EXPORT_PARITY_LIMIT = 2e-3


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained model to ONNX or TorchScript",
        description="The whole model (trunk, group block, per-learner normalisation) with a dynamic"
        " batch size; crop size, resize, mean/std, K, D, learner slices and the model id"
        " are stored inside the file and in FILE.json.",
    )
    p.add_argument("model", type=Path, help="a gce model.pt/best.pt/last.pt or run folder")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--out", type=Path, required=True, help="file to write (e.g. model.onnx, model.ts)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-check", action="store_true", help="skip the parity check against PyTorch")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from gce.errors import GceError
    from gce.io import check_output_file
    from gce.retrieval import Embedder
    from gce.retrieval.export import export_model, load_exported
    from gce.training.checkpoint import checkpoint_files

    # Both files it writes are checked before the model is loaded (gce.io's rules).
    inputs = checkpoint_files(args.model)
    args.out = check_output_file(args.out, what="--out", inputs=inputs)
    check_output_file(args.out.with_name(args.out.name + ".json"), what="--out's metadata file", inputs=inputs)
    embedder = Embedder.from_checkpoint(args.model)
    meta = export_model(embedder, args.out, args.format, opset=args.opset)
    print(
        f"exported {args.model} -> {args.out} ({args.format}, {args.out.stat().st_size / 2**20:.1f} MiB;"
        f" metadata in {args.out.name}.json)"
    )
    print(
        f"input: images N x 3 x {embedder.image_size} x {embedder.image_size} float32 (resize short side to"
        f" {embedder.resize_to}, centre-crop {embedder.image_size}, RGB/255, mean {meta['preprocessing']['mean']},"
        f" std {meta['preprocessing']['std']})"
    )
    print(
        f"output: embedding N x {embedder.embedding_dim}, K={embedder.num_learners} learners of"
        f" {embedder.embedding_dim // embedder.num_learners} dims, each L2-normalised; model {embedder.model_id[:12]}"
    )
    if not args.no_check:
        x = torch.randn(3, 3, embedder.image_size, embedder.image_size, generator=torch.Generator().manual_seed(0))
        diff = float(np.abs(load_exported(args.out)(x.numpy()) - embedder.embed_tensors(x)).max())
        print(f"parity check on 3 random inputs: max |exported - PyTorch| = {diff:.1e}")
        if diff > EXPORT_PARITY_LIMIT:
            raise GceError(
                f"{args.out}: the exported model differs from PyTorch by {diff:.1e} (> {EXPORT_PARITY_LIMIT:g})"
            )
    return 0
