"""``gce embed``: a catalogue of images -> a sharded, resumable embeddings folder tied to the model."""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path
from typing import Any

from gce.commands.arguments import add_runtime_options, count, positive_number, stderr_line
from gce.errors import DatasetError, GceError
from gce.io import path_argument
from gce.sharing.location import checkpoint_argument

#: ``--runtime auto`` exports the model to ONNX only for at least this many images: the export takes
#: about 8 s (MobileNetV2, 64 px) and ONNX Runtime then saves about 1.5 ms per image on 2 CPU cores
#: (406 -> 1,032 images/s, benchmarks/export_speed.py), so it repays itself from ~5,000 images.
AUTO_EXPORT_MIN_IMAGES = 5000


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="embed a dataset split, an image folder or a CSV list into an embeddings folder",
        description="Embeddings in shards; a killed run resumes where it stopped when rerun with the"
        " same arguments. The model's id is recorded so that embeddings of two models"
        " are never mixed.",
    )
    p.add_argument(
        "--checkpoint",
        type=checkpoint_argument,
        required=True,
        help="a gce model.pt/best.pt/last.pt, run folder, model folder or hf://org/name",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="dataset name (cub, cars196, sop, inshop, folder, csv, emoji); needs --root")
    src.add_argument("--images", type=path_argument, help="a folder: every image file below it (sorted), no labels")
    src.add_argument("--csv", type=path_argument, help="a CSV file with a path column and an optional label column")
    p.add_argument("--root", type=path_argument, help="with --dataset: its root folder")
    p.add_argument("--split", choices=["test", "train", "all"], help="with --dataset (default: test)")
    p.add_argument("--out", type=path_argument, required=True, help="embeddings folder to write (or resume)")
    p.add_argument(
        "--dtype", choices=["float32", "float16"], default="float32", help="storage type (float16: half the disk)"
    )
    p.add_argument("--shard-size", type=count(1), default=4096, help="images per shard (the unit of resumption)")
    p.add_argument("--batch-size", type=count(1), default=64)
    p.add_argument("--workers", type=count(0), default=2, help="image-decoding processes")
    p.add_argument("--device", default="cpu")
    add_runtime_options(p)
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable images (counted) instead of failing")
    p.add_argument("--overwrite", action="store_true", help="start over in a folder that holds another job")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc",
        type=count(1),
        metavar="N",
        help="embed with N processes on this machine (torchrun; one per GPU with --device cuda, "
        "at most one per CPU core on cpu); the store is the one a single process writes",
    )
    p.add_argument("--oversubscribe", action="store_true", help="with --nproc on cpu: allow more processes than cores")
    p.add_argument(
        "--dist-timeout",
        type=positive_number(7 * 24 * 3600.0),
        default=1800.0,
        metavar="S",
        help="with several processes: seconds one waits for the others to make progress before it fails",
    )
    p.set_defaults(run=run, embed_parser=p)


def images_under(folder: Path) -> list[str]:
    from gce.data.images import is_image_file

    if not folder.is_dir():
        raise DatasetError(f"--images {folder}: no such folder")
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(parent, f) for f in sorted(files) if is_image_file(f) and not f.startswith(".")]
    if not found:
        raise DatasetError(f"--images {folder}: no image files below it")
    return found


def read_csv_list(path: Path) -> tuple[list[str], list[str | None]]:
    """``path`` (required) and ``label`` (optional) columns; relative paths from the CSV's folder."""
    if not path.is_file():
        raise DatasetError(f"--csv {path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip().lower() for h in reader.fieldnames or []]
            if "path" not in header:
                raise DatasetError(f"{path}, line 1: no 'path' column (found: {','.join(header) or 'nothing'})")
            reader.fieldnames = header
            paths, labels = [], []
            for row in reader:
                image = (row.get("path") or "").strip()
                if not image:
                    raise DatasetError(f"{path}, line {reader.line_num}: empty path")
                paths.append(image if os.path.isabs(image) else str(path.parent / image))
                label = (row.get("label") or "").strip() if "label" in header else ""
                labels.append(label or None)
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not a UTF-8 text file") from err
    except csv.Error as err:
        raise DatasetError(f"{path}: malformed CSV ({err})") from err
    if not paths:
        raise DatasetError(f"{path}: lists no images")
    return paths, labels


def catalogue(
    args: argparse.Namespace, training_options: dict[str, Any] | None = None
) -> tuple[list[str], list[str | None], str]:
    if args.images is not None:
        paths = images_under(args.images)
        return paths, [None] * len(paths), f"images under {args.images}"
    if args.csv is not None:
        paths, labels = read_csv_list(args.csv)
        return paths, labels, f"CSV {args.csv}"
    if not args.root:
        raise GceError("--dataset needs --root")
    from gce.data import load_dataset

    options = dict(training_options or {})
    if args.skip_bad:
        options["skip_bad"] = True
    splits = load_dataset(args.dataset, args.root, **options)
    parts = [splits.train, splits.test] if args.split == "all" else [getattr(splits, args.split)]
    paths, labels = [], []
    for records in parts:
        paths += records.paths
        labels += [records.class_names[c] for c in records.labels.tolist()]
    return paths, labels, f"{args.dataset} {args.root} ({args.split})"


def _training_split_options(data: dict[str, Any] | None, args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint's split options (``test_fraction``, ``seed`` ...) when --dataset/--root name
    the data it was trained on: its ``--split test`` is then the test split it was evaluated on."""
    if not data or args.dataset != data["dataset"] or not args.root:
        return {}
    same_root = os.path.realpath(os.path.expanduser(args.root)) == os.path.realpath(os.path.expanduser(data["root"]))
    return dict(data["options"]) if same_root else {}


def run(args: argparse.Namespace) -> int:
    from gce.commands.embed_processes import check_launch, join_job, launch, worker_command
    from gce.io import check_output_dir
    from gce.retrieval import Embedder, embed_to_store
    from gce.retrieval.files import shown_path
    from gce.retrieval.runtimes import set_threads
    from gce.retrieval.store import prepare_store
    from gce.retrieval.store_manifest import MANIFEST
    from gce.training.checkpoint import checkpoint_files

    if args.root and not args.dataset:
        raise GceError("--root goes with --dataset")
    if args.split is not None and not args.dataset:  # not silently ignored
        raise GceError(f"--split {args.split} goes with --dataset; --images and --csv embed every image they list")
    check_launch(args)
    argv = worker_command(args.embed_parser, args)  # as the user gave it, for --nproc's processes
    args.split = args.split or "test"
    # The folder is checked before any image is listed or embedded: never inside an input, and
    # new, empty or a store of its own (embeddings.json), so that no file of the user's is touched.
    inputs = [args.images, args.csv, args.root, *checkpoint_files(args.checkpoint)]
    args.out = check_output_dir(args.out, what="--out", inputs=inputs, marker=MANIFEST)
    ctx = join_job(args)  # torchrun's process group (a GPU each on cuda), or one process
    device = "cpu" if args.nproc is not None else str(ctx.device)  # --nproc's launcher reads metadata only
    set_threads(args.threads)
    embedder = Embedder.from_checkpoint(
        args.checkpoint,
        device=device,
        batch_size=args.batch_size,
        runtime=args.runtime,
        say=None if args.quiet or not ctx.is_main else stderr_line("gce embed"),  # when the first batch opens it
    )
    paths, labels, source = catalogue(args, _training_split_options(embedder.training_data, args))
    paths = [os.path.abspath(p) for p in paths]  # results must open from any working directory
    embedder.export_onnx = len(paths) >= AUTO_EXPORT_MIN_IMAGES
    if args.nproc is not None:  # the store opened here, once; then the processes embed
        options = {"dtype": args.dtype, "shard_size": args.shard_size, "skip_bad": args.skip_bad, "source": source}
        left = prepare_store(embedder, paths, labels, args.out, overwrite=args.overwrite, **options)
        if left and args.runtime != "torch" and str(args.device).startswith("cpu"):
            _ = embedder.runtime  # any export made once here, not by every process at the same time
        del embedder
        return launch(args, argv, left)
    info = embed_to_store(
        embedder,
        paths,
        labels,
        args.out,
        dtype=args.dtype,
        shard_size=args.shard_size,
        skip_bad=args.skip_bad,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=not args.quiet,
        source=source,
        overwrite=args.overwrite,
        ctx=ctx,
    )
    if not ctx.is_main:  # rank 0 reports for the job
        return 0
    resumed = f", resumed after {info.resumed_from:,}" if info.resumed_from else ""
    print(
        f"embedded {info.embedded:,} of {info.total:,} images from {shown_path(source)}{resumed}"
        f" -> {shown_path(str(info.path))}"
        f" (D={embedder.embedding_dim}, K={embedder.num_learners}, {args.dtype}, model {embedder.model_id[:12]};"
        f" runtime {embedder.runtime.name}, {embedder.runtime.threads} thread(s))"
    )
    if info.skipped:
        first_path, first_reason = info.bad[0]
        print(
            f"skipped {info.skipped:,} unreadable images (first: {first_path}: {first_reason});"
            f" all are listed in {shown_path(str(info.path / MANIFEST))}"
        )
    return 0
