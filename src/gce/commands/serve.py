"""``gce serve``: the search API and web page over an index, served by uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import socket
from pathlib import Path

from gce.commands.arguments import add_runtime_options, count, positive_number, runtime_line, stderr_line
from gce.errors import ConfigError
from gce.io import path_argument
from gce.sharing.location import checkpoint_argument

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MIB = 1024 * 1024
# The ceilings of gce.serve.settings, repeated: importing it here would import FastAPI for every
# command's --help (tests/serve/test_hardening_serve.py checks that the two agree).
MAX_UPLOAD_CEILING = 1024 * MIB
PILLOW_PIXEL_CEILING = 178_956_970
MAX_TIMEOUT_S = 3600.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP search API and web page over an index",
        description="Serve POST /search, GET /items/{id}/thumbnail, /health, /info, the API docs "
        "at /docs and a search page at /. Listens on 127.0.0.1 unless --host says "
        "otherwise.",
    )
    p.add_argument("--index", type=path_argument, required=True, help="index folder written by gce index build")
    p.add_argument(
        "--checkpoint",
        type=checkpoint_argument,
        required=True,
        help="the model that built the index (model.pt, model folder or hf://org/name)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=count(1, 65535), default=8000)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--root-path",
        default="",
        help="path prefix a reverse proxy serves this under, e.g. /search "
        "(for the API docs page; the search page works without it)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=positive_number(MAX_UPLOAD_CEILING / MIB, minimum=0.001),
        default=10.0,
        help=f"largest accepted upload in MiB (default 10; at most {MAX_UPLOAD_CEILING // MIB})",
    )
    p.add_argument(
        "--max-pixels",
        type=count(1, PILLOW_PIXEL_CEILING),
        default=16_000_000,
        help=f"largest accepted image, width x height (default 16,000,000; at most {PILLOW_PIXEL_CEILING:,}, "
        "where Pillow refuses images itself)",
    )
    p.add_argument("--max-k", type=count(1, 10_000), default=100, help="most neighbours per query (default 100)")
    p.add_argument(
        "--max-batch",
        type=count(1, 1024),
        default=32,
        help="most queued queries answered by one model call / index scan (default 32; 1: no batching)",
    )
    p.add_argument(
        "--max-uploads",
        type=count(1, 10_000),
        default=32,
        help="requests with a body (uploads, searches) read or answered at once; more get a 503 (default 32)",
    )
    p.add_argument(
        "--upload-timeout",
        type=positive_number(MAX_TIMEOUT_S),
        default=60.0,
        help="seconds a request's headers, and then its body, may take to arrive (default 60)",
    )
    p.add_argument(
        "--max-connections",
        type=count(1, 100_000),
        default=512,
        help="open connections at once; more get a 503 (default 512)",
    )
    add_runtime_options(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=run)


def start_line(host: str, port: int, index_size: int, index: Path, runtime: str = "") -> str:
    where = f"http://{_url_host(host)}:{port}/"
    if host in LOCAL_HOSTS:
        scope = "localhost only; --host 0.0.0.0 to listen on every interface"
    else:
        scope = f"listening on {host}: reachable from other machines, put it behind a reverse proxy"
    line = f"gce serve: {where} ({scope}); index {index} with {index_size} items; API docs at {where}docs"
    return f"{line}; {runtime}" if runtime else line


def _url_host(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def run(args: argparse.Namespace) -> int:
    from gce.extras import require_extra

    require_extra("serve")
    from pydantic import ValidationError

    from gce.runtime import resolve_device
    from gce.serve import ServeSettings, create_app, load_service
    from gce.serve.server import make_server

    resolve_device(args.device, "--device")
    try:
        settings = ServeSettings(
            max_upload_bytes=int(args.max_upload_mb * MIB),
            max_pixels=args.max_pixels,
            max_k=args.max_k,
            max_batch=args.max_batch,
            max_uploads=args.max_uploads,
            upload_timeout_s=args.upload_timeout,
            max_connections=args.max_connections,
            device=args.device,
        )
    except ValidationError as exc:
        problem = exc.errors()[0]
        raise ConfigError(f"serve option {problem['loc'][0]}: {problem['msg']}") from None
    from gce.retrieval.runtimes import set_threads

    set_threads(args.threads)
    bound: list[socket.socket] = []  # after the index loads, before the model: a port in use is
    # refused before any export, as the only line (and before the start-up line, so that it is true)
    try:
        service = load_service(
            args.index,
            args.checkpoint,
            settings,
            runtime=args.runtime,
            say=_export_note,
            before_model=lambda: bound.append(bind(args.host, args.port)),
        )
    except BaseException:
        for listener in bound:
            listener.close()
        raise
    listener = bound[0]
    server = make_server(create_app(service), settings, log_level=args.log_level, root_path=args.root_path)
    runtime = runtime_line(service.embedder) if service.embedder is not None else ""
    print(start_line(args.host, args.port, int(service.index.size), args.index, runtime), flush=True)
    server.run(sockets=[listener])
    return 0


def _export_note(message: str) -> None:
    """An export's note on stderr; which runtime runs is said in the start-up line."""
    if not message.startswith("runtime "):
        stderr_line("gce serve")(message)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or a one-line error (address in use, unknown host...)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"--host {host}: cannot listen there ({exc.strerror or exc})") from None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(2048)
    except OSError as exc:
        listener.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    return listener
