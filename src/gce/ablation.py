"""Ablation runner: the same base config under several variants and seeds, then a summary.

Each (variant, seed) run lives in ``<out_dir>/<variant>/seed<seed>/``. A run with
``final_metrics.json`` is finished and skipped; a run with a checkpoint is resumed; others start
fresh. So a killed ablation restarts only the runs that did not finish.

A run being trained holds ``<run>/running.lock`` (gce.io.locks: flock + the owner's
pid). Another ``gce ablate`` process on the same file skips runs locked by a live process, so
starting the command twice on a 2-core machine (with ``train.num_threads=1``) trains two runs at
a time. A lock left by a killed process (its pid is gone) is taken over.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gce.config import (
    ExperimentConfig,
    apply_override,
    config_from_dict,
    parse_override,
    read_config_tree,
    read_yaml_mapping,
)
from gce.errors import ConfigError
from gce.io import check_output_dir, user_path, write_text
from gce.io.locks import try_lock

SUMMARY_METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r")


class AblationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="experiment YAML every variant starts from (relative to this file)")
    out_dir: str = "runs/ablation"
    seeds: list[Annotated[int, Field(ge=0, lt=2**32)]] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    overrides: list[str] = Field(default_factory=list, description="key=value applied to every variant")
    variants: dict[str, list[str]] = Field(min_length=1, description="variant name -> key=value overrides")


def load_ablation(path: str | Path, extra_overrides: Sequence[str] = ()) -> tuple[AblationConfig, dict[str, Any]]:
    path = user_path(path, "ablation file")
    tree = read_yaml_mapping(path, "ablation file")
    try:
        ablation = AblationConfig.model_validate(tree)
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(
            f"{path}: '{'.'.join(map(str, first['loc']))}': {first['msg']} (got {first.get('input')!r})"
        ) from None
    for name in ablation.variants:  # each becomes a folder name under out_dir
        if not name.strip() or name in (".", "..") or "/" in name or os.sep in name or name.startswith("."):
            raise ConfigError(
                f"{path}: variant name {name!r} cannot be a folder name under out_dir"
                f" (no '/', not empty, not starting with '.')"
            )
    if len(set(ablation.seeds)) != len(ablation.seeds):
        raise ConfigError(f"{path}: 'seeds' lists a seed twice ({ablation.seeds}); each (variant, seed) is one run")
    ablation.out_dir = str(check_output_dir(ablation.out_dir, what=f"{path}: out_dir"))
    base_tree = read_config_tree(path.parent / os.path.expanduser(ablation.base))
    for text in [*ablation.overrides, *extra_overrides]:
        apply_override(base_tree, *parse_override(text))
    return ablation, base_tree


def run_config(ablation: AblationConfig, base_tree: dict[str, Any], variant: str, seed: int) -> ExperimentConfig:
    tree = copy.deepcopy(base_tree)
    for text in ablation.variants[variant]:
        apply_override(tree, *parse_override(text))
    apply_override(tree, ["train", "seed"], seed)
    apply_override(tree, ["train", "out_dir"], str(Path(ablation.out_dir) / variant / f"seed{seed}"))
    apply_override(tree, ["name"], f"{variant}-seed{seed}")
    return config_from_dict(tree)


@contextmanager
def run_lock(folder: Path) -> Iterator[bool]:
    """Yields True if this process now owns ``folder``'s run, False if a live process does."""
    with try_lock(folder / "running.lock") as holder:
        yield holder is None


def _check_every_runs_data(configs: Iterable[ExperimentConfig]) -> None:
    """List (not decode) each distinct data section once and check every run's sampler against it,
    before the first run trains: the one-line errors a run would give at its start, given now."""
    from gce.data.run_data import prepare_data
    from gce.training.parts import check_sampler_feasible

    listed: dict[str, Any] = {}
    for cfg in configs:
        key = json.dumps(cfg.data.model_dump(), sort_keys=True, default=str)
        if key not in listed:
            quick = cfg.model_copy(update={"data": cfg.data.model_copy(update={"verify_images": False})})
            listed[key] = prepare_data(quick, progress=False).train
        check_sampler_feasible(cfg, listed[key])


def run_ablation(
    path: str | Path,
    extra_overrides: Sequence[str] = (),
    *,
    only: list[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Run every unfinished (variant, seed), then write the summary; returns the summary path."""
    from gce.training.trainer import Trainer

    ablation, base_tree = load_ablation(path, list(extra_overrides))
    variants = only or list(ablation.variants)
    unknown = [v for v in variants if v not in ablation.variants]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; the file defines {list(ablation.variants)}")
    # Seed-major order: a stopped ablation has whole seeds of every variant, comparable already.
    configs = {
        (v, s): run_config(ablation, base_tree, v, s) for s in ablation.seeds for v in variants
    }  # validate all first
    _check_every_runs_data(configs.values())  # a bad data.root of the last variant fails now, not hours later
    for (variant, seed), cfg in configs.items():
        out = Path(cfg.train.out_dir)
        if (out / "final_metrics.json").exists():
            log(f"[{variant} seed {seed}] finished earlier, skipped")
            continue
        with run_lock(out) as owned:
            if not owned:
                log(f"[{variant} seed {seed}] being trained by another process, skipped")
                continue
            if (out / "final_metrics.json").exists():  # finished by another process meanwhile
                continue
            resume = (out / "last.pt").exists() or (out / "prev.pt").exists()
            log(f"[{variant} seed {seed}] {'resuming' if resume else 'starting'} in {out}")
            Trainer.from_config(cfg, resume=resume, progress=progress, log=log).run()
    return write_summary(Path(ablation.out_dir), variants, ablation.seeds)


def read_run(folder: Path) -> dict[str, Any]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "final": json.loads((folder / "final_metrics.json").read_text()),
        "test": [r for r in records if r["event"] == "test"],
        "metaclass": [r for r in records if r["event"] == "metaclass"],
        "train": [r for r in records if r["event"] == "train"],
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summary_table(results: dict[str, list[dict[str, Any]]], metrics: tuple[str, ...] = SUMMARY_METRICS) -> str:
    """Markdown table: mean ± sample std over seeds, in percent (the mean alone for one seed)."""
    header = (
        "| variant | seeds | "
        + " | ".join(m.replace("recall@", "R@").upper().replace("R@", "R@") for m in metrics)
        + " |"
    )
    lines = [header, "|---|---|" + "---|" * len(metrics)]
    for variant, runs in results.items():
        cells = []
        for metric in metrics:
            values = [100 * r["final"][metric] for r in runs if r["final"].get(metric) is not None]
            if not values:
                cells.append("-")
                continue
            mean, std = mean_std(values)
            cells.append(f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}")  # no spread from one seed
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(out_dir: Path, variants: list[str], seeds: list[int]) -> Path:
    from gce.plots import plot_metaclass_sizes, plot_recall_curves

    results = {
        v: [
            read_run(out_dir / v / f"seed{s}")
            for s in seeds
            if (out_dir / v / f"seed{s}" / "final_metrics.json").exists()
        ]
        for v in variants
    }
    results = {v: runs for v, runs in results.items() if runs}
    summary = out_dir / "summary.md"
    write_text(summary, summary_table(results) + "\n")
    plot_recall_curves(results, out_dir / "recall_at_1.png")
    plot_metaclass_sizes(results, out_dir / "classes_per_learner.png")
    return summary
