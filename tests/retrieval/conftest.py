"""The real-Milvus-server tests are collected only inside the loopback-only network namespace that
test_milvus_server.py runs them in (see tests/helpers/milvus_server.py)."""

from __future__ import annotations

import os
from pathlib import Path

from helpers.milvus_server import LOOPBACK_ONLY_ENV


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    if collection_path.name == "test_milvus_index.py" and os.environ.get(LOOPBACK_ONLY_ENV) != "1":
        return True
    return None
