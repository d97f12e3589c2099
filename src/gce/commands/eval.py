"""``gce eval``: retrieval and clustering metrics of a checkpoint or an untrained backbone."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from gce.commands.arguments import count, seed
from gce.config.checks import LIMITS
from gce.config.vocabulary import BACKBONE_NAMES, EVAL_BACKENDS
from gce.io import file_argument, path_argument
from gce.sharing.location import checkpoint_argument

if TYPE_CHECKING:
    import torch
    from torch import nn

    from gce.config import ExperimentConfig
    from gce.distributed import DistContext


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint or an untrained backbone on a dataset split",
        description="Recall@K, NMI, F1, MAP@R and R-Precision on a dataset's test split.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        type=checkpoint_argument,
        help="a gce model.pt/best.pt/last.pt, run folder, model folder or hf://org/name",
    )
    src.add_argument("--backbone", help=f"untrained reference: {', '.join(BACKBONE_NAMES)}, or raw (pixels)")
    p.add_argument("--no-pretrained", action="store_true", help="with --backbone: random instead of ImageNet weights")
    p.add_argument("--dataset", help="dataset name (default: the checkpoint's)")
    p.add_argument("--root", type=path_argument, help="dataset root (default: the checkpoint's)")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument(
        "--image-size", type=count(8, LIMITS["data.image_size"]), help="crop size (default: the checkpoint's, else 224)"
    )
    p.add_argument(
        "--test-resize",
        type=count(8, LIMITS["data.test_resize"]),
        help="resize before the centre crop (default size*256/224)",
    )
    p.add_argument("--batch-size", type=count(1, LIMITS["eval.batch_size"]), default=128)
    p.add_argument("--workers", type=count(0, LIMITS["data.workers"]), default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--recall-ks", type=count(1, 10_000_000), nargs="+", help="K values (default: the benchmark's)")
    p.add_argument("--no-clustering", action="store_true", help="skip NMI and F1 (k-means)")
    p.add_argument("--backend", choices=EVAL_BACKENDS, default="torch")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (counted) instead of failing")
    p.add_argument("--seed", type=seed, default=0, help="k-means seed for NMI/F1 (0 to 2**32-1)")
    p.add_argument("--out", type=file_argument, help="write the metrics as JSON (checked before the evaluation)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def _build_embedder(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, ExperimentConfig | None]:
    from gce.models.plain import PooledTrunk, RawPixels
    from gce.training.checkpoint import load_model

    if args.checkpoint is not None:
        return load_model(args.checkpoint, device=device)
    if args.backbone == "raw":
        return RawPixels(), None
    return PooledTrunk(args.backbone, pretrained=not args.no_pretrained), None


def run(args: argparse.Namespace) -> int:
    """Under torchrun each process embeds a shard; rank 0 computes and prints the metrics."""
    from gce.distributed import distributed_errors, init_distributed, shutdown_distributed

    ctx = init_distributed(args.device, key="--device")
    try:
        with distributed_errors(ctx):
            return _evaluate(args, ctx)
    finally:
        shutdown_distributed()


def _evaluate(args: argparse.Namespace, ctx: DistContext) -> int:
    from gce.data import load_dataset
    from gce.data.images import ImageDataset, check_records
    from gce.data.transforms import test_transform
    from gce.distributed.context import broadcast_module
    from gce.distributed.sharding import compute_on_main
    from gce.distributed.training import ShardedEmbedder
    from gce.errors import DatasetError, GceError
    from gce.evaluation import default_recall_ks
    from gce.evaluation.pipeline import DatasetEmbedder, MetricSettings, evaluate_split
    from gce.io import check_output_file, refuse_input_files, refuse_inputs, write_json
    from gce.runtime import flush_denormals
    from gce.training.checkpoint import checkpoint_files

    device = ctx.device
    flush_denormals(device)
    # The output is checked before anything is loaded or computed: a bad --out costs a second.
    inputs = [*(checkpoint_files(args.checkpoint) if args.checkpoint else []), args.root]
    out = check_output_file(args.out, what="--out", inputs=inputs) if args.out is not None else None
    model, cfg = _build_embedder(args, device)
    dataset = args.dataset or (cfg.data.dataset if cfg else None)
    root = args.root or (cfg.data.root if cfg else None)
    if not dataset or not root:
        raise GceError("--dataset and --root are required with --backbone")
    if out is not None:
        refuse_inputs(out, [root], "--out")
    size = args.image_size or (cfg.data.image_size if cfg else 224)
    resize = args.test_resize or (cfg.data.test_resize if cfg and not args.image_size else None)
    if resize is not None and resize < size:
        source = "--test-resize" if args.test_resize else "the checkpoint's data.test_resize"
        raise GceError(
            f"{source}={resize} is smaller than the crop size {size} (--image-size or data.image_size);"
            f" the resize must be at least the crop"
        )
    options = dict(cfg.data.options) if cfg and dataset == cfg.data.dataset else {}
    if args.skip_bad:  # listed-but-missing files and empty class folders too, not only undecodable ones
        options["skip_bad"] = True
    splits = load_dataset(dataset, root, **options)
    if out is not None:  # an --out that is one of the listed images (a dataset outside its root)
        refuse_input_files(out, getattr(splits, args.split).paths, "--out")
    records = check_records(
        getattr(splits, args.split), skip_bad=args.skip_bad, progress=not args.quiet and ctx.is_main, split=args.split
    )
    if len(records) < 2:
        raise DatasetError(
            f"{dataset} {root}: the {args.split} split has {len(records)} readable image;"
            f" retrieval evaluation needs at least 2"
        )
    images = ImageDataset(records, test_transform(size, resize_to=resize))
    embed = DatasetEmbedder(
        batch_size=args.batch_size, workers=args.workers, device=device, progress=not args.quiet and ctx.is_main
    )
    metrics = MetricSettings(
        recall_ks=tuple(args.recall_ks or default_recall_ks(dataset)),
        clustering=not args.no_clustering,
        backend=args.backend,
        seed=args.seed,
    )
    desc = f"embedding {dataset}/{args.split}"
    if ctx.enabled:  # every rank embeds its shard with rank 0's weights; the metrics are computed once
        broadcast_module(ctx, model.to(device))
        embedded = ShardedEmbedder(embed, ctx)(model, images, desc)
        result = compute_on_main(ctx, lambda: evaluate_split(model, images, lambda *_: embedded, metrics, desc).result)
        if not ctx.is_main:
            return 0
    else:
        result = evaluate_split(model.to(device), images, embed, metrics, desc).result
    name = str(args.checkpoint) if args.checkpoint else f"{args.backbone} (untrained)"
    print(f"{name} on {dataset}/{args.split} ({len(records)} images, {records.num_classes} classes, {size} px)")
    print(result.format_table())
    if out is not None:
        write_json(out, result.to_dict(), what="--out")
        print(f"metrics written to {args.out}")
    return 0
