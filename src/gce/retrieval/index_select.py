"""Searches restricted to some ids (a metadata filter, deleted items left out) with faiss's selectors.

faiss applies an ``IDSelector`` inside the search: a flat index scores exactly the selected vectors
(the answer is exact search over them), IVF lists skip unselected entries, and HNSW walks its graph
through every node but returns only selected ones. The approximate types visit a budget of
candidates (``nprobe`` cells, ``efSearch`` nodes) tuned at build time for unfiltered search; when
only a fraction ``f`` of the stored items pass, about ``f`` of that budget yields answers, so the
budget is divided by ``f`` (capped at everything). Queries that still come back with fewer than
``k`` hits while enough items pass (a very selective filter whose items lie outside the visited
cells, or beyond the graph walk at that width) are searched again at full width: every cell, or
``efSearch`` = the number of stored items, which visits every item an IVF index holds and every
node the HNSW graph reaches.

A very selective filter would make the widened HNSW walk compute more distances than a scan of
every item (each expanded node computes those of its up to 2M level-0 neighbours): then the search
runs on the HNSW index's own flat storage with the same selector, which scores exactly the passing
items and costs a bit test per item (benchmarks/filter_speed.py; docs/retrieval.md).
"""

from __future__ import annotations

import math

import numpy as np

from gce.retrieval.faiss_build import load_faiss

__all__ = ["selected_search"]


def selected_search(
    index, index_type: str, queries: np.ndarray, k: int, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """faiss ``(scores, ids)`` of the top ``k`` among the ids where ``keep`` (a bool per stored id) is
    True; ``k`` must be at most ``keep.sum()``."""
    faiss = load_faiss()
    bits = np.packbits(keep, bitorder="little")  # faiss' bitmap order: id i is bit i % 8 of byte i // 8
    selector = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
    widen = len(keep) / max(1, int(np.count_nonzero(keep)))
    if index_type == "hnsw" and _walk_costs_more(index, widen):
        storage = faiss.downcast_index(index.storage)  # the same vectors under the same ids
        scores, ids = _search(faiss, storage, queries, k, faiss.SearchParameters(sel=selector))
        del bits
        return scores, ids
    scores, ids = _search(faiss, index, queries, k, _params(faiss, index, index_type, selector, widen))
    if index_type != "flat":  # flat scores every selected item: never short
        short = (ids < 0).any(axis=1)
        if short.any():
            full = _params(faiss, index, index_type, selector, math.inf)
            scores[short], ids[short] = _search(faiss, index, queries[short], k, full)
    del bits  # (kept alive until here: the selector points into it)
    return scores, ids


def _search(faiss, index, queries: np.ndarray, k: int, params) -> tuple[np.ndarray, np.ndarray]:
    """faiss' own search call with ``params``: once ``faiss.contrib.torch_utils`` is imported
    (pytorch-metric-learning does), ``Index.search`` is a wrapper that takes no parameters."""
    x = np.ascontiguousarray(queries, dtype=np.float32)
    scores = np.empty((len(x), k), dtype=np.float32)
    ids = np.empty((len(x), k), dtype=np.int64)
    index.search_c(len(x), faiss.swig_ptr(x), k, faiss.swig_ptr(scores), faiss.swig_ptr(ids), params)
    return scores, ids


def _params(faiss, index, index_type: str, selector, widen: float):
    """Search parameters with the selector and the candidate budget multiplied by ``widen``."""
    if index_type == "flat":
        return faiss.SearchParameters(sel=selector)
    if index_type == "hnsw":
        ef = int(index.hnsw.efSearch)
        return faiss.SearchParametersHNSW(sel=selector, efSearch=_scaled(ef, widen, int(index.ntotal)))
    ivf = faiss.extract_index_ivf(index)
    return faiss.SearchParametersIVF(sel=selector, nprobe=_scaled(int(ivf.nprobe), widen, int(ivf.nlist)))


def _walk_costs_more(index, widen: float) -> bool:
    """Whether the widened graph walk would compute at least as many distances as there are items."""
    ef = _scaled(int(index.hnsw.efSearch), widen, int(index.ntotal))
    return ef * int(index.hnsw.nb_neighbors(0)) >= int(index.ntotal)


def _scaled(value: int, widen: float, most: int) -> int:
    return max(value, most) if math.isinf(widen) else max(value, min(most, math.ceil(value * widen)))
