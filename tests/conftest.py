"""Shared fixtures: a tiny labelled image folder that a model can actually learn."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gce.data.synthetic import make_pattern_folder as make_shape_folder
from helpers.numerics import THREADS

if "GCE_TEST_THREADS" in os.environ:  # tests/helpers/numerics_matrix.py: the thread count of its variant
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def shape_folder(tmp_path_factory) -> Path:
    return make_shape_folder(tmp_path_factory.mktemp("shapes"))
