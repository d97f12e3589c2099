"""Undoing, for a test, what ``import faiss.contrib.torch_utils`` does to faiss in this process.

pytorch-metric-learning's inference utilities import that module, which replaces ``search`` (and
other methods) of every faiss index class by a wrapper without the ``params`` argument, and keeps
the original as ``search_numpy``. milvus-lite runs faiss in the calling process and passes
``params``: once another test (or a user's code) has imported torch_utils, its HNSW search fails.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def faiss_without_torch_utils() -> Iterator[None]:
    """faiss' own methods back in place while the block runs (nothing to do if torch_utils was never imported)."""
    if "faiss.contrib.torch_utils" not in sys.modules:
        yield
        return
    import faiss

    swapped = []
    for name in dir(faiss):
        cls = getattr(faiss, name)
        if not isinstance(cls, type):
            continue
        for method in ("search", "add", "add_with_ids", "train", "remove_ids", "reconstruct", "range_search"):
            original = cls.__dict__.get(f"{method}_numpy")
            if original is not None and method in cls.__dict__:
                swapped.append((cls, method, cls.__dict__[method]))
                setattr(cls, method, original)
    try:
        yield
    finally:
        for cls, method, wrapper in swapped:
            setattr(cls, method, wrapper)
