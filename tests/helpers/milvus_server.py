"""A real Milvus server (the ``milvus`` pip package, Milvus 2.3) for the tests, on 127.0.0.1.

Every port the package lets one choose is a free one (so a second server or a developer's own
Milvus does not clash), every component is told its address is 127.0.0.1, its data lives in a
temporary folder, the start is bounded in time and the process is stopped at the end.

What cannot be chosen (seen with ``ss -ltnp``): Milvus 2.3 binds its gRPC servers (proxy, the
coordinators and nodes) and its metrics/health port on all interfaces, ``*:PORT`` (only the ports
are configurable), and its embedded etcd listens on 127.0.0.1:2379 and 127.0.0.1:2380 whatever
``etcd_port`` says (the package's template has no key for the embedded etcd's own config), so
two servers cannot run at once on one machine.
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


def _etcd_ports_taken() -> list[int]:
    taken = []
    for port in (2379, 2380):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                taken.append(port)
    return taken


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
    if reason is None and (taken := _etcd_ports_taken()):
        reason = f"port {taken[0]} of 127.0.0.1 (Milvus 2.3's embedded etcd, not configurable) is in use"
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
