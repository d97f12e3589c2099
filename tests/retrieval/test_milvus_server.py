"""Runs the tests that need a real Milvus 2.3 server (tests/retrieval/test_milvus_index.py) in a
network namespace whose only interface is loopback: that server binds all interfaces and cannot be
told otherwise (tests/helpers/milvus_server.py), and a test server must not be reachable from
outside the machine."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers.milvus_server import LOOPBACK_ONLY_ENV, START_SECONDS, loopback_only_command

SERVER_TESTS = Path(__file__).with_name("test_milvus_index.py")
#: The server's start bound plus the tests (about a minute on 2 cores) with room for a loaded machine.
RUN_SECONDS = START_SECONDS + 480


def test_milvus_server_tests_pass_in_a_loopback_only_namespace(tmp_path: Path) -> None:
    if os.environ.get(LOOPBACK_ONLY_ENV) == "1":
        pytest.skip("already inside the namespace")
    pytest.importorskip("milvus")
    pytest.importorskip("pymilvus")
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'inner'}", str(SERVER_TESTS)]
    command, why_not = loopback_only_command(args)
    if command is None:
        pytest.skip(f"cannot confine the Milvus server to loopback here: {why_not}")
    env = {**os.environ, LOOPBACK_ONLY_ENV: "1"}
    done = subprocess.run(
        command, cwd=SERVER_TESTS.parents[2], env=env, capture_output=True, text=True, timeout=RUN_SECONDS
    )
    tail = (done.stdout + done.stderr)[-3000:]
    assert done.returncode == 0, tail
    summary = done.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary and "failed" not in summary, tail
