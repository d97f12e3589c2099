"""The filter vocabulary shared by every back end: parsing, AND semantics, masks."""

from __future__ import annotations

import numpy as np
import pytest

from gce.retrieval.filters import FilterError, ItemFilter, parse_filter

PATHS = ["shop/a.jpg", "shop/b.jpg", "street/c.jpg", "street/d.jpg"]
LABELS = ["cat", None, "dog", "cat"]


def test_no_condition_is_none() -> None:
    assert parse_filter(None) is None
    assert parse_filter([]) is None


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["label=cat"], [True, False, False, True]),
        (["label in cat,dog"], [True, False, True, True]),
        (["path startswith street/"], [False, False, True, True]),
        (["label=cat", "path startswith shop/"], [True, False, False, False]),
        (["label in cat,dog", "label=dog"], [False, False, True, False]),
        (["path startswith s", "path startswith street/"], [False, False, True, True]),
        (["  label = cat  "], [True, False, False, True]),
    ],
)
def test_mask_and_matches_agree(texts: list[str], expected: list[bool]) -> None:
    f = parse_filter(texts)
    assert f is not None
    assert f.mask(PATHS, LABELS).tolist() == expected
    assert [f.matches(p, lab) for p, lab in zip(PATHS, LABELS, strict=True)] == expected


def test_unlabelled_items_never_match_a_label_condition() -> None:
    f = ItemFilter(labels=frozenset({"cat"}))
    assert not f.matches("shop/b.jpg", None)


@pytest.mark.parametrize(
    "text",
    ["label", "label=", "label in ,", "colour=red", "path startswith ", "label in cat,,dog", "path=x"],
)
def test_unreadable_filter_is_a_one_line_error(text: str) -> None:
    with pytest.raises(FilterError) as err:
        parse_filter([text])
    assert "\n" not in str(err.value)


def test_conditions_that_exclude_everything_are_refused() -> None:
    with pytest.raises(FilterError, match="exclude every item"):
        parse_filter(["label=cat", "label=dog"])
    with pytest.raises(FilterError, match="exclude every item"):
        parse_filter(["path startswith shop/", "path startswith street/"])


def test_describe_round_trips() -> None:
    f = parse_filter(["label in dog,cat", "path startswith shop/"])
    assert f is not None
    assert parse_filter(f.describe().split(" AND ")) == f
    assert np.array_equal(f.mask(PATHS, LABELS), [True, False, False, False])
