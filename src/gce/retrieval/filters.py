"""Metadata filters on search: which catalogue items a query may return.

One filter vocabulary for every back end and surface (``gce search --filter``, the service's
``filter`` parameter, the Python API). Each ``--filter`` text is one condition; several are ANDed:

- ``label=NAME``: the item's label is NAME;
- ``label in A,B,C``: the label is one of the names (split at commas);
- ``path startswith PREFIX``: the stored path starts with PREFIX.

Items without a label never match a label condition. The faiss back end turns a filter into an
id mask (:meth:`ItemFilter.mask`); the Milvus back end into a boolean expression of its own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gce.errors import GceError

__all__ = ["FILTER_SYNTAX", "FilterError", "ItemFilter", "parse_filter"]

FILTER_SYNTAX = "'label=NAME', 'label in A,B,C' or 'path startswith PREFIX'"


class FilterError(GceError):
    """A filter text that is not one of :data:`FILTER_SYNTAX`."""


@dataclass(frozen=True)
class ItemFilter:
    """The conjunction of a label set (``None``: any label) and a path prefix (``None``: any path)."""

    labels: frozenset[str] | None = None
    path_prefix: str | None = None

    @property
    def empty(self) -> bool:
        """True when the filter lets every item through."""
        return self.labels is None and self.path_prefix is None

    def matches(self, path: str, label: str | None) -> bool:
        if self.labels is not None and (label is None or label not in self.labels):
            return False
        return self.path_prefix is None or path.startswith(self.path_prefix)

    def mask(self, paths: Sequence[str], labels: Sequence[str | None]) -> np.ndarray:
        """A boolean array, True for the items (by id) that pass."""
        keep = np.ones(len(paths), dtype=bool)
        if self.labels is not None:
            wanted = self.labels
            keep &= np.fromiter((label in wanted for label in labels), dtype=bool, count=len(labels))
        if self.path_prefix is not None:
            prefix = self.path_prefix
            keep &= np.fromiter((p.startswith(prefix) for p in paths), dtype=bool, count=len(paths))
        return keep

    def describe(self) -> str:
        """The filter as ``--filter`` texts (for messages and reports)."""
        parts = []
        if self.labels is not None:
            names = sorted(self.labels)
            parts.append(f"label={names[0]}" if len(names) == 1 else f"label in {','.join(names)}")
        if self.path_prefix is not None:
            parts.append(f"path startswith {self.path_prefix}")
        return " AND ".join(parts) or "(none)"


_LABEL_EQUALS = re.compile(r"^\s*label\s*=\s*(?P<value>.*?)\s*$", re.DOTALL)
_LABEL_IN = re.compile(r"^\s*label\s+in\s+(?P<value>.*?)\s*$", re.DOTALL)
_PATH_PREFIX = re.compile(r"^\s*path\s+startswith\s+(?P<value>.*?)\s*$", re.DOTALL)


def parse_filter(texts: Sequence[str] | str | None) -> ItemFilter | None:
    """The AND of the conditions in ``texts`` (see the module doc); ``None`` for no condition.

    Two label conditions intersect (``label in a,b`` and ``label=b`` keep ``b``); two path prefixes
    must nest (the longer one is kept). Conditions that no item can pass are an error, not an empty
    answer, because they are always a typo.
    """
    if texts is None:
        return None
    if isinstance(texts, str):
        texts = [texts]
    labels: frozenset[str] | None = None
    prefix: str | None = None
    for text in texts:
        if not isinstance(text, str):
            raise FilterError(f"a filter is text, not {type(text).__name__}; use {FILTER_SYNTAX}")
        if match := _LABEL_EQUALS.match(text):
            names = frozenset([_name(match["value"], text)])
        elif match := _LABEL_IN.match(text):
            names = frozenset(_name(part, text) for part in match["value"].split(","))
        elif match := _PATH_PREFIX.match(text):
            value = match["value"]
            if not value:
                raise FilterError(f"filter {text!r}: the path prefix is empty")
            if prefix is not None and not (value.startswith(prefix) or prefix.startswith(value)):
                raise FilterError(f"filters 'path startswith {prefix}' and {text!r} exclude every item")
            prefix = value if prefix is None or len(value) > len(prefix) else prefix
            continue
        else:
            raise FilterError(f"cannot read filter {text!r}; use {FILTER_SYNTAX}")
        labels = names if labels is None else labels & names
        if not labels:
            raise FilterError(f"the label filters exclude every item (last one: {text!r})")
    result = ItemFilter(labels, prefix)
    return None if result.empty else result


def _name(value: str, text: str) -> str:
    name = value.strip()
    if not name:
        raise FilterError(f"filter {text!r}: empty label name")
    return name
