"""``gce index build|add|delete|info``: faiss or Milvus indexes over an embeddings folder."""

from __future__ import annotations

import argparse
import json

from gce.commands.arguments import count
from gce.config.vocabulary import INDEX_TYPES
from gce.io import path_argument

#: gce.retrieval.faiss_build.MAX_HNSW_M (not imported: the parser must not import numpy and faiss)
HNSW_M_MAX = 256


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="build, grow or describe a search index",
        description="Inner-product faiss indexes over the normalised embeddings of gce embed.",
    )
    actions = p.add_subparsers(dest="action", required=True)
    b = actions.add_parser(
        "build",
        help="build an index from an embeddings folder",
        description="flat is exact; ivf, hnsw and ivfpq are approximate: their recall@10 against"
        " exact search, size and speed are measured and printed at build time, and"
        " the fastest setting with recall@10 >= 0.95 becomes the default.",
    )
    b.add_argument("embeddings", type=path_argument, help="a folder written by gce embed")
    b.add_argument(
        "--out",
        type=path_argument,
        required=True,
        help="index folder to create: new or empty (with --overwrite: an index folder)",
    )
    b.add_argument("--type", choices=INDEX_TYPES, default="flat", dest="index_type")
    b.add_argument("--nlist", type=count(1), help="ivf/ivfpq: number of cells, at most N (default ~sqrt(N))")
    b.add_argument(
        "--hnsw-m", type=count(2, HNSW_M_MAX), help=f"hnsw: links per node (default 32, at most {HNSW_M_MAX})"
    )
    b.add_argument(
        "--backend",
        choices=("faiss", "milvus"),
        default="faiss",
        help="faiss: the index lives in --out; milvus: in a Milvus collection (--uri), --out points at it",
    )
    b.add_argument("--uri", help="milvus: a server or cluster (http://host:19530) or a milvus-lite file (*.db)")
    b.add_argument("--collection", help="milvus: the collection to create (default: the --out folder's name)")
    b.add_argument("--sample", type=count(1), default=500, help="gallery items used as queries to measure recall")
    b.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the index in --out (only the files its manifest names are removed)",
    )
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(run=run_build)
    a = actions.add_parser(
        "add",
        help="append an embeddings folder (same model) to an index",
        description="One writer at a time: while another build or add writes the index, add stops at"
        " once naming its process. Searches and servers loading the index meanwhile get the index"
        " before or after the add, never a mix.",
    )
    a.add_argument("index", type=path_argument)
    a.add_argument("embeddings", type=path_argument)
    a.set_defaults(run=run_add)
    d = actions.add_parser(
        "delete",
        help="delete items from an index by id or by path",
        description="Deleted items never come back from a search; their ids are never given again (a"
        " later add continues after the highest id). Written as a new version of the index: a killed"
        " delete leaves the index as it was. Their space is reclaimed by a rebuild.",
    )
    d.add_argument("index", type=path_argument)
    which = d.add_mutually_exclusive_group(required=True)
    which.add_argument("--ids", type=count(0), nargs="+", metavar="ID", help="item ids (as gce search shows them)")
    which.add_argument(
        "--paths",
        type=path_argument,
        metavar="FILE",
        help="a file of item paths, one per line, as the index stores them",
    )
    d.set_defaults(run=run_delete)
    i = actions.add_parser("info", help="describe an index (type, size, model, defaults)")
    i.add_argument("index", type=path_argument)
    i.add_argument("--no-verify", action="store_true", help="skip the checksum pass")
    i.set_defaults(run=run_info)


def run_build(args: argparse.Namespace) -> int:
    from gce.io import check_output_dir
    from gce.retrieval import build_index_from_store
    from gce.retrieval.index_files import check_build_target

    # Before any work: a folder of someone else's files, or an index without --overwrite, is refused.
    args.out = check_output_dir(args.out, what="--out", inputs=[args.embeddings])
    check_build_target(args.out, overwrite=args.overwrite)
    params = {key: value for key, value in (("nlist", args.nlist), ("hnsw_m", args.hnsw_m)) if value}
    if args.backend == "milvus" or args.uri or args.collection:
        return _build_milvus(args, params)
    index, report = build_index_from_store(
        args.embeddings,
        args.out,
        args.index_type,
        params=params,
        sample=args.sample,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(report.format_table())
    print(f"index written to {index.path} ({index.size:,} items, model {index.model_id[:12]})")
    return 0


def _build_milvus(args: argparse.Namespace, params: dict) -> int:
    from pathlib import Path

    from gce.errors import GceError
    from gce.retrieval import read_store
    from gce.retrieval.milvus_build import build_milvus_index

    if args.backend != "milvus":
        raise GceError("--uri and --collection are options of --backend milvus")
    if not args.uri:
        raise GceError("--backend milvus needs --uri (http://host:19530, or a milvus-lite file such as catalogue.db)")
    data = read_store(args.embeddings)
    if len(data.embeddings) == 0:
        raise GceError(f"{args.embeddings}: holds no embeddings (every image was skipped)")
    index, report = build_milvus_index(
        data.embeddings,
        data.paths,
        data.labels,
        args.out,
        data.model,
        uri=args.uri,
        collection=args.collection,
        index_type=args.index_type,
        params=params,
        sample=args.sample,
        overwrite=args.overwrite,
        progress=not args.quiet,
        sources=[{"embeddings": str(Path(args.embeddings).resolve()), "count": len(data.embeddings)}],
    )
    print(report.format_table())
    if index.layout == "single" and index.num_learners > 1:
        print(
            "note: this Milvus server allows one vector field per collection (Milvus 2.3), so a learner"
            " subset is searched with the masked query on the whole embedding (the learner 0 column above)"
        )
    print(
        f"index written to {index.path}: Milvus collection {index.collection!r} at {index.uri}"
        f" ({index.size:,} items, model {index.model_id[:12]}, {index.layout} layout)"
    )
    return 0


def run_add(args: argparse.Namespace) -> int:
    from gce.retrieval import add_store_to_index

    index, ids = add_store_to_index(args.index, args.embeddings)
    print(
        f"added {len(ids):,} items (ids {ids.start:,}..{ids.stop - 1:,}) to {index.path}; it now holds {index.size:,}"
    )
    if not index.exact:
        print(
            f"note: the {index.index_type} cells/links were trained on the first build; rebuild when the"
            f" added part changes the catalogue's make-up"
        )
    return 0


def run_delete(args: argparse.Namespace) -> int:
    from gce.errors import GceError
    from gce.retrieval.open_index import open_index

    index = open_index(args.index)
    if args.paths is not None:
        try:
            lines = args.paths.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise GceError(f"--paths {args.paths}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
        paths = [line for line in lines if line.strip()]
        if not paths:
            raise GceError(f"--paths {args.paths}: no paths in the file")
        ids = index.ids_of_paths(paths)
    else:
        ids = args.ids
    removed = index.delete(ids)
    print(f"deleted {removed:,} items from {index.path}; it now holds {index.size:,} ({index.deleted:,} deleted)")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from gce.retrieval.open_index import open_index

    index = open_index(args.index, verify=not args.no_verify)
    m = index.manifest
    if getattr(index, "backend", "faiss") == "milvus":
        print(
            f"{index.path}: Milvus {index.index_type} index, {index.size:,} items x {index.dim} dims,"
            f" K={index.num_learners} learners, model {index.model_id[:12]}"
        )
        print(f"collection {index.collection!r} at {index.uri}; vector layout: {index.layout}")
        print(
            f"build parameters: {json.dumps(m.get('params', {}))}; search defaults: {json.dumps(index.search_params)}"
        )
        return 0
    print(
        f"{index.path}: {index.index_type} index, {index.size:,} items x {index.dim} dims, K={index.num_learners}"
        f" learners, model {index.model_id[:12]}"
    )
    reclaim = " (their space is reclaimed by a rebuild)" if index.deleted else ""
    print(f"items: {index.size:,} live, {index.deleted:,} deleted{reclaim}; next id {len(index.items):,}")
    print(f"build parameters: {json.dumps(m.get('params', {}))}; search defaults: {json.dumps(index.search_params)}")
    print(f"files verified: {'no' if args.no_verify else 'yes'} (generation {m.get('generation')})")
    return 0
