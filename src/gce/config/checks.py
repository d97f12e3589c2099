"""Edge checks of a whole experiment config that pydantic's per-field bounds do not express.

Called from :class:`gce.config.schema.ExperimentConfig`'s validator, so every way a config is made (YAML,
``key=value`` overrides, an ablation variant, a checkpoint's saved config) gets them. Each problem
is a ``ValueError`` whose message names the key and the value, turned into one ``gce: error:``
line by the config loader:

- seeds (``train.seed``, ``data.options.seed``) are integers in ``[0, 2**32)``: what numpy, torch
  and Python all accept and reproduce;
- ``data.test_resize`` is at least ``data.image_size`` (the centre crop is cut from the resize);
- numbers that size memory or time (image size, batch, workers, threads, dimensions, epochs) have
  upper limits, so a typo (``image_size: 22400``) is an error before work, not a ``MemoryError``;
- every float is finite (YAML reads ``1e400`` as infinity);
- ``train.out_dir`` is not empty, ``~`` in it is expanded, and it is not inside a folder dataset's
  root (whose every sub-folder is read as a class).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gce.config.schema import ExperimentConfig

#: Seeds are accepted in [0, SEED_LIMIT).
SEED_LIMIT = 2**32

#: Upper limits of resource-sized values (key -> largest accepted value). Generous for real use:
#: 4096 px crops, 64k-image batches, a million batches per epoch.
LIMITS: dict[str, int] = {
    "data.image_size": 4096,
    "data.test_resize": 8192,
    "data.workers": 256,
    "model.num_learners": 1024,
    "model.embedding_dim": 65536,
    "model.block_channels": 65536,
    "metaclass.update_every": 100_000,
    "metaclass.num_metaclasses": 1_000_000,
    "sampler.classes_per_batch": 65536,
    "sampler.samples_per_class": 65536,
    "sampler.batches_per_epoch": 10_000_000,
    "optim.step_size": 1_000_000,
    "train.epochs": 100_000,
    "train.finetune_epochs": 100_000,
    "train.eval_test_every": 100_000,
    "train.num_threads": 4096,
    "eval.batch_size": 65536,
}
#: A batch (classes x samples) larger than this many images is refused too.
MAX_BATCH_IMAGES = 65536


def check_seed(value: Any, key: str) -> int:
    """``value`` as a seed, or a ValueError naming ``key``: an integer from 0 to 2**32 - 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"bad value for '{key}': a seed must be an integer from 0 to 2**32-1 (got {value!r})")
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"bad value for '{key}': a seed must be from 0 to 2**32-1 = {SEED_LIMIT - 1} (got {value})")
    return value


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found += _leaves(value, name + ".")
        elif isinstance(value, (list, tuple)):
            found += [(f"{name}.{i}", v) for i, v in enumerate(value)]
        else:
            found.append((name, value))
    return found


def check_experiment(cfg: ExperimentConfig) -> None:
    """Raise ValueError (one line naming the key) for the problems listed in the module docstring."""
    values = dict(_leaves(cfg.model_dump(mode="python")))
    check_seed(cfg.train.seed, "train.seed")
    if "seed" in cfg.data.options:
        check_seed(cfg.data.options["seed"], "data.options.seed")
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"bad value for '{key}': must be a finite number (got {value})")
    for key, limit in LIMITS.items():
        value = values.get(key)
        if isinstance(value, int) and value > limit:
            raise ValueError(
                f"bad value for '{key}': {value} is above the limit {limit} (a resource-sized value;"
                f" the run would exhaust memory or time)"
            )
    for i, k in enumerate(cfg.eval.recall_ks or []):
        if k > 10_000_000:
            raise ValueError(f"bad value for 'eval.recall_ks.{i}': {k} is above the limit 10000000")
    s = cfg.sampler
    if s.classes_per_batch * s.samples_per_class > MAX_BATCH_IMAGES:
        raise ValueError(
            f"sampler.classes_per_batch={s.classes_per_batch} x sampler.samples_per_class="
            f"{s.samples_per_class} is a batch of {s.classes_per_batch * s.samples_per_class} images,"
            f" above the limit {MAX_BATCH_IMAGES}"
        )
    d = cfg.data
    if d.test_resize is not None and d.test_resize < d.image_size:
        raise ValueError(
            f"data.test_resize={d.test_resize} is smaller than data.image_size={d.image_size};"
            f" test images are resized, then a centre crop of image_size is cut, so the resize"
            f" must be at least image_size"
        )
    if not str(d.root).strip():
        raise ValueError("bad value for 'data.root': the path is empty")
    if not str(cfg.train.out_dir).strip():
        raise ValueError("bad value for 'train.out_dir': the path is empty")
    expanded = os.path.expanduser(cfg.train.out_dir)
    if expanded != cfg.train.out_dir:
        cfg.train.out_dir = expanded
    out, root = os.path.realpath(expanded), os.path.realpath(os.path.expanduser(d.root))
    if d.dataset == "folder" and (out == root or out.startswith(root.rstrip(os.sep) + os.sep)):
        raise ValueError(
            f"train.out_dir={cfg.train.out_dir} is inside data.root={d.root}; a run never writes"
            f" into its dataset (a folder dataset would read the run as a class)"
        )
