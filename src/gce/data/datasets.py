"""Registry of dataset loaders and :func:`load_dataset`, the one entry point the CLI uses."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable

from gce.config.vocabulary import DATASET_NAMES
from gce.data._common import check_root
from gce.data.cars196 import load_cars196
from gce.data.csvdata import load_csv
from gce.data.cub import load_cub
from gce.data.emoji import load_emoji
from gce.data.folder import load_folder
from gce.data.inshop import load_inshop
from gce.data.records import DatasetSplits
from gce.data.sop import load_sop
from gce.errors import ConfigError, DatasetError
from gce.registry import Registry

Loader = Callable[..., DatasetSplits]

#: name -> loader(root, **options). Every loader accepts ``skip_bad``.
DATASETS: Registry[Loader] = Registry("dataset", "data.dataset", DATASET_NAMES)
for _name, _loader_of in (
    ("cub", load_cub),
    ("cars196", load_cars196),
    ("sop", load_sop),
    ("inshop", load_inshop),
    ("folder", load_folder),
    ("csv", load_csv),
    ("emoji", load_emoji),
):
    DATASETS.register(_name)(_loader_of)


def dataset_options(name: str) -> list[str]:
    """The keyword options the loader of ``name`` accepts (besides ``root``)."""
    signature = inspect.signature(_loader(name))
    return [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def load_dataset(name: str, root: str | os.PathLike, **options) -> DatasetSplits:
    """Load dataset ``name`` from ``root`` with the loader's ``options``.

    Raises :class:`DatasetError` for an unknown name (listing the valid ones) or a root that does
    not exist or cannot be read, and :class:`ConfigError` for an option the loader lacks.
    """
    loader = _loader(name)
    accepted = dataset_options(name)
    for option in options:
        if option not in accepted:
            raise ConfigError(f"dataset {name!r} has no option {option!r}; its options are: {', '.join(accepted)}")
    check_root(root, name, allow_file=(name == "csv"))
    return loader(root, **options)


def _loader(name: str) -> Loader:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[name]
