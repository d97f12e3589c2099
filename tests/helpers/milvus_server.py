"""A real Milvus server (the ``milvus`` pip package, Milvus 2.3) for the tests, on 127.0.0.1.

Every port the package lets one choose is a free one (so a second server or a developer's own
Milvus does not clash), every component is told its address is 127.0.0.1, its data lives in a
temporary folder, the start is bounded in time and the process is stopped at the end.

What cannot be chosen (seen with ``ss -ltnp``): Milvus 2.3 binds its gRPC servers (proxy, the
coordinators and nodes) and its metrics/health port on all interfaces, ``*:PORT`` (only the ports
are configurable), and its embedded etcd listens on 127.0.0.1:2379 and 127.0.0.1:2380 whatever
``etcd_port`` says (the package's template has no key for the embedded etcd's own config), so
two servers cannot run at once on one machine.

So the server tests run in a network namespace of their own whose only interface is loopback
(:func:`loopback_only_command`: ``unshare --net --map-root-user``): there, "all interfaces" is
127.0.0.1, nothing outside can reach the server, and its fixed etcd ports clash with nobody. The
fixture starts a server only inside such a namespace (``GCE_TEST_LOOPBACK_ONLY=1``, set by
tests/retrieval/test_milvus_server.py, which runs the server tests there).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
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


#: Set in the loopback-only namespace that tests/retrieval/test_milvus_server.py runs the server tests in.
LOOPBACK_ONLY_ENV = "GCE_TEST_LOOPBACK_ONLY"

# Run in the new namespace before anything else: its loopback interface starts down.
_LOOPBACK_UP = """
import fcntl, os, socket, struct, sys
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH", b"lo", 0))[:18])[1]
    fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))
    if len(socket.if_nameindex()) != 1:
        sys.exit("not a loopback-only namespace")
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def loopback_only_command(python_args: list[str]) -> tuple[list[str] | None, str]:
    """``(command, "")`` running ``python python_args...`` in a new network namespace with loopback
    up and nothing else, or ``(None, why not)`` where this machine cannot make one."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None, "no unshare command (util-linux)"
    command = [unshare, "--net", "--map-root-user", sys.executable, "-c", _LOOPBACK_UP]
    probe = subprocess.run([*command, "-c", "pass"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return None, f"unshare --net --map-root-user failed: {(probe.stderr.strip().splitlines() or ['?'])[-1]}"
    return [*command, *python_args], ""


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
    if os.environ.get(LOOPBACK_ONLY_ENV) != "1":  # never on the machine's own interfaces
        pytest.skip("the Milvus 2.3 server tests run in a loopback-only namespace (test_milvus_server.py)")
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
