"""``gce export``: a trained model as ONNX or TorchScript, preprocessing and learner slices included."""

from __future__ import annotations

import argparse
from pathlib import Path

from gce.io import path_argument
from gce.sharing.location import checkpoint_argument


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained model to ONNX or TorchScript",
        description="The whole model (trunk, group block, per-learner normalisation) with a dynamic"
        " batch size; crop size, resize, mean/std, K, D, learner slices and the model id"
        " are stored inside the file and in FILE.json.",
    )
    p.add_argument(
        "model",
        type=checkpoint_argument,
        help="a gce model.pt/best.pt/last.pt, run folder, model folder or hf://org/name",
    )
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument(
        "--out", type=path_argument, required=True, help="file to write: .onnx for onnx, .ts or .pt for torchscript"
    )
    p.add_argument("--opset", type=int, help="ONNX opset, 18 or newer (default: the exporter's)")
    p.add_argument("--no-check", action="store_true", help="skip the parity check against PyTorch")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gce.errors import GceError
    from gce.retrieval import Embedder
    from gce.retrieval.export import PARITY_LIMIT, check_export_output, export_model, parity_difference
    from gce.training.checkpoint import checkpoint_files

    # Format, extension, opset and both files it writes are checked before the model is loaded.
    inputs = checkpoint_files(args.model)
    args.out = check_export_output(args.out, args.format, inputs=inputs, opset=args.opset)
    embedder = Embedder.from_checkpoint(args.model)
    diffs: list[float] = []

    def parity(tmp: Path) -> None:  # on the temporary file: a failed check leaves nothing behind
        diffs.append(parity_difference(embedder, tmp, args.format))
        if diffs[-1] > PARITY_LIMIT:
            raise GceError(
                f"{args.out}: the exported model differs from PyTorch by {diffs[-1]:.1e} (> {PARITY_LIMIT:g});"
                " nothing was written"
            )

    meta = export_model(
        embedder, args.out, args.format, opset=args.opset, inputs=inputs, check=None if args.no_check else parity
    )
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
    if diffs:
        print(f"parity check on 3 random inputs: max |exported - PyTorch| = {diffs[0]:.1e}")
    return 0
