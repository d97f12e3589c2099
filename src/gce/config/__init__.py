"""Typed experiment configuration, loaded from YAML with ``key.sub=value`` overrides.

- :mod:`gce.config.vocabulary`: the names each choice accepts (backbones, heads, strategies ...);
- :mod:`gce.config.schema`: the pydantic sections and :class:`ExperimentConfig`;
- :mod:`gce.config.model_checks`, :mod:`gce.config.checks`: the checks pydantic's field bounds
  cannot express (learner slices, seeds, resource limits ...);
- :mod:`gce.config.loading`: YAML files, ``extends:``, overrides, one-line errors;
- :mod:`gce.config.presets`: the configs that ship with the package (``gce config list``).

None of them imports torch: a config is read and checked before the ML stack loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gce.config.loading import (
        apply_override,
        config_from_dict,
        load_config,
        parse_override,
        read_config_tree,
        read_yaml_mapping,
        save_config,
    )
    from gce.config.schema import (
        DataConfig,
        EvalConfig,
        ExperimentConfig,
        LossConfig,
        MetaClassConfig,
        ModelConfig,
        OptimConfig,
        SamplerConfig,
        TrainConfig,
    )


__all__ = [
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "LossConfig",
    "MetaClassConfig",
    "ModelConfig",
    "OptimConfig",
    "SamplerConfig",
    "TrainConfig",
    "apply_override",
    "config_from_dict",
    "load_config",
    "parse_override",
    "read_config_tree",
    "read_yaml_mapping",
    "save_config",
]

# The schema's module loads pydantic (a quarter of a second): the sub-modules that need no schema
# (vocabulary, checks, bundled) are imported without it, e.g. by every ``gce ... --help``.
_HOME = {name: "gce.config.schema" for name in __all__ if name[0].isupper()} | {
    name: "gce.config.loading" for name in __all__ if not name[0].isupper()
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
