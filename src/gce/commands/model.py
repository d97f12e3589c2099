"""``gce model save|push|info``: a trained model as a folder in the Hugging Face Hub's layout."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from gce.errors import GceError
from gce.io import path_argument
from gce.sharing.location import checkpoint_argument

#: The run file whose metrics final_metrics.json records (the model a finished run exports).
EXPORT = "model.pt"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "model",
        help="save a trained model as a shareable folder, push it to the Hugging Face Hub, describe one",
        description="A model folder holds model.safetensors, config.json and a README.md model card, the"
        " layout of the Hugging Face Hub. Every --checkpoint takes such a folder or hf://org/name[@revision].",
    )
    actions = p.add_subparsers(dest="action", required=True)
    save = actions.add_parser(
        "save",
        help="write a run's model as a model folder",
        description="RUN is a run folder (its model.pt, else its last checkpoint) or a model.pt/best.pt/last.pt;"
        " the card shows the run's final_metrics.json when the model is its model.pt.",
    )
    save.add_argument(
        "source", metavar="RUN", type=checkpoint_argument, help="a run folder or a gce model.pt/best.pt/last.pt"
    )
    save.add_argument("out", type=path_argument, help="folder to write: new, empty, or a model folder gce wrote")
    save.add_argument(
        "--license",
        default="unknown",
        help="license id on the card, e.g. mit, apache-2.0, cc-by-nc-4.0 (default: unknown; the weights also"
        " carry the terms of their training data)",
    )
    save.add_argument("--name", help="the model's name on its card (default: the run's config name)")
    save.add_argument("--repo", help="ORG/NAME the card's usage examples name (default: ORG/<name>)")
    save.set_defaults(run=run_save)
    push = actions.add_parser(
        "push",
        help="upload a model folder to the Hugging Face Hub",
        description="Creates REPO_ID if it does not exist, then uploads the folder's three files as one commit."
        " Needs a token with write access (hf auth login, or HF_TOKEN).",
    )
    push.add_argument("folder", type=path_argument, help="a model folder written by gce model save")
    push.add_argument("repo_id", help="ORG/NAME on the Hub")
    push.add_argument(
        "--private", action="store_true", help="create the repository private (an existing one keeps its visibility)"
    )
    push.set_defaults(run=run_push)
    info = actions.add_parser("info", help="describe a model folder or hf://org/name: layout, metrics, license")
    info.add_argument("model", type=checkpoint_argument, help="a model folder or hf://org/name[@revision]")
    info.add_argument("--json", action="store_true", help="print its config.json")
    info.set_defaults(run=run_info)


def _source(run: str | Path) -> str | Path:
    """The file (or folder, or hf:// reference) to load for RUN: a run folder's model.pt when it has one."""
    from gce.sharing.location import is_model_folder

    if isinstance(run, Path) and run.is_dir() and not is_model_folder(run):
        if (run / EXPORT).is_file():
            return run / EXPORT
        print(f"note: {run} has no {EXPORT} (training has not finished): saving its last checkpoint")
    return run


def _metrics(source: str | Path) -> dict[str, Any] | None:
    """The test metrics that describe ``source``: a run's final_metrics.json for its model.pt, a
    model folder's own."""
    from gce.sharing.folder import read_folder_config
    from gce.sharing.location import model_folder

    folder = model_folder(source)
    if folder is not None:
        return read_folder_config(folder).get("metrics")
    path = Path(source)
    final = path.parent / "final_metrics.json"
    if path.name != EXPORT or not final.is_file():
        return None
    try:
        values = json.loads(final.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GceError(f"{final}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    return values if isinstance(values, dict) else None


def run_save(args: argparse.Namespace) -> int:
    from gce.extras import require_extra

    require_extra("hub")
    from gce.retrieval import Embedder
    from gce.sharing.folder import check_license, check_model_output, save_model_folder
    from gce.sharing.location import parse_hub_reference
    from gce.training.checkpoint import checkpoint_files, load_model

    check_license(args.license)  # the arguments, then the output folder, before the model is loaded
    if args.repo is not None:  # checked like an hf:// reference: the card's examples must work as written
        parse_hub_reference(f"hf://{args.repo}")
    source = _source(args.source)
    out = check_model_output(args.out, inputs=checkpoint_files(source))
    model, cfg = load_model(source)
    description = Embedder.from_model(model, cfg, source=str(source)).metadata()
    description["source"] = os.path.basename(os.fspath(source)) if isinstance(source, Path) else str(source)
    name = args.name or cfg.name
    meta = save_model_folder(
        out,
        model,
        cfg,
        description,
        name=name,
        license=args.license,
        metrics=_metrics(source),
        repo_hint=args.repo,
    )
    k, dim = meta["num_learners"], meta["embedding_dim"]
    print(
        f"saved {source} -> {out} (model.safetensors {meta['weights']['bytes'] / 2**20:.1f} MiB, config.json,"
        f" README.md; K={k} x {dim // k} = {dim} dims, model {meta['model_id'][:12]}, license {meta['license']})"
    )
    if meta["metrics"] is None:
        print("note: no metrics on the card (a run's final_metrics.json describes its model.pt)")
    print(f"use it: --checkpoint {out}   share it: gce model push {out} ORG/NAME")
    return 0


def run_push(args: argparse.Namespace) -> int:
    from gce.sharing.folder import read_folder_config, read_weights
    from gce.sharing.hub import push

    meta = read_folder_config(args.folder)
    read_weights(args.folder, meta)  # a damaged folder is never published
    url = push(args.folder, args.repo_id, private=args.private, message=f"gce model {meta.get('name', '')}".strip())
    print(f"pushed {args.folder} -> {url}\nuse it: --checkpoint hf://{args.repo_id}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from gce.errors import CheckpointError
    from gce.io import sha256_file
    from gce.sharing.card import read_card_metadata
    from gce.sharing.folder import read_folder_config
    from gce.sharing.location import CARD, WEIGHTS, model_folder

    folder = model_folder(args.model)
    if folder is None:
        raise CheckpointError(f"{args.model}: not a model folder (gce model save writes one)")
    meta = read_folder_config(folder)
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    weights = folder / WEIGHTS
    try:
        intact = sha256_file(weights) == meta["weights"]["sha256"]
    except OSError as exc:
        raise CheckpointError(f"{weights}: cannot read ({exc.strerror or exc})") from None
    card = read_card_metadata(folder / CARD)
    cfg, pre = meta["config"], meta["preprocessing"]
    k, dim = meta["num_learners"], meta["embedding_dim"]
    lines = [
        f"{meta.get('name', '?')}  ({args.model})",
        f"  model id      {meta['model_id']}",
        f"  learners      K={k} x {dim // k} dims = D={dim}, each L2-normalised",
        (
            f"  trained       {cfg['model']['backbone']} + {cfg['model']['head']} head on {cfg['data']['dataset']},"
            f" {cfg['train']['epochs']} epochs"
        ),
        (
            f"  preprocessing resize short side {pre['resize_short_side']}, centre-crop {pre['center_crop']},"
            f" RGB/255, mean {pre['mean']}, std {pre['std']}"
        ),
        f"  license       {card.get('license', meta.get('license', '?'))}",
        (
            f"  weights       {WEIGHTS}, {weights.stat().st_size / 2**20:.1f} MiB,"
            f" {'checksum ok' if intact else 'CHECKSUM MISMATCH with config.json (damaged)'}"
        ),
        f"  saved by      gce {meta.get('gce_version', '?')} from {meta.get('source', '?')}",
    ]
    metrics = meta.get("metrics") or {}
    shown = [
        f"{key} {100 * value:.1f}" for key, value in metrics.items() if key.startswith("recall@") and value is not None
    ]
    shown += [f"{key} {100 * metrics[key]:.1f}" for key in ("nmi", "map@r") if metrics.get(key) is not None]
    lines.append(f"  metrics       {', '.join(shown) if shown else 'none recorded'}")
    print("\n".join(lines))
    if not intact:
        raise CheckpointError(f"{weights}: checksum mismatch with config.json (damaged or half-written)")
    return 0
