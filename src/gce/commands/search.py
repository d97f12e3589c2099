"""``gce search``: the nearest catalogue items of query images, on all learners or a chosen few."""

from __future__ import annotations

import argparse
import json
import os
import sys

from gce.commands.arguments import add_runtime_options, count, runtime_line
from gce.errors import GceError
from gce.io import path_argument
from gce.sharing.location import checkpoint_argument


def _numbers(kind):
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None

    return parse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="find the nearest indexed images to query images",
        description="Scores are cosine similarities (with --learners/--weights: the weighted mean of"
        " the chosen learners' cosines). Exact on a flat index; approximate otherwise.",
    )
    p.add_argument("images", nargs="+", type=path_argument, help="query image files")
    p.add_argument("--index", type=path_argument, required=True)
    p.add_argument("--checkpoint", type=checkpoint_argument, required=True, help="the model the index was built with")
    p.add_argument("--k", type=count(1), default=10, help="results per query (at most the index's size)")
    choose = p.add_mutually_exclusive_group()
    choose.add_argument("--learners", type=_numbers(int), help="search on these learners only, e.g. 0,3")
    choose.add_argument("--weights", type=_numbers(float), help="one weight per learner, e.g. 1,0,0.5,0")
    p.add_argument(
        "--nprobe", type=count(1), help="ivf/ivfpq: cells to visit, at most all (default: chosen at build time)"
    )
    p.add_argument(
        "--ef", type=count(1), help="hnsw: efSearch, at most the index's size (default: chosen at build time)"
    )
    p.add_argument(
        "--filter",
        action="append",
        metavar="TEXT",
        # the texts of gce.retrieval.filters.FILTER_SYNTAX (not imported: the parser stays light)
        help="only items that pass: 'label=NAME', 'label in A,B,C' or 'path startswith PREFIX';"
        " repeat to combine (AND)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per query (JSON Lines)")
    p.add_argument("--device", default="cpu")
    add_runtime_options(p)
    p.set_defaults(run=run)


def _shown(path: str) -> str:
    """Paths under the working directory are shown relative to it (the table is for reading)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def run(args: argparse.Namespace) -> int:
    from gce.retrieval import Embedder, parse_filter
    from gce.retrieval.open_index import open_index
    from gce.retrieval.runtimes import set_threads

    item_filter = parse_filter(args.filter)  # a typo fails before the model loads
    index = open_index(args.index)
    set_threads(args.threads)
    # a few queries: auto uses an ONNX file already there, but an export would cost more than it saves
    embedder = Embedder.from_checkpoint(args.checkpoint, device=args.device, runtime=args.runtime, export_onnx=False)
    index.check_model(embedder.model_id, f"--checkpoint {args.checkpoint}")
    if args.nprobe or args.ef:
        index.set_search_params(nprobe=args.nprobe, ef_search=args.ef)
    queries = embedder.embed_paths(args.images)
    results = index.search(queries, args.k, learners=args.learners, weights=args.weights, filter=item_filter)
    print(f"gce search: {runtime_line(embedder)}", file=sys.stderr, flush=True)  # after any error: one line
    note = None
    if (args.learners is not None or args.weights is not None) and not index.exact:
        note = (
            f"{index.index_type} answers a learner subset approximately: its cells/links were built for the"
            f" whole embedding (build_report.json in the index has the recall measured for learner 0 alone)"
        )
    for path, hits in zip(args.images, results, strict=True):
        if args.json:
            print(
                json.dumps(
                    {
                        "query": str(path),
                        "results": [
                            {"id": h.id, "score": round(h.score, 6), "path": h.path, "label": h.label} for h in hits
                        ],
                    }
                )
            )
            continue
        print(
            f"{path}  ({index.index_type}{', learners ' + ','.join(map(str, args.learners)) if args.learners else ''}"
            f"{', weights ' + ','.join(f'{w:g}' for w in args.weights) if args.weights else ''}"
            f"{', filter ' + item_filter.describe() if item_filter else ''})"
        )
        print(f"  {'rank':>4}  {'score':>6}  {'id':>7}  {'label':<20}  path")
        for rank, h in enumerate(hits, 1):
            print(f"  {rank:>4}  {h.score:>6.3f}  {h.id:>7}  {(h.label or '-')[:20]:<20}  {_shown(h.path)}")
    if note and not args.json:
        print(f"note: {note}")
    if not results:
        raise GceError("no queries")
    return 0
