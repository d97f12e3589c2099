"""A real Milvus server (the ``milvus`` pip package, Milvus 2.3) for the tests, on 127.0.0.1.

Every port the package lets one choose is a free one (so a second server or a developer's own
Milvus does not clash), its data lives in a temporary folder, the start is bounded in time and
the process is stopped at the end. What cannot be chosen: Milvus 2.3's gRPC and metrics servers
listen on all interfaces (only their ports are configurable), and its embedded etcd's peer port
is 2380 on 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import time
from pathlib import Path

import pytest

#: The server starts in 7-16 s on this machine; past this the tests are skipped, saying so.
START_SECONDS = 120
_COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexCoord", "indexNode", "dataCoord", "dataNode")


def _cannot_run() -> str | None:
    for module in ("milvus", "pymilvus"):
        if importlib.util.find_spec(module) is None:
            return f"the {module} package is not installed (pip install 'gce-dml[test]')"
    return None


def _etcd_peer_port_taken() -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", 2380)) == 0


def start_server(base_dir: Path):
    """A started ``milvus.MilvusServer`` (every configurable port free, every component on 127.0.0.1)."""
    from milvus import MilvusServer, MilvusServerConfig

    server = MilvusServer(MilvusServerConfig(), wait_for_started=False)
    server.set_base_dir(str(base_dir))
    for key in list(server.config.configurable_items):
        if key.endswith("_port"):
            server.config.set(key, 0)  # 0: the package picks the first free port from 40000
    for component in _COMPONENTS:
        server.config.set(f"{component}.ip", "127.0.0.1")
    server.start()
    try:
        server.wait_started(timeout=START_SECONDS * 1000)
    except (TimeoutError, RuntimeError) as exc:
        server.stop()
        log = base_dir / "logs" / "milvus-stderr.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
        raise RuntimeError(f"{exc}; {tail[0][:300] if tail else 'no log'}") from None
    return server


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory):
    """``http://127.0.0.1:PORT`` of a Milvus server started for this test session."""
    reason = _cannot_run()
    if reason is None and _etcd_peer_port_taken():
        reason = "port 2380 (Milvus' embedded etcd peer port, not configurable in 2.3) is in use"
    if reason:
        pytest.skip(f"no Milvus server: {reason}")
    started = time.monotonic()
    try:
        server = start_server(tmp_path_factory.mktemp("milvus"))
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"the Milvus server did not start in {time.monotonic() - started:.0f} s: {exc}")
    try:
        yield f"http://127.0.0.1:{server.listen_port}"
    finally:
        server.stop()
