"""Shared fixtures: a tiny labelled image folder that a model can actually learn."""

from __future__ import annotations

from pathlib import Path

import pytest

from gce.data.synthetic import make_pattern_folder as make_shape_folder


@pytest.fixture(scope="session")
def shape_folder(tmp_path_factory) -> Path:
    return make_shape_folder(tmp_path_factory.mktemp("shapes"))
