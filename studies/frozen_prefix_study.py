"""Many head / grouped-trunk variants and seeds on a CPU budget: the trunk's first layers frozen.

The full 4-epoch emoji ablation costs 10-45 CPU minutes per run on a shared 2-core machine, too
much to compare a dozen variants over 3 seeds. This study trains the same runs with the first
``--frozen-layers`` layers of the trunk frozen (MobileNetV2: ``features.0-13``, ImageNet weights,
BN frozen as always) and their outputs computed once and cached (an image and its mirror image:
the emoji config augments with flips only). Everything after them -- the trunk's last layers,
shared or owned by the learners, and the head -- trains exactly as in ``gce train``: the same
:class:`~gce.training.trainer.Trainer` (batches, flips drawn from the same per-item seeds,
meta-class refreshes, loss, optimiser, schedule), only fed with cached features.

The test split is evaluated once, at the end, without clustering (no NMI); no checkpoints are
written (a run takes minutes). The cache (``prefix_cache.pt`` in ``--out``) is only valid for one
backbone, image size and ``--frozen-layers``: use another ``--out`` when changing them.

So it answers "which variant is best when the last stage (MobileNetV2: the last 5 layers, 96
channels at 4 x 4 in, 1280 at 2 x 2 out) and the head adapt", not what the full fine-tuning
gives; docs/results.md reports both, labelled.

    python studies/frozen_prefix_study.py configs/ablation/emoji_block.yaml --seeds 0 1 2 \\
        --out runs/frozen-prefix [--only linear_k8 gce_k8 ...] [key=value ...]

Prints one markdown row per variant (mean ± std over seeds) and writes ``results.jsonl``.
Each finished (variant, seed) is kept in ``results.jsonl`` and skipped when the command is rerun.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from gce.ablation import load_ablation, mean_std, run_config
from gce.evaluation import evaluate_embeddings
from gce.models.grouped_trunk import GroupedTrunk, trunk_layers
from gce.training.optim import build_optimizer, build_scheduler
from gce.training.trainer import Trainer
from learner_diagnostics import nearest_neighbours  # a sibling script: python puts studies/ on the path

METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")


class CachedFeatures(torch.utils.data.Dataset):
    """Index -> (cached prefix features, label); stands in for an image dataset in evaluation."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, records) -> None:
        self.features, self.labels, self.records = features, labels, records

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.features[index], int(self.labels[index])


def _split(model: nn.Module, frozen: int) -> nn.Module:
    """Cut the model's trunk after ``frozen`` layers; returns the frozen prefix (eval mode)."""
    trunk = model.trunk
    if isinstance(trunk, GroupedTrunk):
        shared = list(trunk.shared.children())
        if frozen > len(shared):
            raise SystemExit(
                f"--frozen-layers={frozen} reaches into the learners' copies ({len(shared)} shared layers)"
            )
        prefix, trunk.shared = nn.Sequential(*shared[:frozen]), nn.Sequential(*shared[frozen:])
    else:
        layers = trunk_layers(trunk)
        prefix, model.trunk = nn.Sequential(*layers[:frozen]), nn.Sequential(*layers[frozen:])
    for p in prefix.parameters():
        p.requires_grad_(False)
    return prefix.eval()


@torch.no_grad()
def _prefix_features(prefix: nn.Module, dataset, mirrored: bool, batch: int = 256) -> list[torch.Tensor]:
    """[features, labels] of every image, plus the features of its mirror image if ``mirrored``."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=0)
    feats, flipped, labels = [], [], []
    for images, y in tqdm(loader, desc="frozen prefix", leave=False):
        feats.append(prefix(images))
        if mirrored:
            flipped.append(prefix(images.flip(-1)))
        labels.append(y)
    return [torch.cat(feats), torch.cat(labels)] + ([torch.cat(flipped)] if mirrored else [])


class FrozenPrefixTrainer(Trainer):
    """A :class:`Trainer` whose model starts at the cached output of a frozen trunk prefix."""

    cache: ClassVar[dict[str, torch.Tensor]] = {}  # shared by every run of the process (same prefix weights)

    def __init__(self, *args, frozen_layers: int, cache_file: Path, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.frozen_layers, self.cache_file = frozen_layers, cache_file

    def setup(self) -> None:
        super().setup()
        prefix = _split(self.model, self.frozen_layers)
        if not self.cache and self.cache_file.is_file():
            FrozenPrefixTrainer.cache = torch.load(self.cache_file, weights_only=True)
        if not self.cache:
            train, train_y, train_flip = _prefix_features(prefix, self.train_eval_set, mirrored=True)
            test, test_y = _prefix_features(prefix, self.test_set, mirrored=False)
            FrozenPrefixTrainer.cache = {
                "train": train,
                "train_flip": train_flip,
                "train_y": train_y,
                "test": test,
                "test_y": test_y,
            }
            torch.save(self.cache, self.cache_file)
        c = self.cache
        self.train_eval_set = CachedFeatures(c["train"], c["train_y"], self.train_eval_set.records)
        self.test_set = CachedFeatures(c["test"], c["test_y"], self.test_set.records)
        # The optimiser must hold the parameters that still train (the prefix is gone).
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.scheduler = build_scheduler(self.optimizer, self.cfg)

    def _loader(self, epoch, plan, first):
        from gce.data.seeded import item_seed

        c = self.cache
        for b, (_, indices) in list(enumerate(plan))[first:]:
            rows = []
            for pos, idx in enumerate(indices):
                with torch.random.fork_rng(devices=[]):  # the flip RandomHorizontalFlip would draw
                    torch.manual_seed(item_seed(self.cfg.train.seed, epoch, b, pos))
                    flip = bool(torch.rand(1) < 0.5)
                rows.append((c["train_flip"] if flip else c["train"])[idx])
            yield torch.stack(rows), c["train_y"][torch.as_tensor(indices)]

    def _save(self, epoch: int, batch: int) -> Path:  # no checkpoints: a run takes minutes
        return self.out


def learner_diagnostics(trainer: Trainer) -> dict[str, object]:
    """R@1 of each learner's sub-embedding alone and the mean pairwise nearest-neighbour agreement
    (as studies/learner_diagnostics.py computes them for a full model)."""
    embeddings, labels = trainer._embed(trainer.test_set, "diagnostics")
    slices = trainer.model.learner_slices()
    per_learner = [
        evaluate_embeddings(embeddings[:, s], labels, recall_ks=[1], clustering=False).recall[1] for s in slices
    ]
    nn_of = [nearest_neighbours(embeddings[:, s]) for s in slices]
    pairs = list(itertools.combinations(range(len(slices)), 2))
    agreement = [float((nn_of[a] == nn_of[b]).float().mean()) for a, b in pairs]
    return {"learners_r1": per_learner, "agreement": sum(agreement) / len(agreement) if pairs else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ablation", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value applied to every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+")
    parser.add_argument("--out", type=Path, default=Path("runs/frozen-prefix"))
    parser.add_argument("--frozen-layers", type=int, default=14, help="MobileNetV2: 14 = features.0-13")
    args = parser.parse_args(argv)

    ablation, base_tree = load_ablation(
        args.ablation, ["eval.clustering=false", "train.eval_test_every=0", "data.workers=0", *args.overrides]
    )
    variants = args.only or list(ablation.variants)
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.jsonl"
    done = {}
    if results_file.is_file():
        for line in results_file.read_text().splitlines():
            r = json.loads(line)
            done[(r["variant"], r["seed"])] = r
    for seed in args.seeds:
        for variant in variants:
            if (variant, seed) in done:
                continue
            cfg = run_config(ablation, base_tree, variant, seed)
            cfg.train.out_dir = str(args.out / variant / f"seed{seed}")
            started = time.perf_counter()
            trainer = FrozenPrefixTrainer(
                cfg,
                progress=False,
                log=lambda *_: None,
                frozen_layers=args.frozen_layers,
                cache_file=args.out / "prefix_cache.pt",
            )
            final = trainer.run().to_dict()
            record = {
                "variant": variant,
                "seed": seed,
                "seconds": round(time.perf_counter() - started),
                **{m: final[m] for m in METRICS},
                **learner_diagnostics(trainer),
            }
            done[(variant, seed)] = record
            with results_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            learners = ", ".join(f"{100 * v:.1f}" for v in record["learners_r1"])
            print(
                f"{variant} seed {seed}: R@1 {100 * record['recall@1']:.1f} MAP@R {100 * record['map@r']:.1f} "
                f"learners {learners} agreement {100 * (record['agreement'] or 0):.1f} % "
                f"({record['seconds']} s)",
                flush=True,
            )
    print("| variant | seeds | " + " | ".join(m.replace("recall@", "R@").upper() for m in METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    for variant in variants:
        runs = [r for (v, _), r in done.items() if v == variant and _ in args.seeds]
        if not runs:
            continue
        cells = []
        for m in METRICS:
            mean, std = mean_std([100 * r[m] for r in runs])
            cells.append(f"{mean:.1f} ± {std:.1f}" if len(runs) > 1 else f"{mean:.1f}")
        print(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
